"""What every wire format (API) provides: request parsing, usage extraction, error shape.

One `Api` object per supported endpoint; the processor looks it up by path and never needs to
know which provider it talks to.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import orjson

from ..errors import Shape, bad_request
from ..pricing import Usage

if TYPE_CHECKING:
    from ..budgets.admission import BudgetStatus
    from ..config import BoundsSection as Bounds

# Tokens charged per image part when estimating an upper bound: image tokens do not show in the
# body's bytes when the image is a URL. Generous on purpose: an estimate must never be low.
IMAGE_TOKENS_UPPER = 3000
_IMAGE_MARKERS = (b'"image_url"', b'"input_image"', b'"image"')
# Content parts that may point at a document instead of carrying it (the body shows only its URL or id).
_DOCUMENT_MARKERS = (b'"document"', b'"input_file"', b'"file"')
_DOCUMENT_TYPES = frozenset({"document", "input_file", "file"})
_INLINE_KEYS = ("data", "file_data", "text", "content")  # an inline document's bytes are in the body already


# Keys that decide a request's price or route: a body naming one twice is checked for duplicate
# keys (anywhere) before it is priced; other bodies skip the (slower) check.
_PRICED_KEYS = tuple(f'"{k}"'.encode() for k in (
    "model", "max_tokens", "max_completion_tokens", "max_output_tokens", "n", "stream", "stream_options",
    "tools", "max_uses", "max_tool_calls", "previous_response_id", "conversation", "service_tier", "speed",
    "inference_geo", "fallbacks"))


def _has_duplicate_keys(raw: bytes) -> bool:
    found = False

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        nonlocal found
        if not found and len({k for k, _ in items}) != len(items):
            found = True
        return dict(items)

    try:
        json.loads(raw, object_pairs_hook=pairs)
    except (ValueError, RecursionError):
        return False  # orjson accepted it; nothing more to say here
    return found


def _referenced_documents(obj: Any) -> int:
    """Documents or files given by URL or id anywhere in the body (inline ones are counted by size)."""
    if isinstance(obj, list):
        return sum(_referenced_documents(x) for x in obj)
    if not isinstance(obj, dict):
        return 0
    if obj.get("type") in _DOCUMENT_TYPES:
        inner = obj.get("source") or obj.get("file") or obj
        if isinstance(inner, dict) and not any(isinstance(inner.get(k), str) and inner[k] for k in _INLINE_KEYS):
            return 1
    return sum(_referenced_documents(v) for v in obj.values() if isinstance(v, (dict, list)))


@dataclass(slots=True)
class ParsedRequest:
    """What the gateway needs from a request body."""

    body: dict[str, Any]
    model: str
    stream: bool
    output_cap: int | None  # the client's max_tokens (or equivalent); None = not set
    input_tokens_upper: int  # never below the real input token count
    choices: int = 1  # completions asked for (chat's `n`): each one bills up to the output cap
    server_tools: dict[str, int] = field(default_factory=dict)  # tool kind -> most calls it may make
    # Other models the request lets the provider run, each billed at its own rates: (model, most
    # calls, output cap per call). Advisor tool calls, server-side fallback hops, image generation.
    advisors: list[tuple[str, int, int | None]] = field(default_factory=list)
    tier: str | None = None  # the rate tier asked for (service_tier / speed); None = the row's own rates
    inference_geo: str | None = None  # where inference is asked to run (Anthropic); None = no multiplier
    # What the worst case takes from a policy allowance because the body shows no upper bound
    # (`gateway.bounds.unbounded: refuse` refuses these): one short phrase each.
    unbounded: list[str] = field(default_factory=list)


@dataclass(slots=True)
class StreamState:
    """Running totals while a response streams through."""

    usage: Usage | None = None
    served_model: str | None = None
    output_deltas: int = 0  # content deltas seen: every delta holds at least one token (a floor)
    output_estimate: int = 0  # sum of `delta_tokens` over the deltas: what a cut-short stream is charged
    done: bool = False  # the provider's own end-of-response event arrived
    usage_final: bool = False  # the provider's final usage arrived (it may come before `done`)
    error: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def delta_tokens(n_bytes: int) -> int:
    """Output tokens charged for one streamed delta of `n_bytes` UTF-8 bytes: `max(1, n_bytes // 4)`.

    Used only when a stream ends before the provider's usage arrives (client cancel, upstream
    cut, live cap). Every delta carries at least one token, so this never counts fewer tokens
    than deltas; for multi-token deltas (Anthropic, Gemini) it is the usual ~4 bytes per token
    of English. It never undercounts the fake provider (one word per delta, at most 8 bytes for
    its first 10,000 words), and overcounts single-token OpenAI deltas of 8+ bytes (" function"
    counts 2): conservative, as a charge for an unfinished response should be.
    """
    return max(1, n_bytes // 4)


def count_delta(state: StreamState, text: Any) -> None:
    """Record one content delta (`text` is its text, or anything else: counted as one token)."""
    state.output_deltas += 1
    state.output_estimate += delta_tokens(len(text.encode()) if isinstance(text, str) else 0)


class Api:
    """Base for one endpoint's wire format. Subclasses fill in the hooks."""

    name: ClassVar[str]
    shape: ClassVar[Shape] = "openai"
    wire: ClassVar[str] = "openai"  # which providers can serve it: providers list the wires they speak
    cap_fields: ClassVar[tuple[str, ...]] = ()  # body fields holding the output cap, first wins
    min_cap: ClassVar[int] = 1  # the smallest output cap the API accepts
    choices_field: ClassVar[str | None] = None  # body field asking for several completions
    has_output: ClassVar[bool] = True

    def parse(self, raw: bytes, bounds: "Bounds | None" = None) -> ParsedRequest:
        """Parse a request body and bound its input. `bounds` (the policy's `gateway.bounds`)
        gives the allowances for what the body cannot show: server tool calls and their results,
        documents by reference, stored context."""
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError as e:
            raise bad_request(f"Request body is not valid JSON: {e}", code="invalid_json") from None
        if not isinstance(body, dict):
            raise bad_request("Request body must be a JSON object.", code="invalid_json")
        if max(map(raw.count, _PRICED_KEYS)) > 1 and _has_duplicate_keys(raw):  # map: no Python frame per key
            # Tollgate read the last of each (as orjson does) but forwards the body as sent: an
            # upstream that takes the first would serve a model other than the one priced.
            raise bad_request("The request body repeats a key in one object; send each key once.",
                              code="duplicate_key")
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise bad_request("You must provide a model parameter.", code="missing_model", param="model")
        cap = None
        for f in self.cap_fields:
            v = body.get(f)
            if v is not None:
                if not isinstance(v, int) or isinstance(v, bool) or v < self.min_cap:
                    what = "a positive integer" if self.min_cap else "a non-negative integer"
                    raise bad_request(f"`{f}` must be {what}.", code="invalid_value", param=f)
                cap = v
                break
        choices = 1
        if self.choices_field is not None and body.get(self.choices_field) is not None:
            choices = body[self.choices_field]
            if not isinstance(choices, int) or isinstance(choices, bool) or not 1 <= choices <= 128:
                raise bad_request(f"`{self.choices_field}` must be an integer from 1 to 128.", code="invalid_value",
                                  param=self.choices_field)
        images = sum(map(raw.count, _IMAGE_MARKERS))
        upper = len(raw) + images * IMAGE_TOKENS_UPPER
        tools: dict[str, int] = {}
        advisors: list[tuple[str, int, int | None]] = []
        tier = geo = None
        unbounded: list[str] = []
        if bounds is not None:
            tools = self.server_tools(body, bounds.server_tool_calls)
            advisors = self.advisors(body, bounds)
            upper += sum(tools.values()) * bounds.server_tool_input_tokens
            if tools and not self.tool_calls_capped(body):
                unbounded.append(f"server tools without a call limit (gateway.bounds.server_tool_calls: "
                                 f"{bounds.server_tool_calls} each)")
            if any(map(raw.__contains__, _DOCUMENT_MARKERS)):
                documents = _referenced_documents(body)
                upper += documents * bounds.document_input_tokens
                if documents:
                    unbounded.append(f"documents by reference (gateway.bounds.document_input_tokens: "
                                     f"{bounds.document_input_tokens} each)")
            if self.stateful(body):
                upper += bounds.stateful_input_tokens
                unbounded.append(f"stored context (gateway.bounds.stateful_input_tokens: {bounds.stateful_input_tokens})")
            tier, geo = self.rate_modifiers(body, bounds)
            unbounded += self.unbounded(body, bounds)
        return ParsedRequest(
            body=body,
            model=model,
            stream=body.get("stream") is True,
            output_cap=cap,
            input_tokens_upper=upper,
            choices=choices,
            server_tools=tools,
            advisors=advisors,
            tier=tier,
            inference_geo=geo,
            unbounded=unbounded,
        )

    def server_tools(self, body: dict[str, Any], default_calls: int) -> dict[str, int]:
        """Server-side tools the request enables, with the most calls each may make."""
        return {}

    def stateful(self, body: dict[str, Any]) -> bool:
        """True when the provider adds stored context the body does not carry."""
        return False

    def tool_calls_capped(self, body: dict[str, Any]) -> bool:
        """True when the body caps every server tool's calls (`max_uses`, `max_tool_calls`)."""
        return False

    def advisors(self, body: dict[str, Any], bounds: "Bounds") -> list[tuple[str, int, int | None]]:
        """Other models the request lets the provider run, billed at their own rates."""
        return []

    def rate_modifiers(self, body: dict[str, Any], bounds: "Bounds") -> tuple[str | None, str | None]:
        """(rate tier, inference geo) the request asks for, the policy's stated defaults where it
        sets none; None for either = the row's own rates."""
        return None, None

    def unbounded(self, body: dict[str, Any], bounds: "Bounds") -> list[str]:
        """Wire-specific parts of the worst case that rest on an allowance (beyond server tools,
        documents and stored context, which `parse` checks itself)."""
        return []

    def set_model(self, body: dict[str, Any], model: str) -> None:
        body["model"] = model

    def set_output_cap(self, body: dict[str, Any], cap: int) -> None:
        """Lower (or set) the output cap; writes the field the client used, else the first one."""
        for f in self.cap_fields:
            if f in body and body[f] is not None:
                body[f] = cap
                return
        body[self.cap_fields[0]] = cap

    def prepare_stream(self, body: dict[str, Any]) -> bool:
        """Make a streamed request report its usage. Returns True if the body changed."""
        return False

    def usage_from_json(self, obj: dict[str, Any]) -> Usage | None:
        raise NotImplementedError

    def on_event(self, state: StreamState, event: str, data: bytes) -> None:
        raise NotImplementedError

    def stream_error_event(self, err: dict[str, Any]) -> bytes:
        """A final SSE event carrying `err` ({"message", "type", "code"}) in this API's shape: what
        the client receives when the gateway stops a stream (the live budget cap). OpenAI's SDK
        raises APIError on a `data:` object with an `error` key."""
        return b"data: " + orjson.dumps({"error": {"param": None, **err}}) + b"\n\ndata: [DONE]\n\n"

    def rate_limit_headers(self, limits: "Sequence[BudgetStatus]") -> dict[str, str]:
        """The rate-limit headers OpenAI's API sends, for the tightest request and token limit a
        request counts against (SDKs and clients already read these): limit, remaining (after
        this request) and reset (a duration: when what the window holds has aged out)."""
        out: dict[str, str] = {}
        for unit, st in tightest_rate_limits(limits).items():
            out[f"x-ratelimit-limit-{unit}"] = str(st.limit_nusd)
            out[f"x-ratelimit-remaining-{unit}"] = str(st.remaining_nusd)
            if st.resets_at is not None:
                out[f"x-ratelimit-reset-{unit}"] = go_duration(max(0.0, st.resets_at - time.time()))
        return out

    def error_message(self, obj: Any) -> str | None:
        """The provider's error message from an error body, if it is one."""
        if isinstance(obj, dict) and isinstance(obj.get("error"), dict):
            msg = obj["error"].get("message")
            return msg if isinstance(msg, str) else None
        return None


