"""Requests in flight per identity, so one client cannot hold every ext_proc stream.

Envoy keeps an ext_proc stream open for as long as a request lives, from its headers to the end of
its response. A client that opens requests and trickles their bodies (or never finishes reading a
stream) would otherwise hold streams until Envoy's circuit breaker on the ext_proc cluster is full,
and every other client would get 500s. The cap is taken once the caller is identified (request
headers), before anything else is held, and given back when the stream ends.

The count is per ext_proc process: it protects this process's streams and Envoy's circuit breaker
in front of it, which are per process too. With several processes, Envoy spreads one client's
requests across them, so a client may hold up to the cap on each.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import GatewayError
from ..identity import Identity

RETRY_AFTER_SECONDS = 1


@dataclass
class Slot:
    """One request's place under its identity's cap; released exactly once."""

    cap: "ConcurrencyCap"
    key: str
    released: bool = False

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.cap._release(self.key)


class ConcurrencyCap:
    """In-flight requests per identity, for this process. Long-lived: a policy reload changes the
    limit passed to `acquire`, never the counts of requests already running."""

    def __init__(self) -> None:
        self._held: dict[str, int] = {}

    def acquire(self, identity: Identity, limit: int) -> Slot:
        """A slot for this request, or a 429 when its identity already holds `limit` (0: no cap)."""
        key = f"{identity.source}\0{identity.user}"
        held = self._held.get(key, 0)
        if limit and held >= limit:
            raise GatewayError(
                429, f"This identity already has {held} requests in flight through the gateway (the limit is "
                     f"{limit}); wait for one to finish.",
                # Shaped like a rate limit's 429 (budgets/replies.py rate_limited): OpenAI's type
                # `requests`, Anthropic's `rate_limit_error`, Retry-After, and the limit in headers.
                type="rate_limit_error", openai_type="requests", code="concurrency_limit",
                headers={"retry-after": str(RETRY_AFTER_SECONDS), "x-tollgate-concurrency-limit": str(limit),
                         "x-tollgate-concurrency-in-flight": str(held)})
        self._held[key] = held + 1
        return Slot(self, key)

    def _release(self, key: str) -> None:
        n = self._held.get(key, 0) - 1
        if n > 0:
            self._held[key] = n
        else:
            self._held.pop(key, None)
