"""Anthropic's Messages API (`/v1/messages`), JSON and SSE."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

import orjson

from ..pricing import Usage
from .base import Api, StreamState, as_int, count_delta, json_object, tightest_rate_limits

if TYPE_CHECKING:
    from ..budgets.admission import BudgetStatus


class Messages(Api):
    name = "anthropic.messages"
    shape = "anthropic"
    wire = "anthropic"
    cap_fields = ("max_tokens",)
    min_cap = 0  # `max_tokens: 0` is valid: it warms the prompt cache and generates nothing

    def stream_error_event(self, err: dict[str, Any]) -> bytes:
        # Anthropic's mid-stream error event; its SDK raises on `event: error`.
        body = {"type": "error", "error": {"type": err.get("type"), "message": err.get("message")}}
        return b"event: error\ndata: " + orjson.dumps(body) + b"\n\n"

    def rate_limit_headers(self, limits: "Sequence[BudgetStatus]") -> dict[str, str]:
        """Anthropic's names for the same three numbers; its reset is an RFC 3339 time."""
        out: dict[str, str] = {}
        for unit, st in tightest_rate_limits(limits).items():
            out[f"anthropic-ratelimit-{unit}-limit"] = str(st.limit_nusd)
            out[f"anthropic-ratelimit-{unit}-remaining"] = str(st.remaining_nusd)
            if st.resets_at is not None:
                out[f"anthropic-ratelimit-{unit}-reset"] = (
                    datetime.fromtimestamp(st.resets_at, timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z"))
        return out

    def server_tools(self, body: dict[str, Any], default_calls: int) -> dict[str, int]:
        """Server tools (`web_search_*`, `web_fetch_*` types), each up to its `max_uses`."""
        out: dict[str, int] = {}
        for t in body.get("tools") or ():
            kind = next((k for k in ("web_search", "web_fetch") if str(t.get("type") or "").startswith(k + "_")),
                        None) if isinstance(t, dict) else None
            if kind is not None:
                uses = t.get("max_uses")
                n = uses if isinstance(uses, int) and not isinstance(uses, bool) and uses >= 0 else default_calls
                out[kind] = out.get(kind, 0) + n
        return out

    def advisors(self, body: dict[str, Any], default_calls: int) -> list[tuple[str, int, int | None]]:
        """The advisor tool (`advisor_*`): each call runs its model on the conversation so far,
        billed at that model's rates, up to `max_uses` calls of `max_tokens` output each."""
        out = []
        for t in body.get("tools") or ():
            if isinstance(t, dict) and str(t.get("type") or "").startswith("advisor_") and isinstance(t.get("model"), str):
                uses, cap = t.get("max_uses"), t.get("max_tokens")
                out.append((t["model"], uses if isinstance(uses, int) and uses >= 0 else default_calls,
                            cap if isinstance(cap, int) and cap >= 0 else None))
        return out

    def usage_from_json(self, obj: dict[str, Any]) -> Usage | None:
        u = obj.get("usage")
        return anthropic_usage(u) if isinstance(u, dict) else None

    def on_event(self, state: StreamState, event: str, data: bytes) -> None:
        obj = json_object(data)
        if obj is None:
            return
        kind = obj.get("type") or event
        if kind == "content_block_delta":
            d = obj.get("delta")
            if isinstance(d, dict):  # text_delta, input_json_delta, thinking_delta (signatures are not output)
                text = d.get("text", d.get("partial_json", d.get("thinking")))
                if d.get("type") != "signature_delta":
                    count_delta(state, text)
        elif kind == "message_start":
            msg = obj.get("message")
            if isinstance(msg, dict):
                if isinstance(msg.get("model"), str) and msg["model"]:
                    state.served_model = msg["model"]
                state.usage = self.usage_from_json(msg) or Usage()
        elif kind == "message_delta":
            # message_delta's usage is cumulative; newer API versions repeat the input counts
            # too, and carry the server tool calls and iterations of the whole message.
            u = obj.get("usage")
            if isinstance(u, dict):
                state.usage = _merge(state.usage or Usage(), anthropic_usage(u), u)
                state.usage_final = True
        elif kind == "message_stop":
            state.done = True
        elif kind == "error":
            state.error = obj.get("error") if isinstance(obj.get("error"), dict) else obj


def _cache_writes(u: dict[str, Any]) -> tuple[int, int]:
    """(5-minute, 1-hour) cache writes: `cache_creation` splits them by TTL; without it, all of
    `cache_creation_input_tokens` is the 5-minute kind."""
    cc = u.get("cache_creation")
    if isinstance(cc, dict):
        return as_int(cc.get("ephemeral_5m_input_tokens")), as_int(cc.get("ephemeral_1h_input_tokens"))
    return as_int(u.get("cache_creation_input_tokens")), 0


def _tokens(u: dict[str, Any]) -> Usage:
    short, long = _cache_writes(u)
    return Usage(input_tokens=as_int(u.get("input_tokens")), cached_input_tokens=as_int(u.get("cache_read_input_tokens")),
                 cache_write_tokens=short, cache_write_long_tokens=long, output_tokens=as_int(u.get("output_tokens")))


def anthropic_usage(u: dict[str, Any]) -> Usage:
    """What one Messages usage object bills.

    The top-level counts, plus: server tool calls (`server_tool_use`: web search and web fetch
    requests), and `iterations` the top level leaves out: `compaction` iterations (billed at this
    model's rates; the API documents that their tokens are not in the top-level fields) and
    `advisor_message` iterations (billed at the advisor model's own rates). `message` and
    `fallback_message` iterations are the turns the top level already sums.
    """
    usage = _tokens(u)
    details = u.get("output_tokens_details")
    if isinstance(details, dict):  # thinking is billed inside output_tokens; kept apart for the record
        usage.reasoning_tokens = as_int(details.get("thinking_tokens"))
    stu = u.get("server_tool_use")
    if isinstance(stu, dict):
        for field, kind in (("web_search_requests", "web_search"), ("web_fetch_requests", "web_fetch")):
            if as_int(stu.get(field)):
                usage.tool_calls[kind] = as_int(stu.get(field))
    for it in u.get("iterations") or ():
        if not isinstance(it, dict):
            continue
        if it.get("type") == "compaction":
            usage.add(_tokens(it))
        elif it.get("type") == "advisor_message" and isinstance(it.get("model"), str):
            usage.other_models.append((it["model"], _tokens(it)))
    return usage


def _merge(seen: Usage, new: Usage, raw: dict[str, Any]) -> Usage:
    """A stream's usage so far updated by a cumulative message_delta: counts only grow; tool
    calls and iterations, when the delta carries them, are the whole message's."""
    for f in ("input_tokens", "cached_input_tokens", "output_tokens", "reasoning_tokens"):
        setattr(seen, f, max(getattr(seen, f), getattr(new, f)))
    if isinstance(raw.get("cache_creation"), dict):  # the split itself
        seen.cache_write_tokens = max(seen.cache_write_tokens, new.cache_write_tokens)
        seen.cache_write_long_tokens = max(seen.cache_write_long_tokens, new.cache_write_long_tokens)
    else:  # only the total: what it adds beyond the split seen so far is the 5-minute kind
        extra = new.cache_write_tokens - (seen.cache_write_tokens + seen.cache_write_long_tokens)
        seen.cache_write_tokens += max(0, extra)
    if "server_tool_use" in raw:
        seen.tool_calls = new.tool_calls
    if "iterations" in raw:
        seen.other_models = new.other_models
    return seen
