"""The end of a request: its reservation settled, or released, exactly once, and its record written.

Every way a request can end comes through here:

* `finish(end)`  the response ended (`completed`), the live cap stopped it (`budget_cap`), or the
                 stream went away after forwarding (`interrupted`, from `close`): settle with the
                 meter's cost, real or estimated, in one Redis call with the rollup and the record.
                 The record is returned before that call ends: the answer to Envoy does not wait.
* `refuse(err)`  the gateway answers the client itself: record it (on the sinks only: refusals
                 write no key or stream entry to Redis; a budget block adds 1 to its day's
                 `d:blocked` rollup count), releasing a lease if one was already held.
* `cached(...)`  a response-cache hit (extproc/cache/): settled at $0 with its record, never forwarded;
                 like `finish`, the record is returned before the settle's call ends.
* `close()`      the gRPC stream ended, however: whatever is still open is resolved. A reserve
                 still running (the client left mid-admission) is awaited and released; a lease
                 never forwarded is released; a forwarded request is settled as `interrupted`.

The Redis work runs in a task of its own that the caller awaits through a future of its own
(lifecycle/protect.py), so a cancel arriving at that await (grpc.aio cancels a stream's handler
when Envoy resets it) cannot stop it halfway. A settle Redis cannot take goes to the outbox
(budgets/outbox.py).
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from ..errors import GatewayError
from ..usage import count_blocked, usage_write
from .context import RequestContext, State
from .meters import JsonMeter, Metered, SseMeter
from .protect import run_protected
from .record import build_record

if TYPE_CHECKING:
    from ..app import Gateway
    from ..budgets import BudgetEngine

log = logging.getLogger("tollgate.settler")

class Settler:
    def __init__(self, gw: "Gateway", ctx: RequestContext, budgets: "BudgetEngine | None") -> None:
        self.gw = gw
        self.budgets = budgets  # the engine of the runtime that admitted the request
        self.ctx = ctx
        self.meter: JsonMeter | SseMeter | None = None
        self.record: dict[str, Any] | None = None
        self.settling: "asyncio.Future[Any] | None" = None  # the settle `finish` started, until it is done

    # ---- the ways a request ends -----------------------------------------------------------
    async def finish(self, end: str = "completed") -> dict[str, Any]:
        """Settle a forwarded request (once; later calls return the first record).

        The record is built here, from the meter, and returned at once: the caller answers Envoy's
        last message with it (the cost header, the access log's metadata) while the settle's Redis
        call, and then the sinks, run on in a task of their own (`settling`). So the client does not
        wait for that round trip; the request's stream waits for it at `close`. A cancel cannot stop
        it (see `run_protected`), and the pipe's FIFO runs it before any later call of this process
        (extproc/budgets/pipe.py), so a next request of the same client reserves on settled numbers."""
        if self.ctx.state is not State.FORWARDED:
            return self.record or {}
        self.ctx.to(State.SETTLED)
        record, metered = self._final_record(end)
        self.record = record
        self.settling = run_protected(self._settle(record, metered))
        return record

    async def refuse(self, err: GatewayError) -> dict[str, Any]:
        """Record a request the gateway answered itself; drop a lease it held."""
        ctx = self.ctx
        ctx.status = err.status
        # A budget's or a rate limit's refusal is a block; any other (identity, access, bad input) a refusal.
        ctx.decision = "blocked" if err.type == "budget_exceeded" or err.code == "rate_limit_exceeded" else "refused"
        if ctx.decision == "blocked" and ctx.admission is not None:
            ctx.decision_reason = ctx.admission.reason or None
        ctx.error_code = err.code or err.type
        held = ctx.holds_lease
        if ctx.state is State.RESERVED:
            ctx.to(State.RELEASED)
        elif not ctx.state.terminal:
            ctx.to(State.REFUSED)
        if held:
            await run_protected(self._release())
        record = build_record(ctx, None, 0, complete=True, end="refused")
        record["settlement"] = "released" if held else None
        if ctx.decision == "blocked" and self.gw.redis is not None:
            # the dashboard's decisions chart: one HINCRBY in the day's rollup, not awaited
            run_protected(count_blocked(self.gw.redis, record))
        self._emit(record)
        return record

    # cache: a response-cache hit (extproc/cache/flow.py) ends here ------------------------------
    def cached(self, fields: dict[str, Any]) -> dict[str, Any]:
        """A request answered from the response cache, once admitted: $0. Its lease (if a budget
        matched) is settled at 0 in the same call that rolls it up and writes its record, which
        carries `fields` (`cache_rule`, `avoided_cost_nusd`, ...). As `finish`, the record is
        returned at once and the settle runs on (`settling`, awaited at `close`): the hit's answer
        does not wait for that round trip."""
        ctx = self.ctx
        ctx.status = ctx.status or 200
        ctx.to(State.CACHED)
        record = {**build_record(ctx, None, 0, complete=True, end="cache_hit"), **fields}
        self.record = record
        self.settling = run_protected(self._settle_cached(record))
        return record

    async def _settle_cached(self, record: dict[str, Any]) -> dict[str, Any]:
        ctx = self.ctx
        settlement: str | None = None
        if self.budgets is not None:
            counters = ctx.admission.counters if ctx.admission is not None else ()
            settlement = await self.budgets.account(ctx.request_id, counters, 0, usage=usage_write(
                record, bound=ctx.config.stream_bound))
            if settlement in ("queued", "store_error"):
                self.gw.metrics.redis_error("settle")
        record["settlement"] = settlement
        self._emit(record)
        return record
    # ---- end cache ---------------------------------------------------------------------------

    async def close(self) -> None:
        """The gRPC stream ended: resolve whatever is still open."""
        ctx = self.ctx
        if ctx.state is State.ADMITTING and ctx.pending_admit is not None:
            await run_protected(self._after_cancelled_admit(ctx.pending_admit))
        elif ctx.state is State.RESERVED:
            ctx.to(State.RELEASED)
            await run_protected(self._release())
        elif ctx.state is State.FORWARDED:
            await self.finish("interrupted")
        if self.settling is not None:
            await self.settling

    # ---- the Redis work ----------------------------------------------------------------
    async def _after_cancelled_admit(self, task: "asyncio.Task[Any]") -> None:
        ctx = self.ctx
        try:
            adm = await task
        except Exception:
            log.exception("admission of %s failed after its stream ended", ctx.request_id)
            ctx.state = State.REFUSED
            return
        ctx.admission = adm
        if adm.admitted and adm.counters:
            ctx.state = State.RELEASED
            await self._release()
        else:
            ctx.state = State.REFUSED
        self.gw.metrics.lifecycle("cancelled_in_admission")

    async def _release(self) -> None:
        adm = self.ctx.admission
        if adm is None or self.budgets is None:
            return
        if await self.budgets.release(adm) == "store_error":
            self.gw.metrics.redis_error("release")

    def _final_record(self, end: str) -> tuple[dict[str, Any], Metered]:
        ctx = self.ctx
        meter = self.meter or JsonMeter(ctx)
        if isinstance(meter, SseMeter) and meter.cut:
            end = "budget_cap"  # the live cap ended it, even if the stream then went away
        m: Metered = meter.result(end)
        record = build_record(ctx, m.usage, m.cost_nusd, complete=m.complete, end=end, estimate=m.estimate,
                              overrun_nusd=m.overrun_nusd)
        return record, m

    async def _settle(self, record: dict[str, Any], m: Metered) -> dict[str, Any]:
        ctx = self.ctx
        settlement: str | None = None
        engine = self.budgets
        if engine is not None:
            counters = ctx.admission.counters if ctx.admission is not None else ()
            # One atomic call: the real cost replaces the reservation (no usage, e.g. an upstream
            # error, frees it), the day's usage rollup grows, and the record joins the stream.
            tokens = m.usage.total_input_tokens + m.usage.output_tokens if m.usage is not None else 0
            settlement = await engine.account(ctx.request_id, counters, m.cost_nusd, usage=usage_write(
                record, rollup=m.usage is not None, bound=ctx.config.stream_bound), tokens=tokens)
            if settlement in ("queued", "store_error"):
                self.gw.metrics.redis_error("settle")
        record["settlement"] = settlement
        if m.estimate is not None:
            self.gw.metrics.lifecycle(f"estimated_{m.estimate}")
        if m.overrun_nusd:
            self.gw.metrics.lifecycle("overrun")
        self._emit(record)
        return record

    def _emit(self, record: dict[str, Any]) -> None:
        self.record = record
        self.gw.record(record, self.ctx.admission)  # the admission names the counters, for alerts
