"""What every endpoint of the fake provider shares: the token formulas, the parsed request
(:class:`Ctx`), error bodies, and how answers and streams are written (with the fault hooks).

The behaviour is documented in :mod:`extproc.fakeprovider.server`'s docstring.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import struct
from collections.abc import Callable
from typing import Any, NoReturn

import orjson
from aiohttp import web

from . import validation
from .ledger import new_entry

CHAT = "chat"
RESPONSES = "responses"
EMBEDDINGS = "embeddings"
ANTHROPIC = "anthropic"

LATENCY_KEY = web.AppKey("token_latency_ms", float)
MODELS_KEY = web.AppKey("models", validation.ModelList)
_ids = itertools.count(1)

# --------------------------------------------------------------------------------------------
# token formulas
# --------------------------------------------------------------------------------------------


def text_tokens(text: str) -> int:
    """``ceil(len(text.encode()) / 4)``."""
    return (len(text.encode()) + 3) // 4


def _content_tokens(content: Any) -> int:
    """Tokens of a message content: a string, or a list of parts with ``text`` (recursing into
    nested ``content``)."""
    if isinstance(content, str):
        return text_tokens(content)
    n = 0
    if isinstance(content, list):
        for part in content:
            if isinstance(part, str):
                n += text_tokens(part)
            elif isinstance(part, dict):
                t = part.get("text")
                if isinstance(t, str):
                    n += text_tokens(t)
                nested = part.get("content")
                if nested is not None:
                    n += _content_tokens(nested)
    return n


def _messages_tokens(messages: Any) -> int:
    n = 0
    if isinstance(messages, list):
        for m in messages:
            if isinstance(m, dict):
                n += 3 + _content_tokens(m.get("content"))
    return n


def embedding_inputs(inp: Any) -> list[Any]:
    """The separate embedding inputs: strings or lists of token ids."""
    if isinstance(inp, str):
        return [inp]
    if isinstance(inp, list):
        if inp and all(isinstance(x, int) for x in inp):
            return [inp]
        return [x for x in inp if isinstance(x, (str, list))]
    return []


def _embedding_input_tokens(item: Any) -> int:
    if isinstance(item, str):
        return text_tokens(item)
    return len(item)


def instructions_tokens(body: dict) -> int:
    """Tokens of a Responses request's ``instructions`` (not carried to a later turn)."""
    instructions = body.get("instructions")
    return text_tokens(instructions) if isinstance(instructions, str) else 0


def count_input_tokens(body: dict, api: str, body_len: int | None = None) -> int:
    """Input tokens of a parsed request ``body`` for ``api`` (``"chat"``, ``"responses"``,
    ``"embeddings"`` or ``"anthropic"``); clamped to ``body_len`` (the body's byte length,
    defaults to the orjson encoding of ``body``)."""
    if api == CHAT:
        n = _messages_tokens(body.get("messages"))
    elif api == ANTHROPIC:
        n = _content_tokens(body.get("system")) + _messages_tokens(body.get("messages"))
    elif api == RESPONSES:
        n = instructions_tokens(body)
        inp = body.get("input")
        if isinstance(inp, str):
            n += text_tokens(inp)
        elif isinstance(inp, list):
            for item in inp:
                if isinstance(item, dict):
                    if "content" in item:
                        n += 3 + _content_tokens(item.get("content"))
                    else:
                        t = item.get("text", item.get("output"))
                        if isinstance(t, str):
                            n += text_tokens(t)
                elif isinstance(item, str):
                    n += text_tokens(item)
    elif api == EMBEDDINGS:
        n = sum(_embedding_input_tokens(x) for x in embedding_inputs(body.get("input")))
    else:
        raise ValueError(f"unknown api {api!r}")
    if body_len is None:
        body_len = len(orjson.dumps(body))
    return min(n, body_len)


def _cap(body: dict, api: str) -> int | None:
    keys = ("max_output_tokens",) if api == RESPONSES else ("max_completion_tokens", "max_tokens")
    for k in keys:
        v = body.get(k)
        if isinstance(v, int) and not isinstance(v, bool):
            return v
    return None


def output_token_count(body: dict, api: str, input_tokens: int, override: int | None = None) -> tuple[int, bool]:
    """``(output_tokens, capped)``: ``min(cap, default)`` where default is ``override`` (the
    ``x-fake-output-tokens`` header) or ``16 + input_tokens % 16``; ``capped`` is true when the
    cap cut the output short."""
    visible, _, capped = output_plan(body, api, input_tokens, override)
    return visible, capped


