"""A fake OpenAI / Anthropic upstream for the demo, the tests and the benchmarks.

It speaks the wire formats the official ``openai`` and ``anthropic`` SDKs parse, answers
deterministically, echoes the model it was asked for, and logs nothing per request (it keeps a
bounded in-memory ledger of what it billed, see below, so tests have an independent oracle).

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
* ``x-fake-truncate-body: N`` (non-streamed 200 answers): send the status and headers, with the
  ``content-length`` of the *whole* body, then only the body's first N bytes, then drop the
  connection: a provider connection lost mid-body after the provider did (and billed) the work.
* ``x-fake-omit-usage: 1``: the same answer without usage. JSON: no ``usage`` key (Responses:
  ``"usage": null``, as its schema marks absent usage). Streams: chat sends no ``usage`` field in
  any chunk and no final usage chunk even with ``stream_options.include_usage``; Anthropic's
  ``message_start`` message and ``message_delta`` carry no ``usage``; Responses'
  ``response.completed`` has ``"usage": null``. The ledger still records the real tokens.
* ``x-fake-stall-after-ms: MS`` (200 answers): JSON builds the whole answer (the work is done and
  billed), then waits MS ms before sending anything, headers included, so a gateway's route
  timeout fires after the provider finished. Streams send every event, then hold the connection
  open MS ms before ending the body (or before the ``x-fake-cut-after`` drop).
* ``x-fake-single-write: 1`` (streams): after the total token latency (as a non-streamed answer
  waits), send every event and the end of the chunked body in ONE write, so a consumer sees the
  whole stream, including an overrun past ``max_tokens`` (with ``x-fake-ignore-max-tokens`` and
  ``x-fake-output-tokens``), in a single final chunk. With ``x-fake-stall-after-ms`` or
  ``x-fake-cut-after`` the events are one write and the end (or drop) follows.
* Every response echoes ``x-fake-authorization`` (the ``authorization`` header received, or ""),
  ``x-fake-api-key`` (the ``x-api-key`` header received, or ""), ``x-fake-model`` (the
  requested model, or "") and ``x-fake-header-names`` (the names of all request headers
  received, lower-case, sorted, comma-separated), so tests can prove what reached the provider.
  The four generating endpoints also echo ``x-fake-id``: the id of the answer's ledger entry.

Bad JSON or a missing ``model`` is a 400 in the provider's error shape.

Ledger (what the provider billed)
---------------------------------
Every request to the four generating endpoints (chat completions, responses, embeddings,
messages; errors included, ``count_tokens`` and ``/v1/models`` not) appends one entry, so a test
can check a gateway's accounting against the provider's own count rather than against the
gateway's parse of the answer. ``GET /_fake/ledger`` returns them as a JSON list, oldest first
(``?id=...`` / ``?request_id=...`` filter on those fields); ``DELETE /_fake/ledger`` clears it
(204). It keeps the last ``--ledger-size`` entries (default 100,000) so a benchmark cannot grow it
without bound; the ``x-fake-ledger-dropped`` response header counts entries evicted so far.
An entry::

    {"id": "chatcmpl-fake...", "api": "chat", "model": "gpt-4o", "request_id": "<x-request-id>",
     "stream": false, "input_tokens": 16, "output_tokens": 16, "cached": 0, "cache_write": 0,
     "status": 200, "complete": true, "hooks": {"x-fake-omit-usage": "1"}}

* ``id``: the answer's id (the body's ``id``; embeddings and errors get one of their own) and the
  ``x-fake-id`` response header; ``request_id``: the ``x-request-id`` request header (Envoy's
  id, which Tollgate records as ``envoy_request_id``), or "".
* ``input_tokens`` is the *uncached* input: the input count minus ``cached`` (cache reads) minus
  ``cache_write``, the convention of :class:`extproc.pricing.Usage`, so the billed cost is that
  ``Usage(input_tokens, cached_input_tokens=cached, cache_write_tokens=cache_write,
  output_tokens)`` priced.
* ``output_tokens``: what the provider generated and billed: the whole answer for JSON (also
  when truncated, stalled or its usage omitted), and for streams the token events actually
  written, so it grows while a slow stream runs and stops at an ``x-fake-cut-after`` cut or a
  client disconnect (a real provider stops generating then).
* ``status``: the HTTP status sent; errors bill nothing (all token fields 0).
* ``complete``: the whole body was handed to a live connection (false while a stream runs, and
  after a cut, a truncation, or a client that went away before the answer was sent).
* ``hooks``: every ``x-fake-*`` request header received, name to value.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import itertools
import struct
import time
from collections import deque
from typing import Any, NoReturn

import orjson
from aiohttp import web

CHAT = "chat"
RESPONSES = "responses"
EMBEDDINGS = "embeddings"
ANTHROPIC = "anthropic"

_LATENCY_KEY = web.AppKey("token_latency_ms", float)
_ids = itertools.count(1)
DEFAULT_LEDGER_SIZE = 100_000

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
# ledger
# --------------------------------------------------------------------------------------------


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


_LEDGER_KEY = web.AppKey("ledger", Ledger)


def _hooks(request: web.Request) -> dict[str, str]:
    return {k.lower(): v for k, v in request.headers.items() if k.lower().startswith("x-fake-")}


def _new_entry(request: web.Request, api: str, model: str, status: int, stream: bool,
               record: bool = True) -> dict[str, Any]:
    """A ledger entry that bills nothing yet (the caller fills in the tokens), appended to the
    ledger unless ``record`` is false (free endpoints such as ``count_tokens``)."""
    entry = {
        "id": "", "api": api, "model": model, "request_id": request.headers.get("x-request-id", ""),
        "stream": stream, "input_tokens": 0, "output_tokens": 0, "cached": 0, "cache_write": 0,
        "status": status, "complete": False, "hooks": _hooks(request),
    }
    return request.app[_LEDGER_KEY].add(entry) if record else entry


async def ledger_get(request: web.Request) -> web.Response:
    ledger = request.app[_LEDGER_KEY]
    return web.Response(body=orjson.dumps(ledger.select(dict(request.query))), content_type="application/json",
                        headers={"x-fake-ledger-dropped": str(ledger.dropped)})


async def ledger_delete(request: web.Request) -> web.Response:
    request.app[_LEDGER_KEY].clear()
    return web.Response(status=204)


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


def _echo_headers(request: web.Request, model: str, ledger_id: str = "") -> dict[str, str]:
    h = request.headers
    out = {
        "x-fake-authorization": h.get("authorization", ""),
        "x-fake-api-key": h.get("x-api-key", ""),
        "x-fake-model": model,
        "x-fake-header-names": ",".join(sorted({k.lower() for k in h.keys()})),
    }
    if ledger_id:
        out["x-fake-id"] = ledger_id
    return out


def _json(request: web.Request, model: str, payload: Any, status: int = 200, ledger_id: str = "") -> web.Response:
    headers = _echo_headers(request, model, ledger_id)
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


def _billed_error(request: web.Request, api: str, status: int, message: str, model: str = "") -> web.Response:
    """An error answer from a generating endpoint, with its (token-free) ledger entry."""
    entry = _new_entry(request, api, model, status, stream=False)
    entry["id"] = _new_id("err_fake")
    entry["complete"] = True
    return _json(request, model, error_body(api, status, message), status=status, ledger_id=entry["id"])


def _ms_header(request: web.Request, name: str) -> float | None:
    """A non-negative milliseconds header in seconds, or None when absent or malformed."""
    v = request.headers.get(name)
    if v is None:
        return None
    try:
        return max(0.0, float(v)) / 1000.0
    except ValueError:
        return None


def _flag(request: web.Request, name: str) -> bool:
    return request.headers.get(name, "") not in ("", "0")


def _latency_s(request: web.Request) -> float:
    v = _ms_header(request, "x-fake-token-latency-ms")
    return v if v is not None else request.app[_LATENCY_KEY] / 1000.0


_CAP_KEYS = ("max_tokens", "max_completion_tokens", "max_output_tokens")


class _Ctx:
    """Everything a handler needs about one parsed request, and its ledger entry."""

    __slots__ = ("request", "api", "body", "model", "input_tokens", "output_tokens", "capped",
                 "cache_read", "cache_write", "stream", "latency", "cut_after", "truncate_body",
                 "omit_usage", "stall", "single_write", "entry")

    def __init__(self, request: web.Request, api: str, body: dict, body_len: int, billed: bool = True) -> None:
        self.request = request
        self.api = api
        self.body = body
        self.model = body["model"]
        self.input_tokens = count_input_tokens(body, api, body_len)
        ignore_cap = _flag(request, "x-fake-ignore-max-tokens")
        self.output_tokens, self.capped = output_token_count(
            {k: v for k, v in body.items() if k not in _CAP_KEYS} if ignore_cap else body,
            api, self.input_tokens, _int_header(request, "x-fake-output-tokens"))
        self.cache_read, self.cache_write = cache_split(
            self.input_tokens, _int_header(request, "x-fake-cache-read") or 0,
            _int_header(request, "x-fake-cache-write") or 0)
        self.stream = body.get("stream") is True and api != EMBEDDINGS
        self.latency = _latency_s(request)
        self.cut_after = _int_header(request, "x-fake-cut-after")
        self.truncate_body = _int_header(request, "x-fake-truncate-body")
        self.omit_usage = _flag(request, "x-fake-omit-usage")
        self.stall = _ms_header(request, "x-fake-stall-after-ms") or 0.0
        self.single_write = _flag(request, "x-fake-single-write")
        self.entry = self._bill(billed)

    def _bill(self, record: bool) -> dict[str, Any]:
        """The ledger entry: input billed now, output now for JSON, as written for streams."""
        entry = _new_entry(self.request, self.api, self.model, 200, self.stream, record)
        entry["input_tokens"] = self.input_tokens - self.cache_read - self.cache_write
        entry["cached"] = self.cache_read
        entry["cache_write"] = self.cache_write
        entry["output_tokens"] = 0 if self.stream or self.api == EMBEDDINGS else self.output_tokens
        return entry

    def set_id(self, answer_id: str) -> str:
        """Name the ledger entry after the answer's own id (call before answering)."""
        self.entry["id"] = answer_id
        return answer_id

    def headers(self) -> dict[str, str]:
        return _echo_headers(self.request, self.model, self.entry["id"])


