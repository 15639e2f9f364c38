"""A fake OpenAI / Anthropic upstream for the demo, the tests and the benchmarks.

It speaks the wire formats the official ``openai`` and ``anthropic`` SDKs parse, answers
deterministically, echoes the model it was asked for, and logs nothing per request.

Endpoints
---------
``POST /v1/chat/completions`` (plain and ``"stream": true``), ``POST /v1/responses`` (plain and
stream), ``POST /v1/embeddings``, ``GET /v1/models``, ``POST /v1/messages`` (Anthropic, plain and
stream) and ``POST /v1/messages/count_tokens``. Anything else is a 404 in OpenAI's error shape.

Token counting (see :func:`count_input_tokens` and :func:`output_token_count`)
-------------------------------------------------------------------------------
* **Input tokens**: every text in the request counts ``ceil(len(text.encode()) / 4)`` tokens,
  and every message counts 3 more. Texts are: message ``content`` (a string, or a list of parts
  whose ``text`` strings count, recursing into a part's nested ``content`` as in Anthropic
  ``tool_result``), the Anthropic ``system`` prompt (string or text blocks; not a message),
  Responses ``instructions`` and ``input`` (a string is one text and no message; each list item
  with ``content`` is a message), and embedding ``input`` strings (no per-message overhead;
  pre-tokenised integer inputs count one token per integer). The total is clamped to the
  request body's byte length, so it never exceeds it (a gateway may use body bytes as an upper
  bound; with the formula above the clamp is never reached for real requests).
* **Output tokens**: ``min(cap, default)``; ``cap`` is ``max_tokens`` / ``max_completion_tokens``
  (chat, Anthropic) or ``max_output_tokens`` (Responses) when given; ``default`` is
  ``16 + input_tokens % 16``, or the ``x-fake-output-tokens: N`` request header (still capped).
  The output text is the words ``tok0 tok1 ... tok{N-1}``, one word per token; each streamed
  delta is one word (``"tok0"``, ``" tok1"``, ...), so the deltas concatenate to the text.
  When the cap cut the output short: chat ``finish_reason`` is ``"length"`` and Anthropic
  ``stop_reason`` is ``"max_tokens"`` (Responses stays ``"completed"``).
* **Cache tokens**: request headers ``x-fake-cache-read: N`` and ``x-fake-cache-write: N``
  (default 0). Reads are capped at the input tokens, writes at what is left after reads.
  OpenAI: ``prompt_tokens`` / ``input_tokens`` are the whole input, cached reads are reported in
  ``cached_tokens`` (writes in ``cache_write_tokens``: always in Responses, in chat only when
  non-zero). Anthropic: ``input_tokens`` excludes both, which are reported in
  ``cache_read_input_tokens`` / ``cache_creation_input_tokens`` (the three add up to the count).
* Embeddings: ``prompt_tokens == total_tokens ==`` input tokens; each input gets 8
  deterministic floats in [-1, 1] derived from a BLAKE2b hash of the input.

Test hooks (request headers)
----------------------------
* ``x-fake-token-latency-ms: F`` (or the server-wide ``--token-latency-ms``): sleep F ms before
  each streamed token, or ``N * F`` ms once before a non-streamed answer. With no latency a
  stream is written in one go (same bytes, fewer writes).
* ``x-fake-status: 429`` (any status >= 400): answer with that status and an error body in the
  provider's shape (OpenAI ``{"error": {"message", "type", "param", "code"}}``, Anthropic
  ``{"type": "error", "error": {"type", "message"}}``), no usage. Applies to streams too (the
  error comes before any event).
* ``x-fake-ignore-max-tokens: 1``: ignore the request's output cap (``max_tokens`` and friends)
  and answer ``default`` tokens (above), like a provider that overruns or never saw the cap.
  Usage reports the tokens actually sent.
* ``x-fake-cut-after: N`` (streams only): send the preamble events and N token events, then close
  the connection without finishing the chunked body: no final usage / stop events, and the
  client sees an incomplete body.
* Every response echoes ``x-fake-authorization`` (the ``authorization`` header received, or ""),
  ``x-fake-api-key`` (the ``x-api-key`` header received, or ""), ``x-fake-model`` (the
  requested model, or "") and ``x-fake-header-names`` (the names of all request headers
  received, lower-case, sorted, comma-separated), so tests can prove what reached the provider.

Bad JSON or a missing ``model`` is a 400 in the provider's error shape.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import itertools
import struct
import time
from typing import Any

import orjson
from aiohttp import web

CHAT = "chat"
RESPONSES = "responses"
EMBEDDINGS = "embeddings"
ANTHROPIC = "anthropic"

_LATENCY_KEY = web.AppKey("token_latency_ms", float)
_ids = itertools.count(1)

MODELS = ("gpt-4o", "gpt-4o-mini", "o3-mini", "text-embedding-3-small", "claude-sonnet-4-6", "claude-haiku-4-5")

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


def _embedding_inputs(inp: Any) -> list[Any]:
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


def count_input_tokens(body: dict, api: str, body_len: int | None = None) -> int:
    """Input tokens of a parsed request ``body`` for ``api`` (``"chat"``, ``"responses"``,
    ``"embeddings"`` or ``"anthropic"``); clamped to ``body_len`` (the body's byte length,
    defaults to the orjson encoding of ``body``)."""
    if api == CHAT:
        n = _messages_tokens(body.get("messages"))
    elif api == ANTHROPIC:
        n = _content_tokens(body.get("system")) + _messages_tokens(body.get("messages"))
    elif api == RESPONSES:
        n = 0
        instructions = body.get("instructions")
        if isinstance(instructions, str):
            n += text_tokens(instructions)
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
        n = sum(_embedding_input_tokens(x) for x in _embedding_inputs(body.get("input")))
    else:
        raise ValueError(f"unknown api {api!r}")
    if body_len is None:
        body_len = len(orjson.dumps(body))
    return min(n, body_len)


def output_token_count(body: dict, api: str, input_tokens: int, override: int | None = None) -> tuple[int, bool]:
    """``(output_tokens, capped)``: ``min(cap, default)`` where default is ``override`` (the
    ``x-fake-output-tokens`` header) or ``16 + input_tokens % 16``; ``capped`` is true when the
    cap cut the output short."""
    default = override if override is not None else 16 + input_tokens % 16
    default = max(0, default)
    keys = ("max_output_tokens",) if api == RESPONSES else ("max_completion_tokens", "max_tokens")
    cap = None
    for k in keys:
        v = body.get(k)
        if isinstance(v, int) and not isinstance(v, bool):
            cap = v
            break
    if cap is not None and cap < default:
        return max(0, cap), True
    return default, False


def cache_split(input_tokens: int, read: int, write: int) -> tuple[int, int]:
    """``(cache_read, cache_write)``: reads capped at the input, writes at what is left."""
    r = min(max(0, read), input_tokens)
    w = min(max(0, write), input_tokens - r)
    return r, w


def output_words(n: int) -> list[str]:
    """The streamed deltas: ``["tok0", " tok1", ...]``; joined they are the output text."""
    return ["tok0" if i == 0 else f" tok{i}" for i in range(n)]


def embedding_vector(item: Any) -> list[float]:
    """8 deterministic floats in [-1, 1] for one embedding input."""
    raw = item.encode() if isinstance(item, str) else orjson.dumps(item)
    digest = hashlib.blake2b(raw, digest_size=16).digest()
    return [round(v / 32767.5 - 1.0, 6) for v in struct.unpack("<8H", digest)]


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------

_JSON = "application/json"
_SSE_HEADERS = {"content-type": "text/event-stream; charset=utf-8", "cache-control": "no-cache"}


def _int_header(request: web.Request, name: str) -> int | None:
    v = request.headers.get(name)
    if v is None:
        return None
    try:
        return int(v)
    except ValueError:
        return None


def _echo_headers(request: web.Request, model: str) -> dict[str, str]:
    h = request.headers
    return {
        "x-fake-authorization": h.get("authorization", ""),
        "x-fake-api-key": h.get("x-api-key", ""),
        "x-fake-model": model,
        "x-fake-header-names": ",".join(sorted({k.lower() for k in h.keys()})),
    }


def _json(request: web.Request, model: str, payload: Any, status: int = 200) -> web.Response:
    headers = _echo_headers(request, model)
    return web.Response(body=orjson.dumps(payload), status=status, content_type=_JSON, headers=headers)


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
    """An error body in the provider's shape."""
    if api == ANTHROPIC:
        etype = _ANTHROPIC_ERR.get(status, "api_error" if status >= 500 else "invalid_request_error")
        return {"type": "error", "error": {"type": etype, "message": message}}
    etype, code = _OPENAI_ERR.get(status, ("server_error" if status >= 500 else "invalid_request_error", None))
    return {"error": {"message": message, "type": etype, "param": None, "code": code}}


