"""The fake's OpenAI endpoints: chat completions, Responses (with stored responses for
``previous_response_id``), embeddings, models. Shapes follow the ``openai`` SDK's types
(``types/chat``, ``types/responses``, ``types/completion_usage.py``) and OpenAI's OpenAPI spec."""

from __future__ import annotations

import base64
import itertools
import struct
import time
from collections import OrderedDict
from typing import Any

import orjson
from aiohttp import web

from .core import (
    CHAT,
    EMBEDDINGS,
    JSON,
    MODELS_KEY,
    RESPONSES,
    Ctx,
    answer,
    begin,
    count_header,
    echo_headers,
    embedding_inputs,
    embedding_vector,
    error_body,
    error_response,
    instructions_tokens,
    json_response,
    new_id,
    openai_error,
    output_words,
    parse,
    sleep_total,
    sse_data,
    sse_event,
    stream,
)
from .ledger import DEFAULT_LEDGER_SIZE

# the error OpenAI sends mid-stream when the model fails after the 200 went out
STREAM_ERROR_MESSAGE = "The server had an error while processing your request. Sorry about that!"


# --------------------------------------------------------------------------------------------
# chat completions
# --------------------------------------------------------------------------------------------


def chat_usage(ctx: Ctx) -> dict:
    details: dict[str, int] = {"cached_tokens": ctx.cache_read, "audio_tokens": ctx.audio_input}
    if ctx.cache_write:
        details["cache_write_tokens"] = ctx.cache_write
    return {
        "prompt_tokens": ctx.input_tokens,
        "completion_tokens": ctx.output_tokens,
        "total_tokens": ctx.input_tokens + ctx.output_tokens,
        "prompt_tokens_details": details,
        "completion_tokens_details": {"reasoning_tokens": ctx.n * ctx.reasoning, "audio_tokens": ctx.n * ctx.audio_output,
                                      "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0},
    }


def _failed(ctx: Ctx, error: str) -> None:
    """A stream that ended in an error: billed nothing, unless ``x-fake-failed-usage``."""
    if ctx.failed_usage:
        ctx.entry["error"] = error
    else:
        ctx.bill_nothing(error)


async def chat_completions(request: web.Request) -> web.StreamResponse:
    ctx = await begin(request, CHAT, "chatcmpl-fake")
    if isinstance(ctx, web.Response):
        return ctx
    cid = ctx.entry["id"]
    created = int(time.time())
    finish = "length" if ctx.capped else "stop"
    words = output_words(ctx.visible)
    if not ctx.stream:
        await sleep_total(ctx)
        message = {"role": "assistant", "content": "".join(words), "refusal": None, "annotations": []}
        return await answer(ctx, {
            "id": cid,
            "object": "chat.completion",
            "created": created,
            "model": ctx.model,
            "choices": [{"index": i, "message": message, "logprobs": None, "finish_reason": finish}
                        for i in range(ctx.n)],
            "usage": chat_usage(ctx),
            "service_tier": ctx.service_tier,
            "system_fingerprint": "fp_fake",
        })
    so = ctx.body.get("stream_options")
    include_usage = isinstance(so, dict) and so.get("include_usage") is True and not ctx.omit_usage
    base = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": ctx.model,
            "service_tier": ctx.service_tier, "system_fingerprint": "fp_fake"}
    if include_usage:
        base["usage"] = None

    def chunk(index: int, delta: dict, finish_reason: str | None) -> dict:
        return {**base, "choices": [{"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}

    # one token of one choice per chunk, the choices interleaved
    tokens = [chunk(c, {"role": "assistant", "content": w} if i == 0 else {"content": w}, None)
              for i, w in enumerate(words) for c in range(ctx.n)]
    tail = [chunk(c, {} if words else {"role": "assistant", "content": ""}, finish) for c in range(ctx.n)]
    if include_usage:
        tail.append({**base, "choices": [], "usage": chat_usage(ctx)})
    if ctx.empty_model:  # Azure's first chunk names no model; the later ones do
        first = tokens[0] if tokens else tail[0]
        first["model"] = ""
    error_tail = [sse_data(openai_error(STREAM_ERROR_MESSAGE, etype="server_error"))]

    def done(failed: bool) -> None:
        if failed:
            _failed(ctx, "server_error")

    return await stream(ctx, [], [sse_data(c) for c in tokens], [sse_data(c) for c in tail] + [b"data: [DONE]\n\n"],
                        head_output=ctx.n * ctx.reasoning, error_tail=error_tail, on_done=done)


# --------------------------------------------------------------------------------------------
# responses
# --------------------------------------------------------------------------------------------


class ResponseStore:
    """Responses created with ``store`` (the default), for a later ``previous_response_id``:
    id -> the conversation's tokens so far. Bounded like the ledger (oldest evicted)."""

    def __init__(self, maxlen: int = DEFAULT_LEDGER_SIZE) -> None:
        self.maxlen = max(1, maxlen)
        self.items: OrderedDict[str, int] = OrderedDict()

    def put(self, rid: str, conversation_tokens: int) -> None:
        self.items[rid] = conversation_tokens
        while len(self.items) > self.maxlen:
            self.items.popitem(last=False)

    def get(self, rid: str) -> int | None:
        return self.items.get(rid)


STORE_KEY = web.AppKey("responses_store", ResponseStore)

# Responses server-tool output items: (header, item type, id prefix, stream events before "completed")
_TOOL_ITEMS = (
    ("x-fake-web-search", "web_search_call", "ws_fake", ("in_progress", "searching")),
    ("x-fake-file-search", "file_search_call", "fs_fake", ("in_progress", "searching")),
    ("x-fake-code-interpreter", "code_interpreter_call", "ci_fake", ("in_progress", "interpreting")),
    ("x-fake-image-generation", "image_generation_call", "ig_fake", ("in_progress", "generating")),
    ("x-fake-shell", "shell_call", "sh_fake", ()),
)
_TOOL_KINDS = {"web_search_call": "web_search", "file_search_call": "file_search",
               "code_interpreter_call": "code_interpreter", "image_generation_call": "image_generation",
               "shell_call": "shell"}
_FAKE_CODE = "print(6 * 7)"
# a 1x1 transparent PNG
_FAKE_PNG = ("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6kgAAAABJRU5ErkJggg==")


def _tool_item(kind: str, item_id: str, i: int, done: bool) -> dict:
    """One server-tool output item, completed (``done``) or as first added."""
    status = "completed" if done else "in_progress"
    if kind == "web_search_call":
        action: dict[str, Any] = {"type": "search", "query": f"fake query {i}"} if done else {"type": "search"}
        return {"id": item_id, "type": kind, "status": status, "action": action}
    if kind == "file_search_call":
        return {"id": item_id, "type": kind, "status": status, "queries": [f"fake query {i}"] if done else [],
                "results": None}
    if kind == "code_interpreter_call":
        return {"id": item_id, "type": kind, "status": status, "code": _FAKE_CODE if done else "",
                "container_id": "cntr_fake000000000000000000000000", "outputs": None}
    if kind == "shell_call":
        return {"id": item_id, "type": kind, "call_id": f"call_{item_id}", "status": status,
                "action": {"commands": [f"echo fake {i}"], "timeout_ms": 60000, "max_output_length": 4096},
                "environment": {"type": "container_reference", "container_id": _FAKE_SHELL_CONTAINER}}
    return {"id": item_id, "type": kind, "status": status, "result": _FAKE_PNG if done else None,
            "background": "opaque", "output_format": "png", "quality": "low", "size": "1024x1024",
            "revised_prompt": f"fake image {i}"}


_FAKE_SHELL_CONTAINER = "cntr_fakeshell0000000000000000000"
DEFAULT_IMAGE_MODEL = "gpt-image-2.6-sunburst"  # the image_generation tool's default (openai SDK, tool.py)


def _image_model(body: dict) -> str:
    for t in body.get("tools") or ():
        if isinstance(t, dict) and t.get("type") == "image_generation" and isinstance(t.get("model"), str):
            return t["model"]
    return DEFAULT_IMAGE_MODEL


def _tool_usage(ctx: Ctx, images: int, searches: int) -> dict | None:
    """``Response.tool_usage``: the image generation tokens summed over the images (each
    ``x-fake-image-gen-tokens: TEXT_IN,OUT``, default 40 text input and 272 image output tokens,
    gpt-image-1's low-quality 1024x1024 count) and the billable web searches. None when no image
    was generated (the API may omit it)."""
    if not images:
        return None
    text_in, out = (int(x) for x in (ctx.request.headers.get("x-fake-image-gen-tokens") or "40,272").split(",", 1))
    return {"image_gen": {"input_tokens": images * text_in,
                          "input_tokens_details": {"image_tokens": 0, "text_tokens": images * text_in},
                          "output_tokens": images * out, "total_tokens": images * (text_in + out), "cached_tokens": 0,
                          "output_tokens_details": {"image_tokens": images * out, "text_tokens": 0}},
            "web_search": {"num_requests": searches}}


def responses_usage(ctx: Ctx, output_tokens: int | None = None) -> dict:
    out = ctx.output_tokens if output_tokens is None else output_tokens
    details: dict[str, Any] = {"cached_tokens": ctx.cache_read, "cache_write_tokens": ctx.cache_write}
    if ctx.cache_write:
        details["cache_write_tokens_details"] = {"ttl_30m_tokens": ctx.cache_write_short,
                                                 "ttl_12h_tokens": ctx.cache_write_long}
    return {
        "input_tokens": ctx.input_tokens,
        "input_tokens_details": details,
        "output_tokens": out,
        "output_tokens_details": {"reasoning_tokens": ctx.reasoning},
        "total_tokens": ctx.input_tokens + out,
    }


def _response_obj(ctx: Ctx, rid: str, created: int, status: str, output: list, usage: dict | None,
                  model: str | None = None, error: dict | None = None, tool_usage: dict | None = None) -> dict:
    b = ctx.body
    extra = {"tool_usage": tool_usage} if tool_usage is not None else {}
    return {**extra,
        "id": rid,
        "object": "response",
        "created_at": created,
        "status": status,
        "background": False,
        "error": error,
        "incomplete_details": None,
        "instructions": b.get("instructions"),
        "max_output_tokens": b.get("max_output_tokens"),
        "metadata": b.get("metadata") or {},
        "model": ctx.model if model is None else model,
        "output": output,
        "parallel_tool_calls": True,
        "previous_response_id": b.get("previous_response_id"),
        "reasoning": {"effort": None, "summary": None},
        "service_tier": ctx.service_tier,
        "store": b.get("store", True),
        "temperature": b.get("temperature", 1.0),
        "text": {"format": {"type": "text"}},
        "tool_choice": "auto",
        "tools": b.get("tools") or [],
        "top_p": b.get("top_p", 1.0),
        "truncation": "disabled",
        "usage": usage,
        "user": None,
    }


def _conversation_tokens(ctx: Ctx) -> int:
    """What a later ``previous_response_id`` turn re-reads: this response's input (without its
    instructions, which the API does not carry over) and its output."""
    return ctx.input_tokens - instructions_tokens(ctx.body) + ctx.output_tokens


async def responses(request: web.Request) -> web.StreamResponse:
    parsed = await parse(request, RESPONSES)
    if isinstance(parsed, web.Response):
        return parsed
    body = parsed[0]
    store = request.app[STORE_KEY]
    prev = body.get("previous_response_id")
    context = 0
    if prev is not None:
        found = store.get(prev) if isinstance(prev, str) else None
        if found is None:
            return error_response(request, RESPONSES, 404, openai_error(
                f"Previous response with id '{prev}' not found.", "previous_response_id",
                "previous_response_not_found"), body["model"])
        context = found
    ctx = Ctx(request, RESPONSES, *parsed, context_tokens=context)
    ctx.entry["previous_response_id"] = prev
    rid = ctx.set_id(new_id("resp_fake"))
    suffix = rid[len("resp_fake"):]
    mid = f"msg_fake{suffix}"
    created = int(time.time())

    # the output items before the message: reasoning, then server tool calls
    pre_done: list[dict] = []
    pre_added: list[dict] = []
    tool_calls: dict[str, int] = {}
    if ctx.reasoning:
        item = {"id": f"rs_fake{suffix}", "type": "reasoning", "summary": []}
        pre_done.append(item)
        pre_added.append(item)
    for header, kind, prefix, _ in _TOOL_ITEMS:
        for i in range(count_header(request, header)):
            item_id = f"{prefix}{suffix}{i:04x}"
            pre_done.append(_tool_item(kind, item_id, i, True))
            pre_added.append(_tool_item(kind, item_id, i, False))
            tool_calls[_TOOL_KINDS[kind]] = tool_calls.get(_TOOL_KINDS[kind], 0) + 1
    if tool_calls.get("shell"):  # every shell call runs in one container: one session
        tool_calls["shell"] = 1
    ctx.entry["tool_calls"] = tool_calls
    ctx.entry["web_search_requests"] = tool_calls.get("web_search", 0)
    tool_usage = _tool_usage(ctx, tool_calls.get("image_generation", 0), tool_calls.get("web_search", 0))
    if tool_usage is not None:
        ig = tool_usage["image_gen"]
        ctx.entry["image_gen"] = {"model": _image_model(body), "text_input": ig["input_tokens"], "image_input": 0,
                                  "cached_text_input": 0, "cached_image_input": 0,
                                  "image_output": ig["output_tokens"], "text_output": 0}
    keep = body.get("store", True) is not False

    words = output_words(ctx.visible)
    text = "".join(words)
    part_done = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
    item_done = {"id": mid, "type": "message", "status": "completed", "role": "assistant", "content": [part_done]}
    if not ctx.stream:
        await sleep_total(ctx)
        if keep:
            store.put(rid, _conversation_tokens(ctx))
        return await answer(ctx, _response_obj(ctx, rid, created, "completed", pre_done + [item_done],
                                               responses_usage(ctx), tool_usage=tool_usage))

    seq = itertools.count()
    pending = _response_obj(ctx, rid, created, "in_progress", [], None)
    head = [
        sse_event("response.created", {"type": "response.created", "sequence_number": next(seq),
                                        "response": {**pending, "model": ""} if ctx.empty_model else pending}),
        sse_event("response.in_progress", {"type": "response.in_progress", "sequence_number": next(seq),
                                           "response": pending}),
    ]
    for index, (added, done) in enumerate(zip(pre_added, pre_done)):
        head.append(sse_event("response.output_item.added", {
            "type": "response.output_item.added", "sequence_number": next(seq), "output_index": index, "item": added}))
        kind = done["type"]
        if kind not in ("reasoning", "shell_call"):  # a shell call streams as its items only
            phases = next(p for _, k, _, p in _TOOL_ITEMS if k == kind)
            for phase in phases:
                head.append(_tool_event(f"response.{kind}.{phase}", seq, index, done["id"]))
                if kind == "code_interpreter_call" and phase == "in_progress":
                    head.append(_tool_event("response.code_interpreter_call_code.delta", seq, index, done["id"],
                                            delta=_FAKE_CODE))
                    head.append(_tool_event("response.code_interpreter_call_code.done", seq, index, done["id"],
                                            code=_FAKE_CODE))
            head.append(_tool_event(f"response.{kind}.completed", seq, index, done["id"]))
        head.append(sse_event("response.output_item.done", {
            "type": "response.output_item.done", "sequence_number": next(seq), "output_index": index, "item": done}))
    out_index = len(pre_done)
    head += [
        sse_event("response.output_item.added", {
            "type": "response.output_item.added", "sequence_number": next(seq), "output_index": out_index,
            "item": {"id": mid, "type": "message", "status": "in_progress", "role": "assistant", "content": []}}),
        sse_event("response.content_part.added", {
            "type": "response.content_part.added", "sequence_number": next(seq), "item_id": mid,
            "output_index": out_index, "content_index": 0,
            "part": {"type": "output_text", "text": "", "annotations": [], "logprobs": []}}),
    ]
    first_token_seq = next(seq)
    seq = itertools.count(first_token_seq)
    tokens = [
        sse_event("response.output_text.delta", {
            "type": "response.output_text.delta", "sequence_number": next(seq), "item_id": mid,
            "output_index": out_index, "content_index": 0, "delta": w, "logprobs": []})
        for w in words
    ]
    tail = [
        sse_event("response.output_text.done", {
            "type": "response.output_text.done", "sequence_number": next(seq), "item_id": mid,
            "output_index": out_index, "content_index": 0, "text": text, "logprobs": []}),
        sse_event("response.content_part.done", {
            "type": "response.content_part.done", "sequence_number": next(seq), "item_id": mid,
            "output_index": out_index, "content_index": 0, "part": part_done}),
        sse_event("response.output_item.done", {
            "type": "response.output_item.done", "sequence_number": next(seq), "output_index": out_index,
            "item": item_done}),
        sse_event("response.completed", {
            "type": "response.completed", "sequence_number": next(seq),
            "response": _response_obj(ctx, rid, created, "completed", pre_done + [item_done],
                                      None if ctx.omit_usage else responses_usage(ctx), tool_usage=tool_usage)}),
    ]
    error_tail = None
    if ctx.stream_error_after is not None and ctx.cut_after is None:
        k = min(ctx.stream_error_after, len(words))
        seq = itertools.count(first_token_seq + k)
        partial = "".join(words[:k])
        failed_item = {"id": mid, "type": "message", "status": "incomplete", "role": "assistant",
                       "content": [{"type": "output_text", "text": partial, "annotations": [], "logprobs": []}]}
        usage = responses_usage(ctx, ctx.reasoning + k) if ctx.failed_usage and not ctx.omit_usage else None
        error = {"code": "server_error", "message": STREAM_ERROR_MESSAGE}
        error_tail = [
            sse_event("error", {"type": "error", "sequence_number": next(seq), "code": "server_error",
                                "message": STREAM_ERROR_MESSAGE, "param": None}),
            sse_event("response.failed", {
                "type": "response.failed", "sequence_number": next(seq),
                "response": _response_obj(ctx, rid, created, "failed", pre_done + [failed_item], usage,
                                          error=error)}),
        ]

    def done(failed: bool) -> None:
        if failed:
            _failed(ctx, "server_error")
        elif keep:
            store.put(rid, _conversation_tokens(ctx))

    return await stream(ctx, head, tokens, tail, head_output=ctx.reasoning, error_tail=error_tail, on_done=done)


def _tool_event(name: str, seq: itertools.count[int], index: int, item_id: str, **extra: Any) -> bytes:
    return sse_event(name, {"type": name, "sequence_number": next(seq), "output_index": index, "item_id": item_id,
                            **extra})


# --------------------------------------------------------------------------------------------
# embeddings, models, unknown paths
# --------------------------------------------------------------------------------------------


async def embeddings(request: web.Request) -> web.StreamResponse:
    ctx = await begin(request, EMBEDDINGS, "embd-fake")
    if isinstance(ctx, web.Response):
        return ctx
    as_b64 = ctx.body.get("encoding_format") == "base64"
    dims = ctx.body.get("dimensions")
    dims = dims if isinstance(dims, int) and not isinstance(dims, bool) else 8
    data = []
    for i, item in enumerate(embedding_inputs(ctx.body.get("input"))):
        vec: Any = embedding_vector(item, dims)
        if as_b64:
            vec = base64.b64encode(struct.pack(f"<{len(vec)}f", *vec)).decode()
        data.append({"object": "embedding", "index": i, "embedding": vec})
    return await answer(ctx, {
        "object": "list",
        "data": data,
        "model": ctx.model,
        "usage": {"prompt_tokens": ctx.input_tokens, "total_tokens": ctx.input_tokens},
    })


async def models(request: web.Request) -> web.Response:
    body = orjson.dumps({
        "object": "list",
        "data": [{"id": m, "object": "model", "created": 1700000000,
                  "owned_by": "anthropic" if m.startswith("claude") else "openai"}
                 for m in request.app[MODELS_KEY].listed()],
    })
    return web.Response(body=body, content_type=JSON, headers=echo_headers(request, ""))


async def not_found(request: web.Request) -> web.Response:
    body = error_body(CHAT, 404, f"Invalid URL ({request.method} {request.path})")
    body["error"]["code"] = None
    return json_response(request, "", body, status=404)