def output_plan(body: dict, api: str, input_tokens: int, override: int | None = None,
                reasoning: int = 0) -> tuple[int, int, bool]:
    """``(visible, reasoning, capped)`` output tokens of one choice. The cap (``max_tokens`` and
    friends) bounds reasoning plus visible tokens, as OpenAI's ``max_completion_tokens`` /
    ``max_output_tokens`` do: reasoning comes first, the visible answer gets what is left."""
    default = override if override is not None else 16 + input_tokens % 16
    default, reasoning = max(0, default), max(0, reasoning)
    cap = _cap(body, api)
    if cap is None or cap >= default + reasoning:
        return default, reasoning, False
    cap = max(0, cap)
    r = min(reasoning, cap)
    return min(default, cap - r), r, True


def cache_split(input_tokens: int, read: int, write: int) -> tuple[int, int]:
    """``(cache_read, cache_write)``: reads capped at the input, writes at what is left."""
    r, w, _ = cache_split_ttl(input_tokens, read, write, 0)
    return r, w


def cache_split_ttl(input_tokens: int, read: int, short: int, long: int) -> tuple[int, int, int]:
    """``(cache_read, short-TTL writes, long-TTL writes)``: reads capped at the input, short
    writes at what is left, long writes at what is left after those."""
    r = min(max(0, read), input_tokens)
    s = min(max(0, short), input_tokens - r)
    lw = min(max(0, long), input_tokens - r - s)
    return r, s, lw


def output_words(n: int) -> list[str]:
    """The streamed deltas: ``["tok0", " tok1", ...]``; joined they are the output text."""
    return ["tok0" if i == 0 else f" tok{i}" for i in range(n)]


def embedding_vector(item: Any, dimensions: int = 8) -> list[float]:
    """``dimensions`` deterministic floats in [-1, 1] for one embedding input (8 by default)."""
    raw = item.encode() if isinstance(item, str) else orjson.dumps(item)
    out: list[float] = []
    block = 0
    while len(out) < dimensions:
        digest = hashlib.blake2b(raw, digest_size=16, salt=block.to_bytes(16, "little") if block else b"").digest()
        out.extend(round(v / 32767.5 - 1.0, 6) for v in struct.unpack("<8H", digest))
        block += 1
    return out[:dimensions]


def new_id(prefix: str) -> str:
    return f"{prefix}{next(_ids):024x}"


# --------------------------------------------------------------------------------------------
# request headers
# --------------------------------------------------------------------------------------------


def int_header(request: web.Request, name: str) -> int | None:
    v = request.headers.get(name)
    if v is None:
        return None
    try:
        return int(v)
    except ValueError:
        return None


def count_header(request: web.Request, name: str) -> int:
    """A non-negative count header; 0 when absent or malformed."""
    return max(0, int_header(request, name) or 0)


def pair_header(request: web.Request, name: str, default: tuple[int, int]) -> tuple[int, int]:
    """An ``IN,OUT`` header of two non-negative ints, or ``default``."""
    v = request.headers.get(name)
    if v is None:
        return default
    try:
        a, b = (int(x) for x in v.split(","))
    except ValueError:
        return default
    return max(0, a), max(0, b)


def ms_header(request: web.Request, name: str) -> float | None:
    """A non-negative milliseconds header in seconds, or None when absent or malformed."""
    v = request.headers.get(name)
    if v is None:
        return None
    try:
        return max(0.0, float(v)) / 1000.0
    except ValueError:
        return None


def flag(request: web.Request, name: str) -> bool:
    return request.headers.get(name, "") not in ("", "0")


def _latency_s(request: web.Request) -> float:
    v = ms_header(request, "x-fake-token-latency-ms")
    return v if v is not None else request.app[LATENCY_KEY] / 1000.0


# --------------------------------------------------------------------------------------------
# responses, errors
# --------------------------------------------------------------------------------------------

JSON = "application/json"
_SSE_HEADERS = {"content-type": "text/event-stream; charset=utf-8", "cache-control": "no-cache"}


def echo_headers(request: web.Request, model: str, ledger_id: str = "", api: str = "") -> dict[str, str]:
    h = request.headers
    out = {
        "x-fake-authorization": h.get("authorization", ""),
        "x-fake-api-key": h.get("x-api-key", ""),
        "x-fake-model": model,
        "x-fake-header-names": ",".join(sorted({k.lower() for k in h})),
    }
    if ledger_id:
        out["x-fake-id"] = ledger_id
    if api == ANTHROPIC:  # Anthropic names every answer in a request-id header
        out["request-id"] = _anthropic_request_id(request)
    return out