async def _parse(request: web.Request, api: str, billed: bool = True) -> _Ctx | web.Response:
    """Parse the body, or answer an error (bad JSON, missing model, ``x-fake-status``); the
    request gets a ledger entry unless ``billed`` is false."""
    error = _billed_error if billed else _error
    raw = await request.read()
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return error(request, api, 400, "We could not parse the JSON body of your request.")
    if not isinstance(body, dict):
        return error(request, api, 400, "The request body must be a JSON object.")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        return error(request, api, 400, "model: field required")
    status = _int_header(request, "x-fake-status")
    if status is not None and status >= 400:
        return error(request, api, status, f"fake provider error (x-fake-status: {status})", model)
    return _Ctx(request, api, body, len(raw), billed)


async def _sleep_total(ctx: _Ctx) -> None:
    if ctx.latency > 0 and ctx.output_tokens > 0:
        await asyncio.sleep(ctx.latency * ctx.output_tokens)


def _sse_data(obj: Any) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


def _sse_event(name: str, obj: Any) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + orjson.dumps(obj) + b"\n\n"


def _drop(request: web.Request) -> NoReturn:
    """Close the socket mid-body and end the handler quietly: the client sees an incomplete body
    (aiohttp treats the CancelledError as a premature disconnection and logs nothing)."""
    transport = request.transport
    if transport is not None:
        transport.close()
    raise asyncio.CancelledError()