def tightest_rate_limits(limits: "Sequence[BudgetStatus]") -> "dict[str, BudgetStatus]":
    """Per unit ("requests", "tokens"), the rate limit with the least left."""
    out: dict[str, BudgetStatus] = {}
    for st in limits:
        cur = out.get(st.unit)
        if cur is None or st.remaining_nusd < cur.remaining_nusd:
            out[st.unit] = st
    return out


def go_duration(seconds: float) -> str:
    """OpenAI's reset format, Go's time.Duration text: `20ms`, `1.5s`, `6m0s`, `1h2m3s`."""
    if seconds < 1:
        return f"{max(0, round(seconds * 1000))}ms"
    whole = int(seconds)
    h, rest = divmod(whole, 3600)
    m, _ = divmod(rest, 60)
    sec = seconds - h * 3600 - m * 60
    text = f"{sec:.3f}".rstrip("0").rstrip(".") + "s"
    if h:
        return f"{h}h{m}m{text}"
    if m:
        return f"{m}m{text}"
    return text


def json_object(data: bytes) -> dict[str, Any] | None:
    """One SSE event's data as a JSON object, or None (keep-alives, garbage): streams never raise."""
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError:
        return None
    return obj if isinstance(obj, dict) else None


def openai_usage(u: Any, input_key: str, output_key: str) -> Usage | None:
    """OpenAI's usage object (chat: prompt/completion tokens; Responses: input/output tokens).

    OpenAI counts cache reads (`*_details.cached_tokens`) and cache writes
    (`*_details.cache_write_tokens`, split by TTL in `cache_write_tokens_details`: 30 minutes,
    12 hours) inside the input total: they are taken out so each is priced at its own rate.
    Reasoning tokens (`*_details.reasoning_tokens`) are inside the output total and billed as
    output; they are kept apart for the record.
    """
    if not isinstance(u, dict):
        return None
    total_in = as_int(u.get(input_key))
    details = u.get(input_key + "_details")
    details = details if isinstance(details, dict) else {}
    cached = min(as_int(details.get("cached_tokens")), total_in)
    writes = min(as_int(details.get("cache_write_tokens")), total_in - cached)
    ttl = details.get("cache_write_tokens_details")
    long_writes = min(as_int(ttl.get("ttl_12h_tokens")), writes) if isinstance(ttl, dict) else 0
    out_details = u.get(output_key + "_details")
    out_details = out_details if isinstance(out_details, dict) else {}
    reasoning = as_int(out_details.get("reasoning_tokens"))
    # Gemini's OpenAI-compatible endpoint counts thinking only in `total_tokens` (billed as
    # output): what the total holds beyond the input is output, whatever completion_tokens says.
    output = max(as_int(u.get(output_key)), as_int(u.get("total_tokens")) - total_in)
    uncached = total_in - cached - writes
    # Audio models: `*_details.audio_tokens` is the audio part of the totals, billed at the
    # row's audio rates (reads of cached audio, if any, stay at the cached rate).
    return Usage(input_tokens=uncached, cached_input_tokens=cached,
                 cache_write_tokens=writes - long_writes, cache_write_long_tokens=long_writes,
                 output_tokens=output, reasoning_tokens=max(reasoning, output - as_int(u.get(output_key))),
                 audio_input_tokens=min(as_int(details.get("audio_tokens")), uncached),
                 audio_output_tokens=min(as_int(out_details.get("audio_tokens")), output))


def as_int(v: Any) -> int:
    return v if isinstance(v, int) and not isinstance(v, bool) and v > 0 else 0
