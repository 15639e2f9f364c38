"""What a response cost: one meter per body framing.

`JsonMeter` buffers a JSON body and reads its usage at the end; `SseMeter` parses a stream event
by event, keeps running totals, and enforces the live cap. Both end in a `Metered`: the usage and
cost to settle, whether that is the provider's own count, and if not, which documented estimate.

Estimates, each never below what was visibly delivered (docs/budgets.md, "When usage is missing"):

* `input_bound`   a streamed request was forwarded but no response came (client or upstream went
                  away first): the input upper bound the reservation used, no output (a provider
                  stops generating a stream when its client goes).
* `reservation`   a JSON request was forwarded and its usage was never seen (the client or the
                  upstream went away before or after its status line, or Envoy timed out waiting):
                  the whole reservation, the most the request could have cost. A provider finishes
                  a JSON answer whoever is still listening, and bills all of it.
* `body_bytes`    a 2xx JSON body without readable usage (truncated, or no `usage`): the input
                  upper bound plus one output token per 4 bytes of the body received.
* `deltas`        a stream cut short before its final usage: the provider's input count if it gave
                  one (else the upper bound) plus the output deltas seen, counted conservatively.
                  A model that bills reasoning it never streams (`hidden_reasoning` in the price
                  table) is charged its `reservation` instead, as is its JSON body without usage.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import orjson

from ..pricing import Usage
from ..providers import SSEParser, StreamState
from .context import RequestContext

Estimate = Literal["input_bound", "reservation", "body_bytes", "deltas"]

# Envoy's response code details for an upstream it never reached: nothing was served.
_NEVER_REACHED = ("connection_failure", "connection_termination", "no_healthy_upstream", "cluster_not_found",
                  "no_route", "overflow")


@dataclass(slots=True)
class Metered:
    usage: Usage | None
    cost_nusd: int
    complete: bool  # the provider's own usage for a response that ended normally
    estimate: Estimate | None = None  # None: the provider's count (or nothing to charge)
    overrun_nusd: int = 0  # real cost beyond the reservation (a provider that ignored the cap)


def _priced(ctx: RequestContext, usage: Usage | None, complete: bool, estimate: Estimate | None = None) -> Metered:
    cost = ctx.config.prices.cost_nusd(ctx.price, usage) if (ctx.price is not None and usage is not None) else 0
    adm = ctx.admission
    reserved = adm.reserved_nusd if adm is not None and adm.counters else 0
    overrun = max(0, cost - reserved) if reserved else 0
    return Metered(usage, cost, complete, estimate, overrun)


def _reservation(ctx: RequestContext) -> Metered:
    """The most the request could have cost: what was reserved for it (or its worst case)."""
    assert ctx.req is not None
    adm = ctx.admission
    cap = adm.max_output_tokens if adm is not None else (
        ctx.req.output_cap if ctx.req.output_cap is not None else (ctx.price.max_output_tokens if ctx.price else 0))
    if ctx.api is not None and not ctx.api.has_output:
        cap = 0
    usage = Usage(input_tokens=ctx.req.input_tokens_upper, output_tokens=cap * ctx.req.choices)
    if adm is not None and adm.counters:
        cost = adm.reserved_nusd
    else:
        cost = ctx.price.worst_case_nusd(usage.input_tokens, usage.output_tokens) if ctx.price is not None else 0
    return Metered(usage, cost, False, "reservation")


def _input_bound(ctx: RequestContext) -> Metered:
    assert ctx.req is not None
    return _priced(ctx, Usage(input_tokens=ctx.req.input_tokens_upper), False, "input_bound")


def gateway_error_cost(ctx: RequestContext) -> Metered:
    """Envoy answered instead of the provider, after the request was forwarded. A connect failure
    served nothing; a timeout or reset may have let the provider do the work: its reservation."""
    details = ctx.gateway_error or ""
    if any(d in details for d in _NEVER_REACHED):
        return Metered(None, 0, True)
    return _reservation(ctx)


class JsonMeter:
    """A buffered (non-streamed) response body."""

    def __init__(self, ctx: RequestContext) -> None:
        self.ctx = ctx
        self._chunks: list[bytes] = []

    def feed(self, body: bytes) -> None:
        self._chunks.append(body)

    def result(self, end: str) -> Metered:
        ctx = self.ctx
        if ctx.req is None:
            return Metered(None, 0, True)
        if ctx.gateway_error is not None:
            return gateway_error_cost(ctx)
        if end != "completed":
            # A JSON answer is billed whole whether or not anyone waits for it. No status line
            # seen is not proof that none came: Envoy may drop the response headers message when
            # the upstream resets right after them (a truncated 200 once came as status 0 in
            # CI), so only a stream gets the smaller estimate.
            if ctx.status == 0 and ctx.req.stream:
                return _input_bound(ctx)
            return Metered(None, 0, False) if ctx.status >= 400 else _reservation(ctx)
        if ctx.status >= 400:
            return Metered(None, 0, True)  # a provider error costs nothing
        raw = b"".join(self._chunks)
        try:
            obj = orjson.loads(raw)
        except orjson.JSONDecodeError:
            obj = None
        usage = None
        if isinstance(obj, dict):
            if isinstance(obj.get("model"), str) and obj["model"]:
                ctx.model_served = obj["model"]
            usage = ctx.api.usage_from_json(obj) if ctx.api is not None else None
        if usage is not None:
            return _priced(ctx, usage, True)
        if ctx.price is not None and ctx.price.hidden_reasoning:
            return _reservation(ctx)  # the body cannot show the reasoning tokens it billed
        out = (len(raw) // 4) if (ctx.api is not None and ctx.api.has_output) else 0
        return _priced(ctx, Usage(input_tokens=ctx.req.input_tokens_upper, output_tokens=max(out, 1 if raw else 0)),
                       False, "body_bytes")


@dataclass(frozen=True)
class Cut:
    """The live cap tripped: forward `body` (the chunk up to a whole event, plus the error event)."""

    body: bytes


class SseMeter:
    """A streamed (SSE) response: running totals per event, and the live cap.

    The live cap is the request's reservation: a provider that honours the output cap never
    pushes the running cost (a floor: input plus one token per delta) past it, so an honest
    stream is never cut. When it does go past, the client's stream ends right after the event
    that crossed it, with an error event in the provider's shape; this holds for the last chunk
    too, where the whole overrun may arrive at once.

    The charge is the provider's own usage when it arrived, even in the chunk that was cut (it
    billed what it generated); else the deltas the client was given. Nothing after the cut is
    read: the processor resets the upstream at the next chunk, which stops a provider still
    generating, so a usage that Envoy delivers in a later chunk (one large write split into
    several messages) is not seen, and the estimate stands. The overrun goes in the record.
    """

    def __init__(self, ctx: RequestContext, cap_nusd: int | None) -> None:
        self.ctx = ctx
        self.cap_nusd = cap_nusd
        self.parser = SSEParser()
        self.state = StreamState()
        self.cut = False  # the client's stream has been ended by the live cap
        self._capping = False  # over the cap, waiting for an event boundary to cut at
        self._at_cut: tuple[int, int] | None = None  # (deltas, estimate) the client had been given

    def feed(self, body: bytes, end_of_stream: bool) -> Cut | None:
        """Account one chunk; a Cut when the client's stream must end in it."""
        api, st = self.ctx.api, self.state
        assert api is not None
        events = self.parser.feed(body)
        ends = self.parser.ends
        if end_of_stream:
            tail = self.parser.flush()
            events += tail
            ends = [*ends, *[len(body)] * len(tail)]
        cut_at = None
        for (event, data), end in zip(events, ends):
            api.on_event(st, event, data)
            if cut_at is None and not self.cut and self._over():
                if end >= 0:
                    cut_at = end
                    self._at_cut = (st.output_deltas, st.output_estimate)
                else:
                    self._capping = True
        if self.cut:
            return None
        if cut_at is None and self._capping:
            cut_at = len(body) if (end_of_stream or not self.parser.mid_event) else _last_boundary(body)
            if cut_at < 0:
                return None  # no event ends in this chunk: forward it, cut at the next boundary
        if cut_at is None:
            return None
        self.cut = True
        return Cut(body[:cut_at])

    def _over(self) -> bool:
        if self.cap_nusd is None or self.state.done:
            return False
        return self.running_cost() > self.cap_nusd

    def running_cost(self) -> int:
        """Cost so far, as a floor: the input (the provider's count once it has said, else the same
        upper bound the reservation used) plus one token per output delta."""
        ctx, st = self.ctx, self.state
        assert ctx.price is not None and ctx.req is not None
        if st.usage is not None and st.usage.total_input_tokens:
            u = st.usage
            return ctx.price.cost_nusd(Usage(u.input_tokens, u.cached_input_tokens, u.cache_write_tokens,
                                             max(u.output_tokens, st.output_deltas), u.cache_write_long_tokens))
        return ctx.price.worst_case_nusd(ctx.req.input_tokens_upper, st.output_deltas)

    def result(self, end: str) -> Metered:
        ctx, st = self.ctx, self.state
        if ctx.req is None:
            return Metered(None, 0, True)
        if st.served_model:
            ctx.model_served = st.served_model
        if ctx.status >= 400:
            return gateway_error_cost(ctx) if ctx.gateway_error is not None else Metered(None, 0, True)
        if st.usage is not None and st.usage_final:
            # The provider's own count, whenever it arrived (even if the stream was cut after it).
            return _priced(ctx, st.usage, end == "completed" and st.done and not self.cut)
        if ctx.price is not None and ctx.price.hidden_reasoning:
            # Cut before its usage: the reasoning tokens it billed never showed as deltas
            # (charged as 0 they undercharged a reasoning model by 69%).
            return _reservation(ctx)
        if st.usage is not None and st.usage.total_input_tokens:
            u = st.usage
            usage = Usage(u.input_tokens, u.cached_input_tokens, u.cache_write_tokens, u.output_tokens,
                          u.cache_write_long_tokens, tool_calls=dict(u.tool_calls))
        else:
            usage = Usage(input_tokens=ctx.req.input_tokens_upper)
        deltas, estimate = self._at_cut or (st.output_deltas, st.output_estimate)
        usage.output_tokens = max(usage.output_tokens, estimate, deltas)
        return _priced(ctx, usage, False, "deltas")


def _last_boundary(raw: bytes) -> int:
    """Offset just past the last blank line (SSE event end) in `raw`, or -1."""
    return max((i + len(sep) for sep in (b"\n\n", b"\r\n\r\n", b"\r\r") if (i := raw.rfind(sep)) >= 0), default=-1)
