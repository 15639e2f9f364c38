"""The fake provider's ledger: what it billed, one entry per request to a generating endpoint,
in memory and bounded (``GET`` / ``DELETE /_fake/ledger``). The entry's fields are documented
in :mod:`extproc.fakeprovider.server`."""

from __future__ import annotations

from collections import deque
from typing import Any

import orjson
from aiohttp import web

DEFAULT_LEDGER_SIZE = 100_000


class Ledger:
    """What the fake billed, one mutable entry per request, in memory and bounded.

    Entries are dicts updated in place (a stream's ``output_tokens`` grows as it is written), so
    a reader sees the provider's view at that moment."""

    def __init__(self, maxlen: int = DEFAULT_LEDGER_SIZE) -> None:
        self.entries: deque[dict[str, Any]] = deque(maxlen=max(1, maxlen))
        self.dropped = 0

    def add(self, entry: dict[str, Any]) -> dict[str, Any]:
        if len(self.entries) == self.entries.maxlen:
            self.dropped += 1
        self.entries.append(entry)
        return entry

    def select(self, filters: dict[str, str]) -> list[dict[str, Any]]:
        """Entries whose fields equal every ``filters`` value (only ``id`` and ``request_id``)."""
        wanted = {k: v for k, v in filters.items() if k in ("id", "request_id")}
        return [e for e in self.entries if all(e.get(k) == v for k, v in wanted.items())]

    def clear(self) -> None:
        self.entries.clear()


LEDGER_KEY = web.AppKey("ledger", Ledger)


def hooks(request: web.Request) -> dict[str, str]:
    return {k.lower(): v for k, v in request.headers.items() if k.lower().startswith("x-fake-")}


def new_entry(request: web.Request, api: str, model: str, status: int, stream: bool,
              record: bool = True) -> dict[str, Any]:
    """A ledger entry that bills nothing yet (the caller fills in the tokens), appended to the
    ledger unless ``record`` is false (free endpoints such as ``count_tokens``)."""
    entry: dict[str, Any] = {
        "id": "", "api": api, "model": model, "request_id": request.headers.get("x-request-id", ""),
        "stream": stream,
        "input_tokens": 0, "output_tokens": 0, "cached": 0, "cache_write": 0,
        "cache_write_5m": 0, "cache_write_1h": 0, "cache_write_30m": 0, "cache_write_12h": 0,
        "reasoning_tokens": 0, "n": 1, "context_tokens": 0, "tool_input_tokens": 0,
        "web_search_requests": 0, "web_fetch_requests": 0, "tool_calls": {},
        "iterations": [], "other_models": [], "previous_response_id": None, "error": None,
        "audio_input_tokens": 0, "audio_output_tokens": 0, "service_tier": None, "inference_geo": None,
        "image_gen": None,
        "status": status, "complete": False, "hooks": hooks(request),
    }
    return request.app[LEDGER_KEY].add(entry) if record else entry


async def ledger_get(request: web.Request) -> web.Response:
    ledger = request.app[LEDGER_KEY]
    return web.Response(body=orjson.dumps(ledger.select(dict(request.query))), content_type="application/json",
                        headers={"x-fake-ledger-dropped": str(ledger.dropped)})


async def ledger_delete(request: web.Request) -> web.Response:
    request.app[LEDGER_KEY].clear()
    return web.Response(status=204)