def _error(request: web.Request, api: str, status: int, message: str, model: str = "") -> web.Response:
    return _json(request, model, error_body(api, status, message), status=status)


def _latency_s(request: web.Request) -> float:
    v = request.headers.get("x-fake-token-latency-ms")
    if v is not None:
        try:
            return max(0.0, float(v)) / 1000.0
        except ValueError:
            pass
    return request.app[_LATENCY_KEY] / 1000.0


_CAP_KEYS = ("max_tokens", "max_completion_tokens", "max_output_tokens")


class _Ctx:
    """Everything a handler needs about one parsed request."""

    __slots__ = ("request", "api", "body", "model", "input_tokens", "output_tokens", "capped",
                 "cache_read", "cache_write", "stream", "latency", "cut_after")

    def __init__(self, request: web.Request, api: str, body: dict, body_len: int) -> None:
        self.request = request
        self.api = api
        self.body = body
        self.model = body["model"]
        self.input_tokens = count_input_tokens(body, api, body_len)
        ignore_cap = request.headers.get("x-fake-ignore-max-tokens", "") not in ("", "0")
        self.output_tokens, self.capped = output_token_count(
            {k: v for k, v in body.items() if k not in _CAP_KEYS} if ignore_cap else body,
            api, self.input_tokens, _int_header(request, "x-fake-output-tokens"))
        self.cache_read, self.cache_write = cache_split(
            self.input_tokens, _int_header(request, "x-fake-cache-read") or 0,
            _int_header(request, "x-fake-cache-write") or 0)
        self.stream = body.get("stream") is True
        self.latency = _latency_s(request)
        self.cut_after = _int_header(request, "x-fake-cut-after")