# aiohttp >= 3.12 has typed request keys; older versions take a plain string
_REQUEST_ID_KEY: Any = (web.RequestKey("anthropic_request_id", str) if hasattr(web, "RequestKey")
                        else "anthropic_request_id")


def _anthropic_request_id(request: web.Request) -> str:
    """The answer's Anthropic request id (``req_...``): one per request, in the ``request-id``
    header and in error bodies."""
    rid = request.get(_REQUEST_ID_KEY)
    if not rid:
        rid = new_id("req_fake")
        request[_REQUEST_ID_KEY] = rid
    return rid


def json_response(request: web.Request, model: str, payload: Any, status: int = 200, ledger_id: str = "",
                  api: str = "") -> web.Response:
    headers = echo_headers(request, model, ledger_id, api)
    return web.Response(body=orjson.dumps(payload), status=status, content_type=JSON, headers=headers)


_OPENAI_ERR = {
    400: ("invalid_request_error", None),
    401: ("invalid_request_error", "invalid_api_key"),
    403: ("invalid_request_error", "unsupported_country_region_territory"),
    404: ("invalid_request_error", "model_not_found"),
    429: ("requests", "rate_limit_exceeded"),
    500: ("server_error", None),
    503: ("server_error", None),
}
_ANTHROPIC_ERR = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    504: "timeout_error",
    529: "overloaded_error",
}


def error_body(api: str, status: int, message: str) -> dict:
    """An error body in the provider's shape, with the usual type (and OpenAI code) for
    ``status``. Anthropic bodies get their ``request_id`` when sent (:func:`error_response`)."""
    if api == ANTHROPIC:
        etype = _ANTHROPIC_ERR.get(status, "api_error" if status >= 500 else "invalid_request_error")
        return anthropic_error(etype, message)
    etype, code = _OPENAI_ERR.get(status, ("server_error" if status >= 500 else "invalid_request_error", None))
    return openai_error(message, param=None, code=code, etype=etype)


def openai_error(message: str, param: str | None = None, code: str | None = None,
                 etype: str = "invalid_request_error") -> dict:
    """OpenAI's error body: ``{"error": {"message", "type", "param", "code"}}``."""
    return {"error": {"message": message, "type": etype, "param": param, "code": code}}


def anthropic_error(etype: str, message: str) -> dict:
    """Anthropic's error body: ``{"type": "error", "error": {"type", "message"}}``."""
    return {"type": "error", "error": {"type": etype, "message": message}}


def error_response(request: web.Request, api: str, status: int, payload: dict, model: str = "",
                   billed: bool = True) -> web.Response:
    """An error answer; from a generating endpoint (``billed``) it gets a token-free ledger entry.
    Anthropic bodies carry the answer's ``request_id`` (also its ``request-id`` header)."""
    ledger_id = ""
    if billed:
        entry = new_entry(request, api, model, status, stream=False)
        entry["id"] = ledger_id = new_id("err_fake")
        entry["complete"] = True
    if api == ANTHROPIC:
        payload = {**payload, "request_id": _anthropic_request_id(request)}
    return json_response(request, model, payload, status=status, ledger_id=ledger_id, api=api)


async def parse(request: web.Request, api: str, billed: bool = True) -> tuple[dict, int] | web.Response:
    """``(body, body length)``, or the error answer a real provider would give (bad JSON, missing
    model, ``x-fake-status``, then :func:`validation.validate`: parameters, unknown models)."""
    raw = await request.read()
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return error_response(request, api, 400,
                              error_body(api, 400, "We could not parse the JSON body of your request."), billed=billed)
    if not isinstance(body, dict):
        return error_response(request, api, 400, error_body(api, 400, "The request body must be a JSON object."),
                              billed=billed)
    model = body.get("model")
    if not isinstance(model, str) or not model:
        return error_response(request, api, 400, error_body(api, 400, "model: field required"), billed=billed)
    status = int_header(request, "x-fake-status")
    if status is not None and status >= 400:
        return error_response(request, api, status,
                              error_body(api, status, f"fake provider error (x-fake-status: {status})"), model, billed)
    refusal = validation.validate(api, body, request.app[MODELS_KEY], counting=not billed)
    if refusal is not None:
        return error_response(request, api, refusal[0], refusal[1], model, billed)
    return body, len(raw)


