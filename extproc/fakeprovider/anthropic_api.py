"""The fake's Anthropic endpoints: ``/v1/messages`` (JSON and SSE) and ``count_tokens``.

Shapes follow the ``anthropic`` SDK's types: ``types/usage.py``, ``message_delta_usage.py``,
``cache_creation.py``, ``server_tool_usage.py``, the server-tool content blocks
(``server_tool_use_block.py``, ``web_search_tool_result_block.py``,
``web_fetch_tool_result_block.py``), and for iterations ``types/beta/beta_iterations_usage.py``
with ``beta_message_iteration_usage.py``, ``beta_compaction_iteration_usage.py``,
``beta_advisor_message_iteration_usage.py``, ``beta_compaction_block.py`` and the advisor blocks.
"""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

from .core import (
    ANTHROPIC,
    Ctx,
    answer,
    begin,
    count_header,
    flag,
    json_response,
    new_id,
    output_words,
    pair_header,
    parse,
    sleep_total,
    sse_event,
    stream,
    without_usage,
)


def _usage_obj(kind: str | None, uncached: int, read: int, w5: int, w1: int, out: int, model: str | None = None
               ) -> dict[str, Any]:
    """One usage object (top level or an iteration): ``input_tokens`` excludes the cache reads and
    writes, ``cache_creation_input_tokens`` is the sum of the 5m / 1h split."""
    u: dict[str, Any] = {}
    if kind is not None:
        u["type"] = kind
        if model is not None:
            u["model"] = model
    u.update({"input_tokens": uncached, "cache_creation_input_tokens": w5 + w1, "cache_read_input_tokens": read,
              "cache_creation": {"ephemeral_5m_input_tokens": w5, "ephemeral_1h_input_tokens": w1},
              "output_tokens": out})
    return u


def _ledger_tokens(u: dict[str, Any], model: str) -> dict[str, Any]:
    """An iteration's usage in the ledger's convention."""
    cc = u["cache_creation"]
    return {"type": u["type"], "model": model, "input_tokens": u["input_tokens"],
            "cached": u["cache_read_input_tokens"], "cache_write_5m": cc["ephemeral_5m_input_tokens"], "cache_write_1h": cc["ephemeral_1h_input_tokens"],
            "output_tokens": u["output_tokens"]}