async def _parse(request: web.Request, api: str) -> _Ctx | web.Response:
    """Parse the body, or answer an error (bad JSON, missing model, ``x-fake-status``)."""
    raw = await request.read()
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return _error(request, api, 400, "We could not parse the JSON body of your request.")
    if not isinstance(body, dict):
        return _error(request, api, 400, "The request body must be a JSON object.")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        return _error(request, api, 400, "model: field required")
    status = _int_header(request, "x-fake-status")
    if status is not None and status >= 400:
        return _error(request, api, status, f"fake provider error (x-fake-status: {status})", model)
    return _Ctx(request, api, body, len(raw))


async def _sleep_total(ctx: _Ctx) -> None:
    if ctx.latency > 0 and ctx.output_tokens > 0:
        await asyncio.sleep(ctx.latency * ctx.output_tokens)


def _sse_data(obj: Any) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


def _sse_event(name: str, obj: Any) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + orjson.dumps(obj) + b"\n\n"


async def _stream(ctx: _Ctx, head: list[bytes], tokens: list[bytes], tail: list[bytes]) -> web.StreamResponse:
    """Write ``head``, then one frame per token (sleeping the token latency before each), then
    ``tail``; with ``x-fake-cut-after: N`` stop after N token frames and drop the connection."""
    request = ctx.request
    resp = web.StreamResponse(status=200, headers={**_SSE_HEADERS, **_echo_headers(request, ctx.model)})
    await resp.prepare(request)
    cut = ctx.cut_after
    if cut is not None:
        tokens = tokens[: max(0, cut)]
        tail = []
    if ctx.latency <= 0:
        await resp.write(b"".join(head + tokens + tail))
    else:
        if head:
            await resp.write(b"".join(head))
        for frame in tokens:
            await asyncio.sleep(ctx.latency)
            await resp.write(frame)
        if tail:
            await resp.write(b"".join(tail))
    if cut is not None:
        # Close the socket without the chunked terminator: the client sees an incomplete body.
        transport = request.transport
        if transport is not None:
            transport.close()
        raise asyncio.CancelledError()
    await resp.write_eof()
    return resp