async def begin(request: web.Request, api: str, id_prefix: str) -> "Ctx | web.Response":
    """A generating endpoint's first step: the parsed, billed request context with its answer id,
    or the refusal to answer with."""
    parsed = await parse(request, api)
    if isinstance(parsed, web.Response):
        return parsed
    ctx = Ctx(request, api, *parsed)
    ctx.set_id(new_id(id_prefix))
    return ctx


# --------------------------------------------------------------------------------------------
# the parsed request
# --------------------------------------------------------------------------------------------

_CAP_KEYS = ("max_tokens", "max_completion_tokens", "max_output_tokens")


def _service_tier(h: web.Request, body: dict, api: str) -> str | None:
    """The rate tier the answer says it was served at: ``x-fake-service-tier`` if given, else
    the request's. OpenAI (chat, Responses): ``service_tier`` as the API reports it (``fast`` is
    reported as ``priority``; unset or ``auto`` as ``default``). Anthropic: ``speed`` (``fast``;
    None when the request set none, and then the usage has no ``speed``)."""
    forced = h.headers.get("x-fake-service-tier")
    if forced:
        return forced
    if api in (CHAT, RESPONSES):
        asked = body.get("service_tier")
        return {"fast": "priority", "auto": "default", None: "default"}.get(asked, asked) \
            if asked is None or isinstance(asked, str) else "default"
    if api == ANTHROPIC:
        speed = body.get("speed")
        return speed if isinstance(speed, str) else None
    return None


class Ctx:
    """Everything a handler needs about one valid request, and its ledger entry.

    Token counts: ``own_input`` is the body's count, ``input_tokens`` adds what the provider
    adds itself (``context_tokens`` of a stored conversation, ``tool_input_tokens`` of server
    tool results). ``visible`` and ``reasoning`` are one choice's output tokens; ``n`` choices
    bill ``output_tokens = n * (visible + reasoning)``."""

    def __init__(self, request: web.Request, api: str, body: dict, body_len: int, billed: bool = True,
                 context_tokens: int = 0) -> None:
        h = request
        self.request = request
        self.api = api
        self.body = body
        self.model: str = body["model"]
        self.own_input = count_input_tokens(body, api, body_len)
        self.context_tokens = context_tokens
        self.tool_input_tokens = count_header(h, "x-fake-tool-input-tokens") if api in (RESPONSES, ANTHROPIC) else 0
        self.input_tokens = self.own_input + self.context_tokens + self.tool_input_tokens
        n = body.get("n") if api == CHAT else None
        self.n = n if isinstance(n, int) and not isinstance(n, bool) and n >= 1 else 1
        ignore_cap = flag(h, "x-fake-ignore-max-tokens")
        reasoning = count_header(h, "x-fake-reasoning-tokens") if api in (CHAT, RESPONSES) else 0
        self.visible, self.reasoning, self.capped = output_plan(
            {k: v for k, v in body.items() if k not in _CAP_KEYS} if ignore_cap else body,
            api, self.own_input, int_header(h, "x-fake-output-tokens"), reasoning)
        if api == EMBEDDINGS:
            self.cache_read = self.cache_write_short = self.cache_write_long = 0
        else:
            # the cache covers the prompt (the body and a stored conversation), not tool results
            long_header = {ANTHROPIC: "x-fake-cache-write-1h", RESPONSES: "x-fake-cache-write-12h"}.get(api)
            self.cache_read, self.cache_write_short, self.cache_write_long = cache_split_ttl(
                self.own_input + self.context_tokens, count_header(h, "x-fake-cache-read"),
                count_header(h, "x-fake-cache-write"),
                count_header(h, long_header) if long_header else 0)
        # audio models (chat): the audio part of the input (on top of the text the body's count
        # holds: the base64 audio is not text) and of the visible output
        self.audio_input = count_header(h, "x-fake-audio-input-tokens") if api == CHAT else 0
        self.input_tokens += self.audio_input
        self.audio_output = min(count_header(h, "x-fake-audio-output-tokens"), self.visible) if api == CHAT else 0
        self.service_tier = _service_tier(h, body, api)
        geo = body.get("inference_geo") if api == ANTHROPIC else None
        self.inference_geo: str | None = h.headers.get("x-fake-inference-geo") or (geo if isinstance(geo, str) else None)
        self.stream = body.get("stream") is True and api != EMBEDDINGS
        self.latency = _latency_s(h)
        self.cut_after = int_header(h, "x-fake-cut-after")
        self.truncate_body = int_header(h, "x-fake-truncate-body")
        self.omit_usage = flag(h, "x-fake-omit-usage")
        self.stall = ms_header(h, "x-fake-stall-after-ms") or 0.0
        self.single_write = flag(h, "x-fake-single-write")
        self.chunk_bytes = int_header(h, "x-fake-chunk-bytes")  # streams: write the bytes in pieces of this size
        error_after = int_header(h, "x-fake-stream-error-after")
        self.stream_error_after = max(0, error_after) if error_after is not None and self.stream else None
        self.failed_usage = flag(h, "x-fake-failed-usage")
        self.empty_model = flag(h, "x-fake-empty-model") and self.stream
        self.entry = self._bill(billed)

    @property
    def cache_write(self) -> int:
        return self.cache_write_short + self.cache_write_long

    @property
    def uncached_input(self) -> int:
        return self.input_tokens - self.cache_read - self.cache_write

    @property
    def output_tokens(self) -> int:
        return self.n * (self.visible + self.reasoning)

    def _bill(self, record: bool) -> dict[str, Any]:
        """The ledger entry: input billed now, output now for JSON, as written for streams."""
        e = new_entry(self.request, self.api, self.model, 200, self.stream, record)
        e["input_tokens"] = self.uncached_input
        e["cached"] = self.cache_read
        e["cache_write"] = self.cache_write
        if self.api == ANTHROPIC:
            e["cache_write_5m"], e["cache_write_1h"] = self.cache_write_short, self.cache_write_long
        elif self.api in (CHAT, RESPONSES):
            e["cache_write_30m"], e["cache_write_12h"] = self.cache_write_short, self.cache_write_long
        e["output_tokens"] = 0 if self.stream or self.api == EMBEDDINGS else self.output_tokens
        e["reasoning_tokens"] = self.n * self.reasoning
        e["n"] = self.n
        e["context_tokens"] = self.context_tokens
        e["tool_input_tokens"] = self.tool_input_tokens
        e["audio_input_tokens"], e["audio_output_tokens"] = self.audio_input, self.n * self.audio_output
        e["service_tier"], e["inference_geo"] = self.service_tier, self.inference_geo
        return e

    def set_id(self, answer_id: str) -> str:
        """Name the ledger entry after the answer's own id (call before answering)."""
        self.entry["id"] = answer_id
        return answer_id

    def headers(self) -> dict[str, str]:
        return echo_headers(self.request, self.model, self.entry["id"], self.api)

    def bill_nothing(self, error: str) -> None:
        """A failed answer the provider does not bill: every token field 0, ``error`` named."""
        e = self.entry
        for k in ("input_tokens", "output_tokens", "cached", "cache_write", "cache_write_5m", "cache_write_1h",
                  "cache_write_30m", "cache_write_12h", "reasoning_tokens", "context_tokens", "tool_input_tokens",
                  "web_search_requests", "web_fetch_requests"):
            e[k] = 0
        e["tool_calls"], e["iterations"], e["other_models"] = {}, [], []
        e["audio_input_tokens"] = e["audio_output_tokens"] = 0
        e["image_gen"] = None
        e["error"] = error


