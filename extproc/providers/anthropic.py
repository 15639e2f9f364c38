"""Anthropic's Messages API (`/v1/messages`), JSON and SSE."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import orjson

from ..budgets.replies import iso
from ..pricing import STANDARD_TIER, Usage
from .base import Api, StreamState, as_int, count_delta, json_object, tightest_rate_limits

if TYPE_CHECKING:
    from ..budgets.admission import BudgetStatus
    from ..config import BoundsSection as Bounds

_SERVER_TOOLS = ("web_search", "web_fetch")


def _speed(v: Any) -> str | None:
    """Anthropic's `speed` as the price table names rate tiers: `fast` mode has its own rates."""
    return "fast" if v == "fast" else STANDARD_TIER if v == "standard" else None


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
                out[f"anthropic-ratelimit-{unit}-reset"] = iso(st.resets_at) or ""
        return out

    def server_tools(self, body: dict[str, Any], default_calls: int) -> dict[str, int]:
        """Server tools (`web_search_*`, `web_fetch_*` types), each up to its `max_uses`."""
        out: dict[str, int] = {}
        for t in body.get("tools") or ():
            kind = _server_tool(t)
            if kind is not None:
                uses = t.get("max_uses")
                n = uses if isinstance(uses, int) and not isinstance(uses, bool) and uses >= 0 else default_calls
                out[kind] = out.get(kind, 0) + n
        return out

    def tool_calls_capped(self, body: dict[str, Any]) -> bool:
        return all(_uses(t) is not None for t in body.get("tools") or () if _server_tool(t) is not None)

    def advisors(self, body: dict[str, Any], bounds: "Bounds") -> list[tuple[str, int, int | None]]:
        """The advisor tool (`advisor_*`): each call runs its model on the conversation so far,
        billed at that model's rates, up to `max_uses` calls of `max_tokens` output each. And
        server-side fallback (`fallbacks`): each entry may run once more on its model, with its
        own `max_tokens` or the request's, when the models before it decline (a declined hop
        is billed too); `"default"` (a chain the server picks) is bounded as one more hop at
        the requested model's rates."""
        out = []
        for t in body.get("tools") or ():
            if isinstance(t, dict) and str(t.get("type") or "").startswith("advisor_") and isinstance(t.get("model"), str):
                uses, cap = _uses(t), t.get("max_tokens")
                out.append((t["model"], bounds.server_tool_calls if uses is None else uses,
                            cap if isinstance(cap, int) and cap >= 0 else None))
        cap = body.get("max_tokens") if isinstance(body.get("max_tokens"), int) else None
        fallbacks = body.get("fallbacks")
        if fallbacks == "default" and isinstance(body.get("model"), str):
            out.append((body["model"], 1, cap))
        elif isinstance(fallbacks, list):
            for f in fallbacks:
                if isinstance(f, dict) and isinstance(f.get("model"), str):
                    own = f.get("max_tokens")
                    out.append((f["model"], 1, own if isinstance(own, int) and own >= 0 else cap))
        return out

    def rate_modifiers(self, body: dict[str, Any], bounds: "Bounds") -> tuple[str | None, str | None]:
        """`speed: fast` bills at fast-mode rates; `inference_geo` (else the workspace default the
        policy states) at the row's multiplier for it."""
        geo = body.get("inference_geo")
        return _speed(body.get("speed")), geo if isinstance(geo, str) and geo else bounds.default_inference_geo

    def unbounded(self, body: dict[str, Any], bounds: "Bounds") -> list[str]:
        if body.get("fallbacks") == "default":
            return ["fallbacks: \"default\" (a server-chosen chain: one more hop at the requested model's rates)"]
        return []

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


def _server_tool(t: Any) -> str | None:
    return next((k for k in _SERVER_TOOLS if str(t.get("type") or "").startswith(k + "_")), None) \
        if isinstance(t, dict) else None


def _uses(t: dict[str, Any]) -> int | None:
    uses = t.get("max_uses")
    return uses if isinstance(uses, int) and not isinstance(uses, bool) and uses >= 0 else None


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
    `fallback_message` iterations are the turns the top level already sums; when they ran on
    different models (server-side fallback: a `fallback_message` entry, or `message` entries
    naming more than one model) each one that names its model is billed at that model's rates
    (moved from the top level to `other_models`). `speed` and `inference_geo` say the rates:
    fast mode, and the row's multiplier for where inference ran.
    """
    usage = _tokens(u)
    usage.tier = _speed(u.get("speed"))
    usage.inference_geo = u["inference_geo"] if isinstance(u.get("inference_geo"), str) and u["inference_geo"] else None
    fc = u.get("fallback_credit")
    status = fc.get("status") if isinstance(fc, dict) else None
    if isinstance(status, dict) and isinstance(status.get("type"), str):
        usage.fallback_credit = status["type"]
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
    for model, part in _fallback_hops(u):
        usage.take(part)
        usage.other_models.append((model, part))
    return usage


def _fallback_hops(u: dict[str, Any]) -> list[tuple[str, Usage]]:
    """The sampling iterations of a response served across models (server-side fallback), each
    naming its model, with their tokens; [] when every iteration ran on one model."""
    turns = [it for it in u.get("iterations") or () if isinstance(it, dict)
             and it.get("type") in ("message", "fallback_message")]
    models = {it.get("model") for it in turns if isinstance(it.get("model"), str) and it.get("model")}
    if not (len(models) > 1 or any(it.get("type") == "fallback_message" for it in turns)):
        return []
    return [(it["model"], _tokens(it)) for it in turns if isinstance(it.get("model"), str) and it["model"]]


def _merge(seen: Usage, new: Usage, raw: dict[str, Any]) -> Usage:
    """A stream's usage so far updated by a cumulative message_delta: counts only grow; tool
    calls and iterations, when the delta carries them, are the whole message's (and a
    fallback's per-model split of the top level replaces the counts so far: the delta's
    top level is the whole message's). Speed and geo, once said, stay."""
    seen.tier = new.tier or seen.tier
    seen.inference_geo = new.inference_geo or seen.inference_geo
    seen.fallback_credit = new.fallback_credit or seen.fallback_credit
    if _fallback_hops(raw):
        for f in ("input_tokens", "cached_input_tokens", "cache_write_tokens", "cache_write_long_tokens",
                  "output_tokens", "reasoning_tokens"):
            setattr(seen, f, getattr(new, f))
        seen.tool_calls = new.tool_calls if "server_tool_use" in raw else seen.tool_calls
        seen.other_models = new.other_models
        return seen
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