def _new_id(prefix: str) -> str:
    return f"{prefix}{next(_ids):024x}"


# --------------------------------------------------------------------------------------------
# OpenAI chat completions
# --------------------------------------------------------------------------------------------


def _chat_usage(ctx: _Ctx) -> dict:
    details: dict[str, int] = {"cached_tokens": ctx.cache_read}
    if ctx.cache_write:
        details["cache_write_tokens"] = ctx.cache_write
    return {
        "prompt_tokens": ctx.input_tokens,
        "completion_tokens": ctx.output_tokens,
        "total_tokens": ctx.input_tokens + ctx.output_tokens,
        "prompt_tokens_details": details,
        "completion_tokens_details": {"reasoning_tokens": 0},
    }


async def chat_completions(request: web.Request) -> web.StreamResponse:
    ctx = await _parse(request, CHAT)
    if isinstance(ctx, web.Response):
        return ctx
    cid = _new_id("chatcmpl-fake")
    created = int(time.time())
    finish = "length" if ctx.capped else "stop"
    words = output_words(ctx.output_tokens)
    if not ctx.stream:
        await _sleep_total(ctx)
        return _json(request, ctx.model, {
            "id": cid,
            "object": "chat.completion",
            "created": created,
            "model": ctx.model,
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": "".join(words), "refusal": None, "annotations": []},
                "logprobs": None,
                "finish_reason": finish,
            }],
            "usage": _chat_usage(ctx),
            "service_tier": "default",
            "system_fingerprint": "fp_fake",
        })
    so = ctx.body.get("stream_options")
    include_usage = isinstance(so, dict) and so.get("include_usage") is True
    base = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": ctx.model,
            "service_tier": "default", "system_fingerprint": "fp_fake"}
    if include_usage:
        base["usage"] = None

    def chunk(delta: dict, finish_reason: str | None) -> bytes:
        return _sse_data({**base, "choices": [
            {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]})

    tokens = [chunk({"role": "assistant", "content": w} if i == 0 else {"content": w}, None)
              for i, w in enumerate(words)]
    tail = [chunk({} if words else {"role": "assistant", "content": ""}, finish)]
    if include_usage:
        tail.append(_sse_data({**base, "choices": [], "usage": _chat_usage(ctx)}))
    tail.append(b"data: [DONE]\n\n")
    return await _stream(ctx, [], tokens, tail)


# --------------------------------------------------------------------------------------------
# OpenAI responses
# --------------------------------------------------------------------------------------------


def _responses_usage(ctx: _Ctx) -> dict:
    return {
        "input_tokens": ctx.input_tokens,
        "input_tokens_details": {"cached_tokens": ctx.cache_read, "cache_write_tokens": ctx.cache_write},
        "output_tokens": ctx.output_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": ctx.input_tokens + ctx.output_tokens,
    }


def _response_obj(ctx: _Ctx, rid: str, created: int, status: str, output: list, usage: dict | None) -> dict:
    b = ctx.body
    return {
        "id": rid,
        "object": "response",
        "created_at": created,
        "status": status,
        "background": False,
        "error": None,
        "incomplete_details": None,
        "instructions": b.get("instructions"),
        "max_output_tokens": b.get("max_output_tokens"),
        "metadata": b.get("metadata") or {},
        "model": ctx.model,
        "output": output,
        "parallel_tool_calls": True,
        "previous_response_id": b.get("previous_response_id"),
        "reasoning": {"effort": None, "summary": None},
        "service_tier": "default",
        "store": b.get("store", True),
        "temperature": b.get("temperature", 1.0),
        "text": {"format": {"type": "text"}},
        "tool_choice": "auto",
        "tools": [],
        "top_p": b.get("top_p", 1.0),
        "truncation": "disabled",
        "usage": usage,
        "user": None,
    }


async def responses(request: web.Request) -> web.StreamResponse:
    ctx = await _parse(request, RESPONSES)
    if isinstance(ctx, web.Response):
        return ctx
    n = next(_ids)
    rid, mid = f"resp_fake{n:024x}", f"msg_fake{n:024x}"
    created = int(time.time())
    words = output_words(ctx.output_tokens)
    text = "".join(words)
    part_done = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
    item_done = {"id": mid, "type": "message", "status": "completed", "role": "assistant", "content": [part_done]}
    if not ctx.stream:
        await _sleep_total(ctx)
        return _json(request, ctx.model, _response_obj(ctx, rid, created, "completed", [item_done],
                                                       _responses_usage(ctx)))
    seq = itertools.count()
    pending = _response_obj(ctx, rid, created, "in_progress", [], None)
    head = [
        _sse_event("response.created", {"type": "response.created", "sequence_number": next(seq),
                                         "response": pending}),
        _sse_event("response.in_progress", {"type": "response.in_progress", "sequence_number": next(seq),
                                            "response": pending}),
        _sse_event("response.output_item.added", {
            "type": "response.output_item.added", "sequence_number": next(seq), "output_index": 0,
            "item": {"id": mid, "type": "message", "status": "in_progress", "role": "assistant", "content": []}}),
        _sse_event("response.content_part.added", {
            "type": "response.content_part.added", "sequence_number": next(seq), "item_id": mid,
            "output_index": 0, "content_index": 0,
            "part": {"type": "output_text", "text": "", "annotations": [], "logprobs": []}}),
    ]
    tokens = [
        _sse_event("response.output_text.delta", {
            "type": "response.output_text.delta", "sequence_number": next(seq), "item_id": mid,
            "output_index": 0, "content_index": 0, "delta": w, "logprobs": []})
        for w in words
    ]
    tail = [
        _sse_event("response.output_text.done", {
            "type": "response.output_text.done", "sequence_number": next(seq), "item_id": mid,
            "output_index": 0, "content_index": 0, "text": text, "logprobs": []}),
        _sse_event("response.content_part.done", {
            "type": "response.content_part.done", "sequence_number": next(seq), "item_id": mid,
            "output_index": 0, "content_index": 0, "part": part_done}),
        _sse_event("response.output_item.done", {
            "type": "response.output_item.done", "sequence_number": next(seq), "output_index": 0,
            "item": item_done}),
        _sse_event("response.completed", {
            "type": "response.completed", "sequence_number": next(seq),
            "response": _response_obj(ctx, rid, created, "completed", [item_done], _responses_usage(ctx))}),
    ]
    return await _stream(ctx, head, tokens, tail)


# --------------------------------------------------------------------------------------------
# OpenAI embeddings, models
# --------------------------------------------------------------------------------------------


async def embeddings(request: web.Request) -> web.StreamResponse:
    ctx = await _parse(request, EMBEDDINGS)
    if isinstance(ctx, web.Response):
        return ctx
    as_b64 = ctx.body.get("encoding_format") == "base64"
    data = []
    for i, item in enumerate(_embedding_inputs(ctx.body.get("input"))):
        vec: Any = embedding_vector(item)
        if as_b64:
            vec = base64.b64encode(struct.pack("<8f", *vec)).decode()
        data.append({"object": "embedding", "index": i, "embedding": vec})
    return _json(request, ctx.model, {
        "object": "list",
        "data": data,
        "model": ctx.model,
        "usage": {"prompt_tokens": ctx.input_tokens, "total_tokens": ctx.input_tokens},
    })


_MODELS_BODY = orjson.dumps({
    "object": "list",
    "data": [{"id": m, "object": "model", "created": 1700000000,
              "owned_by": "anthropic" if m.startswith("claude") else "openai"} for m in MODELS],
})


async def models(request: web.Request) -> web.Response:
    return web.Response(body=_MODELS_BODY, content_type=_JSON, headers=_echo_headers(request, ""))


async def not_found(request: web.Request) -> web.Response:
    body = error_body(CHAT, 404, f"Invalid URL ({request.method} {request.path})")
    body["error"]["code"] = None
    return _json(request, "", body, status=404)


# --------------------------------------------------------------------------------------------
# Anthropic messages
# --------------------------------------------------------------------------------------------


def _anthropic_usage(ctx: _Ctx, output_tokens: int) -> dict:
    return {
        "input_tokens": ctx.input_tokens - ctx.cache_read - ctx.cache_write,
        "cache_creation_input_tokens": ctx.cache_write,
        "cache_read_input_tokens": ctx.cache_read,
        "output_tokens": output_tokens,
        "service_tier": "standard",
    }


async def messages(request: web.Request) -> web.StreamResponse:
    ctx = await _parse(request, ANTHROPIC)
    if isinstance(ctx, web.Response):
        return ctx
    mid = _new_id("msg_fake")
    words = output_words(ctx.output_tokens)
    stop = "max_tokens" if ctx.capped else "end_turn"
    if not ctx.stream:
        await _sleep_total(ctx)
        return _json(request, ctx.model, {
            "id": mid,
            "type": "message",
            "role": "assistant",
            "model": ctx.model,
            "content": [{"type": "text", "text": "".join(words)}],
            "stop_reason": stop,
            "stop_sequence": None,
            "usage": _anthropic_usage(ctx, ctx.output_tokens),
        })
    head = [
        _sse_event("message_start", {"type": "message_start", "message": {
            "id": mid, "type": "message", "role": "assistant", "model": ctx.model, "content": [],
            "stop_reason": None, "stop_sequence": None, "usage": _anthropic_usage(ctx, 1)}}),
        _sse_event("content_block_start", {"type": "content_block_start", "index": 0,
                                           "content_block": {"type": "text", "text": ""}}),
        _sse_event("ping", {"type": "ping"}),
    ]
    tokens = [
        _sse_event("content_block_delta", {"type": "content_block_delta", "index": 0,
                                           "delta": {"type": "text_delta", "text": w}})
        for w in words
    ]
    tail = [
        _sse_event("content_block_stop", {"type": "content_block_stop", "index": 0}),
        _sse_event("message_delta", {"type": "message_delta",
                                     "delta": {"stop_reason": stop, "stop_sequence": None},
                                     "usage": {"output_tokens": ctx.output_tokens}}),
        _sse_event("message_stop", {"type": "message_stop"}),
    ]
    return await _stream(ctx, head, tokens, tail)


async def count_tokens(request: web.Request) -> web.StreamResponse:
    ctx = await _parse(request, ANTHROPIC)
    if isinstance(ctx, web.Response):
        return ctx
    return _json(request, ctx.model, {"input_tokens": ctx.input_tokens})


# --------------------------------------------------------------------------------------------
# app and entry point
# --------------------------------------------------------------------------------------------


def build_app(token_latency_ms: float = 0.0) -> web.Application:
    """The aiohttp application; ``token_latency_ms`` is the default per-token stream latency."""
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app[_LATENCY_KEY] = float(token_latency_ms)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/responses", responses)
    app.router.add_post("/v1/embeddings", embeddings)
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/messages", messages)
    app.router.add_post("/v1/messages/count_tokens", count_tokens)
    app.router.add_route("*", "/{tail:.*}", not_found)
    return app


def main(argv: list[str] | None = None) -> None:
    """``python -m extproc.fakeprovider --port N [--host H] [--token-latency-ms F]``."""
    parser = argparse.ArgumentParser(prog="python -m extproc.fakeprovider", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--token-latency-ms", type=float, default=0.0)
    args = parser.parse_args(argv)
    try:
        import uvloop
    except ImportError:
        uvloop = None  # type: ignore[assignment]
    loop = uvloop.new_event_loop() if uvloop is not None else asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    web.run_app(
        build_app(args.token_latency_ms),
        host=args.host,
        port=args.port,
        access_log=None,
        print=None,
        shutdown_timeout=1.0,
        loop=loop,
    )


if __name__ == "__main__":
    main()