# --------------------------------------------------------------------------------------------
# writing answers and streams
# --------------------------------------------------------------------------------------------


async def sleep_total(ctx: Ctx, tokens: int | None = None) -> None:
    n = ctx.output_tokens if tokens is None else tokens
    if ctx.latency > 0 and n > 0:
        await asyncio.sleep(ctx.latency * n)


def sse_data(obj: Any) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


def sse_event(name: str, obj: Any) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + orjson.dumps(obj) + b"\n\n"


def _drop(request: web.Request) -> NoReturn:
    """Close the socket mid-body and end the handler quietly: the client sees an incomplete body
    (aiohttp treats the CancelledError as a premature disconnection and logs nothing)."""
    transport = request.transport
    if transport is not None:
        transport.close()
    raise asyncio.CancelledError()


def without_usage(api: str, payload: dict) -> dict:
    """``payload`` as sent by ``x-fake-omit-usage``: no ``usage`` key (Responses: null)."""
    if api == RESPONSES:
        return {**payload, "usage": None}
    return {k: v for k, v in payload.items() if k != "usage"}


async def answer(ctx: Ctx, payload: dict) -> web.StreamResponse:
    """Send a non-streamed 200 answer, applying the omit-usage, stall and truncate hooks; the
    ledger entry already bills the whole answer (the provider did the work either way)."""
    if ctx.omit_usage:
        payload = without_usage(ctx.api, payload)
    body = orjson.dumps(payload)
    if ctx.stall > 0:
        await asyncio.sleep(ctx.stall)
    if ctx.truncate_body is None:
        transport = ctx.request.transport  # None once a client gave up during the stall
        ctx.entry["complete"] = transport is not None and not transport.is_closing()
        return web.Response(body=body, status=200, content_type=JSON, headers=ctx.headers())
    resp = web.StreamResponse(status=200, headers=ctx.headers())
    resp.content_type = JSON
    resp.content_length = len(body)
    await resp.prepare(ctx.request)  # sends the headers at once, with the full body's length
    part = body[: max(0, ctx.truncate_body)]
    if part:
        await resp.write(part)
    _drop(ctx.request)