class _Plan:
    """What one Messages answer contains and bills: the content blocks before the text (compaction
    summaries, server tool calls and their results, the advisor's call and advice), the sampling
    iterations, and the top-level usage (the sum of the ``message`` iterations)."""

    def __init__(self, ctx: Ctx) -> None:
        h = ctx.request
        self.web_search = count_header(h, "x-fake-web-search")
        self.web_fetch = count_header(h, "x-fake-web-fetch")
        self.compactions = count_header(h, "x-fake-compaction-iterations")
        comp_in, comp_out = pair_header(h, "x-fake-compaction-tokens", (ctx.input_tokens, 16))
        self.advisor = h.headers.get("x-fake-advisor-model") or None
        adv_in, adv_out = pair_header(h, "x-fake-advisor-tokens", (ctx.input_tokens, 16))
        r, w5, w1 = ctx.cache_read, ctx.cache_write_short, ctx.cache_write_long
        prompt_uncached = ctx.own_input - r - w5 - w1
        # the first sampling turn reads the prompt; server tool results (x-fake-tool-input-tokens)
        # are read by the last one
        self.start_input = prompt_uncached
        messages = [_usage_obj("message", prompt_uncached, r, w5, w1, 0)]
        self.advisor_usage: dict[str, Any] | None = None
        if self.advisor:
            # the executor calls the advisor, then samples again reading the prompt and the advice
            self.advisor_usage = _usage_obj("advisor_message", adv_in, 0, 0, 0, adv_out, self.advisor)
            messages.append(_usage_obj("message", ctx.own_input + adv_out, 0, 0, 0, 0))
        messages[-1]["input_tokens"] += ctx.tool_input_tokens
        messages[-1]["output_tokens"] = ctx.visible
        self.compaction_usage = [_usage_obj("compaction", comp_in, 0, 0, 0, comp_out) for _ in range(self.compactions)]
        # server-side fallback: the requested model declines after a few tokens (its `message`
        # iteration, naming it), and the fallback model answers, reading the prompt afresh (caches
        # are per model): a `fallback_message` iteration with the text
        self.fallback = h.headers.get("x-fake-fallback-model") or None
        self.fallback_usage: dict[str, Any] | None = None
        self.declined_output = 0
        if self.fallback and not self.advisor:
            self.declined_output = count_header(h, "x-fake-fallback-declined-output") or 1
            messages[0]["model"] = ctx.model
            messages[0]["output_tokens"] = self.declined_output
            self.fallback_usage = _usage_obj("fallback_message", ctx.own_input, 0, 0, 0, ctx.visible, self.fallback)
            messages.append(self.fallback_usage)
        self.iterations: list[dict[str, Any]] = []
        if self.compactions or self.advisor or self.fallback_usage is not None:
            self.iterations = [*self.compaction_usage, messages[0]]
            if self.advisor_usage is not None:
                self.iterations += [self.advisor_usage, *messages[1:]]
            elif self.fallback_usage is not None:
                self.iterations.append(self.fallback_usage)
        self.top_input = sum(m["input_tokens"] for m in messages)
        self.top_output = sum(m["output_tokens"] for m in messages)
        self.cache = (r, w5, w1)
        self.blocks = self._blocks(ctx)

    def _blocks(self, ctx: Ctx) -> list[tuple[dict, list[dict], dict]]:
        """``(start block, deltas, final block)`` for each block before the text."""
        out: list[tuple[dict, list[dict], dict]] = []
        for i in range(self.compactions):
            summary = f"Summary of the conversation so far (fake compaction {i})."
            out.append(({"type": "compaction", "content": None},
                        [{"type": "compaction_delta", "content": summary}],
                        {"type": "compaction", "content": summary}))
        for i in range(self.web_search):
            tid = new_id("srvtoolu_fake")
            out.append(_tool_use(tid, "web_search", {"query": f"fake query {i}"}))
            result = {"type": "web_search_tool_result", "tool_use_id": tid, "content": [{
                "type": "web_search_result", "title": f"Fake result {i}", "url": f"https://example.com/search/{i}",
                "encrypted_content": "ZmFrZQ==", "page_age": None}]}
            out.append((result, [], result))
        for i in range(self.web_fetch):
            tid = new_id("srvtoolu_fake")
            url = f"https://example.com/page/{i}"
            out.append(_tool_use(tid, "web_fetch", {"url": url}))
            result = {"type": "web_fetch_tool_result", "tool_use_id": tid, "content": {
                "type": "web_fetch_result", "url": url, "retrieved_at": "2026-01-01T00:00:00Z",
                "content": {"type": "document", "title": f"Fake page {i}",
                            "source": {"type": "text", "media_type": "text/plain", "data": f"fake page {i}"}}}}
            out.append((result, [], result))
        if self.fallback_usage is not None and self.fallback:
            block = {"type": "fallback", "from": {"model": ctx.model}, "to": {"model": self.fallback},
                     "trigger": {"type": "refusal", "category": None}}
            out.append((block, [], block))
        if self.advisor:
            tid = new_id("srvtoolu_fake")
            out.append(_tool_use(tid, "advisor", {}))
            result = {"type": "advisor_tool_result", "tool_use_id": tid,
                      "content": {"type": "advisor_result", "text": "fake advice", "stop_reason": "end_turn"}}
            out.append((result, [], result))
        return out

    def server_tool_use(self) -> dict[str, int] | None:
        if not (self.web_search or self.web_fetch):
            return None
        return {"web_search_requests": self.web_search, "web_fetch_requests": self.web_fetch}

    def usage(self, ctx: Ctx) -> dict[str, Any]:
        """The top-level usage (compaction iterations are not in it, as the API documents)."""
        r, w5, w1 = self.cache
        u = _usage_obj(None, self.top_input, r, w5, w1, self.top_output)
        u["service_tier"] = "standard"
        _rate_fields(u, ctx)
        if (stu := self.server_tool_use()) is not None:
            u["server_tool_use"] = stu
        if self.iterations:
            u["iterations"] = self.iterations
        return u

    def start_usage(self, ctx: Ctx) -> dict[str, Any]:
        """``message_start``'s usage: the first turn's input, the first output token (and speed and
        inference geo, which ``message_delta`` never carries)."""
        r, w5, w1 = self.cache
        u = _usage_obj(None, self.start_input, r, w5, w1, min(1, self.top_output))
        u["service_tier"] = "standard"
        _rate_fields(u, ctx)
        return u

    def delta_usage(self, legacy: bool) -> dict[str, Any]:
        """``message_delta``'s usage: cumulative (input and cache counts repeated, server tool use,
        iterations), or only ``output_tokens`` as older API versions sent."""
        if legacy:
            return {"output_tokens": self.top_output}
        r, w5, w1 = self.cache
        u: dict[str, Any] = {"input_tokens": self.top_input, "cache_creation_input_tokens": w5 + w1,
                             "cache_read_input_tokens": r, "output_tokens": self.top_output}
        if (stu := self.server_tool_use()) is not None:
            u["server_tool_use"] = stu
        if self.iterations:
            u["iterations"] = self.iterations
        return u

    def bill(self, ctx: Ctx) -> int:
        """Fill the ledger entry; returns the output billed before the first text token (the
        compaction iterations' output)."""
        e = ctx.entry
        pre_output = sum(c["output_tokens"] for c in self.compaction_usage)
        e["input_tokens"] = self.top_input + sum(c["input_tokens"] for c in self.compaction_usage)
        e["output_tokens"] = 0 if ctx.stream else self.top_output + pre_output
        e["web_search_requests"], e["web_fetch_requests"] = self.web_search, self.web_fetch
        e["tool_calls"] = {k: v for k, v in (("web_search", self.web_search), ("web_fetch", self.web_fetch)) if v}
        e["iterations"] = [_ledger_tokens(it, it.get("model") or ctx.model) for it in self.iterations]
        if self.advisor_usage is not None:
            e["other_models"] = [_ledger_tokens(self.advisor_usage, self.advisor or "")]
        if self.fallback_usage is not None:  # the top level is the declined hop, at the requested model's rates
            fb = self.fallback_usage
            e["input_tokens"] -= fb["input_tokens"]
            e["output_tokens"] = 0 if ctx.stream else self.declined_output + pre_output
            e["other_models"] = [_ledger_tokens(fb, self.fallback or "")]
            pre_output += self.declined_output  # billed before the text, which is the fallback model's
        return pre_output

    def stream_done(self, ctx: Ctx) -> None:
        """A finished stream: its text was billed at the top level as it was written; with a
        fallback that text is the fallback model's (in ``other_models``)."""
        if self.fallback_usage is not None:
            ctx.entry["output_tokens"] -= ctx.visible