def _without_usage(api: str, payload: dict) -> dict:
    """``payload`` as sent by ``x-fake-omit-usage``: no ``usage`` key (Responses: null)."""
    if api == RESPONSES:
        return {**payload, "usage": None}
    return {k: v for k, v in payload.items() if k != "usage"}


async def _answer(ctx: _Ctx, payload: dict) -> web.StreamResponse:
    """Send a non-streamed 200 answer, applying the omit-usage, stall and truncate hooks; the
    ledger entry already bills the whole answer (the provider did the work either way)."""
    if ctx.omit_usage:
        payload = _without_usage(ctx.api, payload)
    body = orjson.dumps(payload)
    if ctx.stall > 0:
        await asyncio.sleep(ctx.stall)
    if ctx.truncate_body is None:
        transport = ctx.request.transport  # None once a client gave up during the stall
        ctx.entry["complete"] = transport is not None and not transport.is_closing()
        return web.Response(body=body, status=200, content_type=_JSON, headers=ctx.headers())
    resp = web.StreamResponse(status=200, headers=ctx.headers())
    resp.content_type = _JSON
    resp.content_length = len(body)
    await resp.prepare(ctx.request)  # sends the headers at once, with the full body's length
    part = body[: max(0, ctx.truncate_body)]
    if part:
        await resp.write(part)
    _drop(ctx.request)