async def stream(ctx: Ctx, head: list[bytes], tokens: list[bytes], tail: list[bytes], head_output: int = 0,
                 error_tail: list[bytes] | None = None, on_done: Callable[[bool], None] | None = None
                 ) -> web.StreamResponse:
    """Write ``head``, then one frame per token (sleeping the token latency before each), then
    ``tail``; with ``x-fake-cut-after: N`` stop after N token frames and drop the connection.
    ``x-fake-single-write`` and ``x-fake-stall-after-ms`` change how the same bytes are sent.

    With ``x-fake-stream-error-after: N`` (and ``error_tail`` given) the stream is ``head``, N
    token frames and ``error_tail``, and ends cleanly. The ledger entry bills ``head_output``
    (tokens generated before the first visible one: reasoning, tool turns) once ``head`` is
    written, then each token frame as it is written; ``on_done(failed)`` runs once the whole
    body was sent (not after a cut or a client that went away)."""
    request = ctx.request
    resp = web.StreamResponse(status=200, headers={**_SSE_HEADERS, **ctx.headers()})
    await resp.prepare(request)
    cut = ctx.cut_after
    failed = False
    if cut is not None:
        tokens = tokens[: max(0, cut)]
        tail = []
    elif ctx.stream_error_after is not None and error_tail is not None:
        tokens = tokens[: ctx.stream_error_after]
        tail = error_tail
        failed = True
    ended = False
    try:
        if ctx.single_write:
            if ctx.latency > 0 and tokens:  # the time the model took, then everything at once
                await asyncio.sleep(ctx.latency * len(tokens))
            ctx.entry["output_tokens"] += head_output
            ended = await _write_once(ctx, resp, b"".join(head + tokens + tail), len(tokens), cut is None)
        elif ctx.chunk_bytes and ctx.chunk_bytes > 0:
            ctx.entry["output_tokens"] += head_output
            data, size = b"".join(head + tokens + tail), ctx.chunk_bytes
            for i in range(0, len(data), size):  # pieces that split events, lines, even CRLFs anywhere
                await resp.write(data[i:i + size])
                await asyncio.sleep(0.001)
            ctx.entry["output_tokens"] += len(tokens)
        elif ctx.latency <= 0:
            ctx.entry["output_tokens"] += head_output
            ended = await _write_once(ctx, resp, b"".join(head + tokens + tail), len(tokens), False)
        else:
            await _write_paced(ctx, resp, head, tokens, tail, head_output)
        if ctx.stall > 0:
            await asyncio.sleep(ctx.stall)
        if cut is not None:
            _drop(request)
        if not ended:
            await resp.write_eof()
    except ConnectionResetError:  # the client went away: bill what was written, end quietly
        raise asyncio.CancelledError() from None
    ctx.entry["complete"] = True
    if on_done is not None:
        on_done(failed)
    return resp


async def _write_once(ctx: Ctx, resp: web.StreamResponse, data: bytes, n_tokens: int, end: bool) -> bool:
    """Write ``data`` in one transport write, with the end of the chunked body when ``end`` and
    no stall is asked (so the last event and end-of-stream arrive together); True if ended."""
    end = end and ctx.stall <= 0
    if end:
        await resp.write_eof(data)
    else:
        await resp.write(data)
    ctx.entry["output_tokens"] += n_tokens
    return end


async def _write_paced(ctx: Ctx, resp: web.StreamResponse, head: list[bytes], tokens: list[bytes],
                       tail: list[bytes], head_output: int) -> None:
    """One write per token frame, each after the token latency, as a slow model streams."""
    if head:
        await resp.write(b"".join(head))
    ctx.entry["output_tokens"] += head_output
    for frame in tokens:
        await asyncio.sleep(ctx.latency)
        await resp.write(frame)
        ctx.entry["output_tokens"] += 1
    if tail:
        await resp.write(b"".join(tail))