def _rate_fields(u: dict[str, Any], ctx: Ctx) -> None:
    """``speed`` and ``inference_geo`` in a usage object, when the request set them (or the
    ``x-fake-service-tier`` / ``x-fake-inference-geo`` hooks say otherwise)."""
    if ctx.service_tier is not None:
        u["speed"] = ctx.service_tier
    if ctx.inference_geo is not None:
        u["inference_geo"] = ctx.inference_geo


def _tool_use(tid: str, name: str, tool_input: dict) -> tuple[dict, list[dict], dict]:
    block = {"type": "server_tool_use", "id": tid, "name": name, "input": tool_input}
    return ({**block, "input": {}}, [{"type": "input_json_delta", "partial_json": orjson.dumps(tool_input).decode()}],
            block)


async def messages(request: web.Request) -> web.StreamResponse:
    ctx = await begin(request, ANTHROPIC, "msg_fake")
    if isinstance(ctx, web.Response):
        return ctx
    mid = ctx.entry["id"]
    plan = _Plan(ctx)
    pre_output = plan.bill(ctx)
    words = output_words(ctx.visible)
    stop = "max_tokens" if ctx.capped else "end_turn"
    content = [final for _, _, final in plan.blocks]
    if words:
        content.append({"type": "text", "text": "".join(words)})
    if not ctx.stream:
        await sleep_total(ctx, plan.top_output + pre_output)
        return await answer(ctx, {
            "id": mid,
            "type": "message",
            "role": "assistant",
            "model": ctx.model,
            "content": content,
            "stop_reason": stop,
            "stop_sequence": None,
            "usage": plan.usage(ctx),
        })
    start = {"id": mid, "type": "message", "role": "assistant", "model": ctx.model, "content": [],
             "stop_reason": None, "stop_sequence": None, "usage": plan.start_usage(ctx)}
    message_delta = {"type": "message_delta", "delta": {"stop_reason": stop, "stop_sequence": None},
                     "usage": plan.delta_usage(flag(request, "x-fake-legacy-message-delta"))}
    if ctx.omit_usage:
        start, message_delta = without_usage(ANTHROPIC, start), without_usage(ANTHROPIC, message_delta)
    head = [sse_event("message_start", {"type": "message_start", "message": start})]
    for index, (first, deltas, _) in enumerate(plan.blocks):
        head.append(sse_event("content_block_start", {"type": "content_block_start", "index": index,
                                                      "content_block": first}))
        for d in deltas:
            head.append(sse_event("content_block_delta", {"type": "content_block_delta", "index": index, "delta": d}))
        head.append(sse_event("content_block_stop", {"type": "content_block_stop", "index": index}))
    text_index = len(plan.blocks)
    if words:
        head.append(sse_event("content_block_start", {"type": "content_block_start", "index": text_index,
                                                      "content_block": {"type": "text", "text": ""}}))
    head.append(sse_event("ping", {"type": "ping"}))
    tokens = [
        sse_event("content_block_delta", {"type": "content_block_delta", "index": text_index,
                                          "delta": {"type": "text_delta", "text": w}})
        for w in words
    ]
    tail = [sse_event("content_block_stop", {"type": "content_block_stop", "index": text_index})] if words else []
    tail += [sse_event("message_delta", message_delta), sse_event("message_stop", {"type": "message_stop"})]
    error_tail = [sse_event("error", {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}})]

    def done(failed: bool) -> None:
        if failed:
            if ctx.failed_usage:
                ctx.entry["error"] = "overloaded_error"
            else:
                ctx.bill_nothing("overloaded_error")
        else:
            plan.stream_done(ctx)

    return await stream(ctx, head, tokens, tail, head_output=pre_output, error_tail=error_tail, on_done=done)


async def count_tokens(request: web.Request) -> web.StreamResponse:
    parsed = await parse(request, ANTHROPIC, billed=False)
    if isinstance(parsed, web.Response):
        return parsed
    ctx = Ctx(request, ANTHROPIC, *parsed, billed=False)
    return json_response(request, ctx.model, {"input_tokens": ctx.own_input}, api=ANTHROPIC)