async def _stream(ctx: _Ctx, head: list[bytes], tokens: list[bytes], tail: list[bytes]) -> web.StreamResponse:
    """Write ``head``, then one frame per token (sleeping the token latency before each), then
    ``tail``; with ``x-fake-cut-after: N`` stop after N token frames and drop the connection.
    ``x-fake-single-write`` and ``x-fake-stall-after-ms`` change how the same bytes are sent.
    The ledger entry counts the token frames as they are written."""
    request = ctx.request
    resp = web.StreamResponse(status=200, headers={**_SSE_HEADERS, **ctx.headers()})
    await resp.prepare(request)
    cut = ctx.cut_after
    if cut is not None:
        tokens = tokens[: max(0, cut)]
        tail = []
    ended = False
    try:
        if ctx.single_write:
            if ctx.latency > 0 and tokens:  # the time the model took, then everything at once
                await asyncio.sleep(ctx.latency * len(tokens))
            ended = await _write_once(ctx, resp, b"".join(head + tokens + tail), len(tokens), cut is None)
        elif ctx.latency <= 0:
            ended = await _write_once(ctx, resp, b"".join(head + tokens + tail), len(tokens), False)
        else:
            await _write_paced(ctx, resp, head, tokens, tail)
        if ctx.stall > 0:
            await asyncio.sleep(ctx.stall)
        if cut is not None:
            _drop(request)
        if not ended:
            await resp.write_eof()
    except ConnectionResetError:  # the client went away: bill what was written, end quietly
        raise asyncio.CancelledError() from None
    ctx.entry["complete"] = True
    return resp


async def _write_once(ctx: _Ctx, resp: web.StreamResponse, data: bytes, n_tokens: int, end: bool) -> bool:
    """Write ``data`` in one transport write, with the end of the chunked body when ``end`` and
    no stall is asked (so the last event and end-of-stream arrive together); True if ended."""
    end = end and ctx.stall <= 0
    if end:
        await resp.write_eof(data)
    else:
        await resp.write(data)
    ctx.entry["output_tokens"] += n_tokens
    return end


async def _write_paced(ctx: _Ctx, resp: web.StreamResponse, head: list[bytes], tokens: list[bytes],
                       tail: list[bytes]) -> None:
    """One write per token frame, each after the token latency, as a slow model streams."""
    if head:
        await resp.write(b"".join(head))
    for frame in tokens:
        await asyncio.sleep(ctx.latency)
        await resp.write(frame)
        ctx.entry["output_tokens"] += 1
    if tail:
        await resp.write(b"".join(tail))


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
    cid = ctx.set_id(_new_id("chatcmpl-fake"))
    created = int(time.time())
    finish = "length" if ctx.capped else "stop"
    words = output_words(ctx.output_tokens)
    if not ctx.stream:
        await _sleep_total(ctx)
        return await _answer(ctx, {
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
    include_usage = isinstance(so, dict) and so.get("include_usage") is True and not ctx.omit_usage
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
    rid, mid = ctx.set_id(f"resp_fake{n:024x}"), f"msg_fake{n:024x}"
    created = int(time.time())
    words = output_words(ctx.output_tokens)
    text = "".join(words)
    part_done = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
    item_done = {"id": mid, "type": "message", "status": "completed", "role": "assistant", "content": [part_done]}
    if not ctx.stream:
        await _sleep_total(ctx)
        return await _answer(ctx, _response_obj(ctx, rid, created, "completed", [item_done],
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
            "response": _response_obj(ctx, rid, created, "completed", [item_done],
                                      None if ctx.omit_usage else _responses_usage(ctx))}),
    ]
    return await _stream(ctx, head, tokens, tail)


# --------------------------------------------------------------------------------------------
# OpenAI embeddings, models
# --------------------------------------------------------------------------------------------


async def embeddings(request: web.Request) -> web.StreamResponse:
    ctx = await _parse(request, EMBEDDINGS)
    if isinstance(ctx, web.Response):
        return ctx
    ctx.set_id(_new_id("embd-fake"))
    as_b64 = ctx.body.get("encoding_format") == "base64"
    data = []
    for i, item in enumerate(_embedding_inputs(ctx.body.get("input"))):
        vec: Any = embedding_vector(item)
        if as_b64:
            vec = base64.b64encode(struct.pack("<8f", *vec)).decode()
        data.append({"object": "embedding", "index": i, "embedding": vec})
    return await _answer(ctx, {
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
    mid = ctx.set_id(_new_id("msg_fake"))
    words = output_words(ctx.output_tokens)
    stop = "max_tokens" if ctx.capped else "end_turn"
    if not ctx.stream:
        await _sleep_total(ctx)
        return await _answer(ctx, {
            "id": mid,
            "type": "message",
            "role": "assistant",
            "model": ctx.model,
            "content": [{"type": "text", "text": "".join(words)}],
            "stop_reason": stop,
            "stop_sequence": None,
            "usage": _anthropic_usage(ctx, ctx.output_tokens),
        })
    start = {"id": mid, "type": "message", "role": "assistant", "model": ctx.model, "content": [],
             "stop_reason": None, "stop_sequence": None, "usage": _anthropic_usage(ctx, 1)}
    message_delta = {"type": "message_delta", "delta": {"stop_reason": stop, "stop_sequence": None},
                     "usage": {"output_tokens": ctx.output_tokens}}
    if ctx.omit_usage:
        start, message_delta = _without_usage(ANTHROPIC, start), _without_usage(ANTHROPIC, message_delta)
    head = [
        _sse_event("message_start", {"type": "message_start", "message": start}),
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
        _sse_event("message_delta", message_delta),
        _sse_event("message_stop", {"type": "message_stop"}),
    ]
    return await _stream(ctx, head, tokens, tail)


async def count_tokens(request: web.Request) -> web.StreamResponse:
    ctx = await _parse(request, ANTHROPIC, billed=False)
    if isinstance(ctx, web.Response):
        return ctx
    return _json(request, ctx.model, {"input_tokens": ctx.input_tokens})


# --------------------------------------------------------------------------------------------
# app and entry point
# --------------------------------------------------------------------------------------------


def build_app(token_latency_ms: float = 0.0, ledger_size: int = DEFAULT_LEDGER_SIZE) -> web.Application:
    """The aiohttp application; ``token_latency_ms`` is the default per-token stream latency,
    ``ledger_size`` the number of ledger entries kept (the oldest are evicted)."""
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app[_LATENCY_KEY] = float(token_latency_ms)
    app[_LEDGER_KEY] = Ledger(ledger_size)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/responses", responses)
    app.router.add_post("/v1/embeddings", embeddings)
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/messages", messages)
    app.router.add_post("/v1/messages/count_tokens", count_tokens)
    app.router.add_get("/_fake/ledger", ledger_get)
    app.router.add_delete("/_fake/ledger", ledger_delete)
    app.router.add_route("*", "/{tail:.*}", not_found)
    return app


def main(argv: list[str] | None = None) -> None:
    """``python -m extproc.fakeprovider --port N [--host H] [--token-latency-ms F] [--ledger-size N]``."""
    parser = argparse.ArgumentParser(prog="python -m extproc.fakeprovider", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--token-latency-ms", type=float, default=0.0)
    parser.add_argument("--ledger-size", type=int, default=DEFAULT_LEDGER_SIZE,
                        help="ledger entries kept in memory (GET /_fake/ledger); the oldest are evicted")
    args = parser.parse_args(argv)
    try:
        import uvloop
    except ImportError:
        uvloop = None  # type: ignore[assignment]
    loop = uvloop.new_event_loop() if uvloop is not None else asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    web.run_app(
        build_app(args.token_latency_ms, args.ledger_size),
        host=args.host,
        port=args.port,
        access_log=None,
        print=None,
        shutdown_timeout=1.0,
        loop=loop,
    )


if __name__ == "__main__":
    main()
