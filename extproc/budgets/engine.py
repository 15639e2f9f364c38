"""The budget engine: match a request to budgets, reserve its worst-case cost atomically, decide.

Flow of `admit` (one EVALSHA on the happy path):

1. Every budget whose `match` fits the request (attrs + candidate model/provider) contributes one
   counter (chosen by `per`) with one limit (override > tier > default).
2. The worst-case cost `cost_fn(model, input_tokens, max_output_tokens)` is reserved on all of
   them in one Lua call, all or nothing, as a lease that expires after `lease_seconds`.
   Shadow budgets are reserved too (to record spend) but never make the call fail.
3. If an enforce counter would go over its limit, nothing is reserved, and:
   * if every failing budget has `clamp: true`, the largest output cap that fits every counter is
     found (binary search over cost_fn, assumed non-decreasing in output tokens) and reserved
     instead, retried a few times if a concurrent request takes the room first -> "clamped";
   * else, if a failing budget has `action: downgrade`, its `fallbacks` (of the first such budget,
     in policy order) are tried in order, each re-matched against all budgets with its own
     model/provider (and clamped if its failing budgets allow) -> "downgraded";
   * else -> "blocked", reporting the first failing budget (policy order).
4. `settle` swaps the lease for the real cost (once per request_id; after the lease expired into a
   charge of the reservation, only the difference); `release` drops the lease. A settle Redis
   cannot take goes to the outbox (extproc/budgets/outbox.py) and is replayed when Redis is back.

Time: leases and rolling buckets run on Redis's clock (`TIME` in the scripts), so replicas with
skewed clocks agree on when a lease expires. Calendar periods are chosen on the gateway's clock
(the key names a period); a gateway whose clock is off by s seconds counts a request in the
neighbouring period only within s seconds of a boundary. Tests inject one clock for everything.

A model without a price (`cost_fn` -> None) cannot be bounded: it is blocked if any enforce budget
matches it (shadow-only budgets then record it at settle with a zero reservation); fallbacks without
a price or provider are skipped. Calendar counters are charged in the period the request was
admitted in (a request straddling midnight counts for the day it started).
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import redis.asyncio as aredis
from redis.exceptions import RedisError

from .admission import Admission, BudgetStatus, Decision, ReleaseOutcome, SettleOutcome
from .match import Attrs, budget_matches, limit_nusd, per_key, per_values
from .money import nusd_to_usd
from .policy import Budget, RateLimit
from .outbox import Outbox
from .pipe import ScriptPipe
from .store import BudgetStore, CounterRef, CounterState, ReserveResult, StoreError, UsageWrite
from .windows import KEY_GRACE_SECONDS, Calendar, Period, Rolling, Window, window_for

log = logging.getLogger(__name__)

Unit = Literal["usd", "requests", "tokens"]

CostFn = Callable[[str, int, int], "int | None"]
LeaseMeta = Callable[[str, str, list[str], int], bytes]
"""(model, provider, budget names, amount reserved) -> what the lease keeps for an expiry to record itself."""
ProviderOf = Callable[[str], "str | None"]

_MATCH_CACHE_SIZE = 4096
"""Distinct (identity attributes, model) combinations whose matching budgets are remembered."""

CLAMP_ATTEMPTS = 3
"""Reserve attempts for a clamped cap when concurrent requests keep taking the room; each is one EVALSHA."""


@dataclass(frozen=True)
class _Compiled:
    """A budget, or one half (requests or tokens) of a rate limit seen as a budget in other units."""

    budget: Budget
    window: Window
    unit: Unit = "usd"
    fixed_limit: int = 0  # a rate limit's requests or tokens per window (a budget's limit depends on attrs)
    # Worked out once, at policy load, for every request that counts against it:
    enforce: bool = field(init=False)
    key_part: str = field(init=False)  # where its counters live: `b:<budget>`, or `rl:<rate limit>:<unit>`
    window_text: str = field(init=False)  # the window's `describe()`, as statuses show it

    def __post_init__(self) -> None:
        name = self.budget.name
        object.__setattr__(self, "enforce", self.budget.mode == "enforce")
        object.__setattr__(self, "key_part", f"b:{name}" if self.unit == "usd" else f"rl:{name}:{self.unit}")
        object.__setattr__(self, "window_text", self.window.describe())


@dataclass(frozen=True)
class _Counter:
    """One counter a request counts against, with the limit that applies to this request."""

    cb: _Compiled
    per: dict[str, str]
    ref: CounterRef
    limit: int
    period: Period | None


class _Plan:
    """The counters one identity-and-model combination counts against in the current periods,
    with the lists a reserve sends for them: built once per combination and period, since only
    the amounts and the request id change between its requests. Shared by those requests: read, never changed."""

    __slots__ = ("counters", "refs", "limits", "enforce", "names", "meta_first", "valid_from", "valid_to")

    def __init__(self, counters: tuple[_Counter, ...]) -> None:
        self.counters = counters
        self.refs = [c.ref for c in counters]
        self.limits = [c.limit for c in counters]
        self.enforce = [c.cb.enforce for c in counters]
        self.names = [c.cb.budget.name for c in counters if c.cb.unit == "usd"]
        # The lease's meta sits on the first counter and an expiry records that counter's amount
        # as the cost: only a budget's amount is one.
        self.meta_first = bool(counters) and counters[0].cb.unit == "usd"
        periods = [c.period for c in counters if c.period is not None]
        self.valid_from = max((p.start for p in periods), default=float("-inf"))
        self.valid_to = min((p.end for p in periods), default=float("inf"))


class _Match:
    """The budgets one combination of attributes matches (see `BudgetEngine._matching`), and the
    plan for its current periods."""

    __slots__ = ("items", "plan")

    def __init__(self, items: list[tuple[_Compiled, dict[str, str], str, int]]) -> None:
        self.items = items
        self.plan: _Plan | None = None


@dataclass(slots=True)
class _Request:
    """The parts of an admit call that stay the same across candidate models."""

    request_id: str
    attrs: Attrs
    input_tokens: int
    max_output_tokens: int
    min_output_tokens: int
    cost_fn: CostFn
    lease_seconds: float
    now: float
    meta: "LeaseMeta | None"


@dataclass
class _Attempt:
    admission: Admission
    failing: list[_Counter]


def _warn_level(budget: Budget, used: int, limit: int) -> float | None:
    frac = used / limit if limit > 0 else (1.0 if used == 0 else float("inf"))
    reached = [w for w in budget.warn_at if frac >= w]
    return max(reached) if reached else None


class BudgetEngine:
    """Enforces dollar budgets with reservations in Redis. Safe to share between concurrent requests."""

    def __init__(
        self,
        budgets: list[Budget],
        redis: aredis.Redis,
        *,
        clock: Callable[[], float] | None = None,
        prefix: str = "tollgate:",
        outbox: Outbox | None = None,
        redis_time: bool | None = None,
        pipe: ScriptPipe | None = None,
        rate_limits: list[RateLimit] | None = None,
    ) -> None:
        """`clock` picks calendar periods and key TTLs (default: time.time). Leases and rolling
        buckets run on Redis's clock when `redis_time` (the default without a `clock`), else on
        `clock` too (tests that move time by hand)."""
        # Budgets first: a request's first counter, which keeps its lease's meta and decides the
        # settle's outcome, is a budget's whenever one applies (settle.lua, reserve.lua).
        self._budgets = [_Compiled(b, window_for(b.window)) for b in budgets]
        for rl in rate_limits or ():
            as_budget = rl.as_budget()
            for unit, limit in (("requests", rl.requests), ("tokens", rl.tokens)):
                if limit is not None:
                    self._budgets.append(_Compiled(as_budget, window_for(as_budget.window), unit, limit))
        self._clock = clock or time.time
        use_redis = clock is None if redis_time is None else redis_time
        self._script_clock = None if use_redis else self._clock
        self._prefix = prefix
        self._store = BudgetStore(redis, prefix=prefix, grace=KEY_GRACE_SECONDS, pipe=pipe)
        self._match_cache: dict[tuple[Any, ...], _Match] = {}
        self.outbox = outbox

    def _script_now(self) -> float | None:
        return self._script_clock() if self._script_clock is not None else None

    async def load_scripts(self) -> None:
        """Load the Lua scripts now (e.g. at startup or in a readiness check) instead of on the first request.

        Raises StoreError if Redis is unreachable."""
        await self._store.load()

    # ---- matching -------------------------------------------------------------------------

    def _matching(self, attrs: Attrs, for_status: bool) -> _Match:
        """The budgets these attrs count against, each with its `per` values, their key part and the
        limit that applies: what does not depend on the time, so it is worked out once per
        distinct identity and model (the matching, tier and override rules, the limit's Decimal
        arithmetic and the key quoting were about a tenth of the ext_proc's Python per request)."""
        key = (for_status, *((k, tuple(v) if isinstance(v, list) else v) for k, v in attrs.items()))
        hit = self._match_cache.get(key)
        if hit is not None:
            return hit
        out = []
        for cb in self._budgets:
            b = cb.budget
            if not budget_matches(b, attrs, ignore_missing_model=for_status):
                continue
            per = per_values(b, attrs)
            out.append((cb, per, per_key(per), limit_nusd(b, attrs) if cb.unit == "usd" else cb.fixed_limit))
        if len(self._match_cache) >= _MATCH_CACHE_SIZE:
            self._match_cache.clear()  # many distinct identities: start over rather than grow
        m = self._match_cache[key] = _Match(out)
        return m

    def _plan(self, attrs: Attrs, now: float, *, for_status: bool = False) -> _Plan:
        """The counters at `now`: the plan of the period `now` is in, rebuilt when a period ends."""
        m = self._matching(attrs, for_status)
        plan = m.plan
        if plan is not None and plan.valid_from <= now < plan.valid_to:
            return plan
        out: list[_Counter] = []
        for cb, per, per_part, limit in m.items:
            w = cb.window
            if isinstance(w, Calendar):
                period: Period | None = w.period(now)
                assert period is not None
                ref = CounterRef(f"{self._prefix}{cb.key_part}:{period.id}:{per_part}", period.end)
            else:
                period = None
                ref = CounterRef(f"{self._prefix}{cb.key_part}:{w.key_part()}:{per_part}", None, w.bucket_seconds,
                                 w.n_buckets, cb.unit)
            out.append(_Counter(cb, dict(per), ref, limit, period))
        m.plan = plan = _Plan(tuple(out))
        return plan

    def _counters(self, attrs: Attrs, now: float, *, for_status: bool = False) -> tuple[_Counter, ...]:
        return self._plan(attrs, now, for_status=for_status).counters

    def counter_keys(self, attrs: Attrs) -> list[str]:
        """The Redis hash keys this request would count against (attrs must include model/provider)."""
        return [c.ref.key for c in self._counters(attrs, self._clock())]

    # ---- status snapshots -----------------------------------------------------------------

    def _status(self, c: _Counter, st: CounterState, now: float, *, cost: int, held: bool) -> BudgetStatus:
        """Snapshot of a counter; `held` = this request's `cost` is now reserved on it (else it was refused)."""
        reserved = st.reserved + (cost if held else 0)
        used = st.spent + reserved
        resets_at: float | None
        retry: float | None
        w = c.cb.window
        if isinstance(w, Calendar):
            assert c.period is not None
            resets_at, retry = c.period.end, max(0.0, c.period.end - now)
        else:
            retry = None
            if st.buckets:
                retry = w.retry_after(now, list(st.buckets), st.reserved, 0 if held else max(cost, 1), c.limit)
            resets_at = now + retry if retry else None
            if resets_at is None and c.cb.unit != "usd":  # when what this window now holds has aged out
                resets_at = float((w.bucket_index(now) + w.n_buckets) * w.bucket_seconds)
        return BudgetStatus(
            name=c.cb.budget.name,
            key=c.ref.key,
            per=dict(c.per),
            spent_nusd=st.spent,
            reserved_nusd=reserved,
            limit_nusd=c.limit,
            remaining_nusd=max(0, c.limit - used),
            resets_at=resets_at,
            retry_after_seconds=retry,
            mode=c.cb.budget.mode,
            window=c.cb.window_text,
            warn_level=_warn_level(c.cb.budget, used, c.limit),  # a rate limit has no warn_at
            unit=c.cb.unit,
        )

    # ---- admit ----------------------------------------------------------------------------

    async def admit(
        self,
        *,
        request_id: str,
        attrs: Mapping[str, str | list[str]],
        model: str,
        provider: str,
        input_tokens: int,
        max_output_tokens: int,
        min_output_tokens: int = 16,
        cost_fn: CostFn,
        provider_of: ProviderOf,
        lease_seconds: float,
        meta: LeaseMeta | None = None,
    ) -> Admission:
        """Decide whether (and with which model / output cap) a request may go upstream, reserving its worst case.

        `meta` builds what the lease keeps (extproc/usage.py `lease_meta`) for the candidate
        actually reserved, so that if it expires unsettled its charge is still rolled up and
        recorded under the right model and budgets."""
        req = _Request(
            request_id, attrs, input_tokens, max_output_tokens, min_output_tokens, cost_fn, lease_seconds, self._clock(),
            meta,
        )
        first = await self._attempt(req, model, provider)
        if not first.failing:
            return first.admission
        down = next((c for c in first.failing if c.cb.budget.action == "downgrade"), None)
        if down is not None:
            for fb in down.cb.budget.fallbacks:
                if fb == model:
                    continue
                fb_provider = provider_of(fb)
                if fb_provider is None:
                    continue
                r = await self._attempt(req, fb, fb_provider)
                adm = r.admission
                if adm.decision in ("allowed", "clamped") and not adm.store_error:
                    adm.decision = "downgraded"
                    adm.blocking = first.admission.blocking
                    adm.reason = f"budget {down.cb.budget.name!r} exhausted for {model}; downgraded to {fb}" + (
                        f" with max_output_tokens={adm.max_output_tokens}" if adm.max_output_tokens != max_output_tokens else ""
                    )
                    return adm
                if adm.store_error:
                    return adm
            first.admission.reason += "; no fallback fits"
        return first.admission

    async def _attempt(self, req: _Request, model: str, provider: str) -> _Attempt:
        """Try one candidate model: reserve its worst case, or clamp; `failing` is empty iff it was not blocked."""
        request_id, input_tokens, max_output_tokens, min_output_tokens = (
            req.request_id, req.input_tokens, req.max_output_tokens, req.min_output_tokens
        )
        cost_fn, now = req.cost_fn, req.now
        eff: dict[str, str | list[str]] = {**req.attrs, "model": model, "provider": provider}
        plan = self._plan(eff, now)
        counters = plan.counters
        names = list(plan.names)
        base: dict[str, Any] = dict(
            model=model, provider=provider, max_output_tokens=max_output_tokens, request_id=request_id, budgets=names
        )
        if not counters:
            return _Attempt(Admission("allowed", reason="no budget applies", **base), [])
        cost = cost_fn(model, input_tokens, max_output_tokens)
        if cost is None:
            enforce = [c for c in counters if c.cb.enforce and c.cb.unit == "usd"]
            if enforce:
                reason = f"model {model!r} has no price; budget {enforce[0].cb.budget.name!r} cannot be enforced"
                return _Attempt(Admission("blocked", reason=reason, **base), enforce)
            cost = 0
        amounts = _amounts(counters, cost, input_tokens, max_output_tokens)
        try:
            res = await self._reserve(plan, req, amounts, model, provider)
        except StoreError as e:
            return _Attempt(self._store_failure(counters, e, base), [])
        if res.ok:
            return _Attempt(self._admitted("allowed", counters, res.states, cost, amounts, now, base), [])

        failing = [c for c, s in zip(counters, res.states) if c.cb.enforce and s.over]
        states = res.states
        limited = next((c for c in failing if c.cb.unit != "usd"), None)
        if limited is not None:  # a rate limit: no clamp or fallback makes room, the window must age
            i = counters.index(limited)
            st = self._status(limited, states[i], now, cost=amounts[i], held=False)
            reason = (f"rate limit {st.name!r} exceeded: {st.spent_nusd + st.reserved_nusd} {st.unit} in its window "
                      f"+ {amounts[i]} > {st.limit_nusd}")
            return _Attempt(Admission("blocked", limited=st, reason=reason, **base), failing)
        if all(c.cb.budget.clamp for c in failing) and min_output_tokens <= max_output_tokens:
            for _ in range(CLAMP_ATTEMPTS):
                cap = self._largest_cap(counters, states, cost_fn, model, input_tokens, min_output_tokens, max_output_tokens)
                if cap is None:
                    break
                clamped_cost = cost_fn(model, input_tokens, cap)
                assert clamped_cost is not None
                clamped = _amounts(counters, clamped_cost, input_tokens, cap)
                try:
                    res = await self._reserve(plan, req, clamped, model, provider)
                except StoreError as e:
                    return _Attempt(self._store_failure(counters, e, base), [])
                if res.ok:
                    adm = self._admitted("clamped", counters, res.states, clamped_cost, clamped, now,
                                         {**base, "max_output_tokens": cap})
                    adm.blocking = self._status(failing[0], states[counters.index(failing[0])], now, cost=cost, held=False)
                    adm.reason = f"budget {failing[0].cb.budget.name!r} nearly exhausted; max_output_tokens lowered to {cap}"
                    return _Attempt(adm, [])
                states = res.states  # lost a race: retry with the fresher numbers, if clamping still applies
                failing = [c for c, s in zip(counters, states) if c.cb.enforce and s.over] or failing
                if not all(c.cb.budget.clamp for c in failing):
                    break

        by_counter = dict(zip((c.ref.key for c in counters), states))
        blocking = self._status(failing[0], by_counter[failing[0].ref.key], now, cost=cost, held=False)
        shadow = [
            self._status(c, s, now, cost=cost, held=False) for c, s in zip(counters, states) if not c.cb.enforce and s.over
        ]
        reason = (
            f"budget {blocking.name!r} exceeded: spent ${nusd_to_usd(blocking.spent_nusd):.4f} + reserved "
            f"${nusd_to_usd(blocking.reserved_nusd):.4f} + this request ${nusd_to_usd(cost):.4f} > limit "
            f"${nusd_to_usd(blocking.limit_nusd):.4f}"
        )
        return _Attempt(Admission("blocked", blocking=blocking, shadow_blocked=shadow, reason=reason, **base), failing)

    async def _reserve(self, plan: _Plan, req: _Request, amounts: list[int], model: str,
                       provider: str) -> ReserveResult:
        meta = b""
        if req.meta is not None and plan.meta_first:
            meta = req.meta(model, provider, plan.names, amounts[0])
        return await self._store.reserve(
            plan.refs,
            plan.limits,
            plan.enforce,
            request_id=req.request_id,
            amounts=amounts,
            now=self._script_now(),
            ttl_now=req.now,
            lease_seconds=req.lease_seconds,
            meta=meta,
        )

    @staticmethod
    def _largest_cap(
        counters: Sequence[_Counter],
        states: list[CounterState],
        cost_fn: CostFn,
        model: str,
        input_tokens: int,
        lo: int,
        hi: int,
    ) -> int | None:
        """Largest output cap in [lo, hi] whose worst case fits every enforce counter's headroom (None if not even lo)."""
        headroom = min(c.limit - s.spent - s.reserved for c, s in zip(counters, states)
                       if c.cb.enforce and c.cb.unit == "usd")

        def fits(n: int) -> bool:
            cost = cost_fn(model, input_tokens, n)
            return cost is not None and cost <= headroom

        if not fits(lo):
            return None
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if fits(mid):
                lo = mid
            else:
                hi = mid - 1
        return lo

    def _admitted(
        self,
        decision: Decision,
        counters: Sequence[_Counter],
        states: list[CounterState],
        cost: int,
        amounts: list[int],
        now: float,
        base: dict[str, Any],
    ) -> Admission:
        # A status (13 fields, a window's reset) only for the counters the answer names: the
        # tightest enforced budget, those past a warn_at, every rate limit. The rest are ints.
        made: dict[int, BudgetStatus] = {}

        def status(i: int) -> BudgetStatus:
            st = made.get(i)
            if st is None:
                st = made[i] = self._status(counters[i], states[i], now, cost=amounts[i], held=True)
            return st

        tight, tight_left = -1, 0
        warn: list[int] = []
        limits: list[int] = []
        for i, (c, s, a) in enumerate(zip(counters, states, amounts)):
            cb = c.cb
            used = s.spent + s.reserved + a
            if cb.unit != "usd":
                limits.append(i)
            elif cb.budget.mode == "enforce" and (tight < 0 or max(0, c.limit - used) < tight_left):
                tight, tight_left = i, max(0, c.limit - used)  # the first of the least left, as min() picks
            if cb.budget.warn_at and _warn_level(cb.budget, used, c.limit) is not None:
                warn.append(i)
        shadow = [
            self._status(c, s, now, cost=a, held=False)
            for c, s, a in zip(counters, states, amounts) if not c.cb.enforce and s.over
        ]
        return Admission(
            decision,
            reserved_nusd=cost,
            tightest=status(tight) if tight >= 0 else None,
            warnings=[status(i) for i in warn],
            shadow_blocked=shadow,
            reason="within budget" if decision == "allowed" else "",
            counters=tuple(c.ref for c in counters),
            rate_limits=[status(i) for i in limits],
            **base,
        )

    def _store_failure(self, counters: Sequence[_Counter], err: StoreError, base: dict[str, Any]) -> Admission:
        if all(c.cb.budget.on_store_error == "fail_open" for c in counters):
            log.warning("budget store unavailable, failing open: %s", err)
            return Admission("allowed", store_error=True, reason=f"budget store unavailable ({err}); fail_open", **base)
        log.error("budget store unavailable, failing closed: %s", err)
        closed = next(c.cb.budget.name for c in counters if c.cb.budget.on_store_error == "fail_closed")
        return Admission("store_error", store_error=True, reason=f"budget store unavailable ({err}); budget {closed!r} fails closed", **base)

    # ---- dry run --------------------------------------------------------------------------

    async def dry_run(
        self,
        *,
        attrs: Mapping[str, str | list[str]],
        model: str,
        provider: str,
        input_tokens: int,
        max_output_tokens: int,
        min_output_tokens: int = 16,
        cost_fn: CostFn,
        provider_of: ProviderOf,
    ) -> Admission:
        """What `admit` would decide right now, reserving nothing and writing nothing to Redis.

        Runs `admit`'s own decision logic (match, limits, clamp, downgrade, block) on a view of
        this engine whose reserve step is replaced by read-only reads of the counters (plain
        HGET/HMGET/ZRANGEBYSCORE: leases past their expiry count as spent, as the scripts would
        charge them, but nothing is written). It reads on the gateway's clock. The answer carries no `counters`, so it can never be
        settled or released; `reserved_nusd` is the worst case that would have been reserved.
        """
        view = copy.copy(self)
        view._reserve = self._peek_reserve  # type: ignore[method-assign]
        adm = await BudgetEngine.admit(
            view, request_id="dry-run", attrs=attrs, model=model, provider=provider, input_tokens=input_tokens,
            max_output_tokens=max_output_tokens, min_output_tokens=min_output_tokens, cost_fn=cost_fn,
            provider_of=provider_of, lease_seconds=0,
        )
        adm.counters = ()
        adm.request_id = ""
        return adm

    async def _peek_reserve(self, plan: _Plan, req: _Request, amounts: list[int], model: str,
                            provider: str) -> ReserveResult:
        """reserve.lua's verdict without its writes: over = spent + reserved + amount > limit, per counter."""
        now = req.now
        counters = plan.counters
        states = await self._peek(plan.refs, now)
        ok, out = True, []
        for c, s, amount in zip(counters, states, amounts, strict=True):
            over = s.spent + s.reserved + amount > c.limit
            if over and c.cb.enforce:
                ok = False
            # Like reserve.lua: buckets (for retry_after) only for counters that are over.
            out.append(CounterState(s.spent, s.reserved, over, s.buckets if over else ()))
        return ReserveResult(ok, out, now)

    async def _peek(self, refs: list[CounterRef], now: float) -> list[CounterState]:
        """Spent and live reservations of each counter, with read commands only (one MULTI, plus one
        HMGET per counter that holds expired leases)."""
        redis = self._store.redis
        try:
            pipe = redis.pipeline(transaction=True)
            for ref in refs:
                if ref.n_buckets:
                    idx = ref.bucket_index(now)
                    pipe.hmget(ref.key, [f"b:{i}" for i in range(idx - ref.n_buckets + 1, idx + 1)])
                else:
                    pipe.hget(ref.key, "spent")
                pipe.hget(ref.key, "reserved")
                pipe.zrangebyscore(ref.lease_key, "-inf", repr(float(now)))
            replies = await pipe.execute()
            out: list[CounterState] = []
            for i, ref in enumerate(refs):
                spent_raw, reserved_raw, expired = replies[3 * i: 3 * i + 3]
                buckets: tuple[int, ...] = ()
                if ref.n_buckets:
                    buckets = tuple(_int(v) for v in spent_raw)
                    spent = sum(buckets)
                else:
                    spent = _int(spent_raw)
                reserved = _int(reserved_raw)
                leases = [r if isinstance(r, bytes) else r.encode() for r in expired]
                leases = [r for r in leases if not r.startswith(b"x:")]  # tombstones hold nothing
                if leases:
                    held = sum(_int(v) for v in await redis.hmget(ref.key, [b"r:" + r for r in leases]))
                    reserved -= held
                    spent += held  # the scripts would charge an expired lease
                out.append(CounterState(spent, reserved, False, buckets))
            return out
        except (RedisError, OSError, TimeoutError) as e:
            raise StoreError(f"{type(e).__name__}: {e}") from e

    # ---- settle / release / status --------------------------------------------------------

    async def settle(self, admission: Admission, actual_nusd: int, tokens: int = 0) -> SettleOutcome:
        """Replace the reservation by the real cost on every counter it touched; idempotent per request_id; never raises."""
        if not admission.counters:
            return "nothing"
        return await self.account(admission.request_id, admission.counters, actual_nusd, tokens=tokens)

    async def account(self, request_id: str, counters: tuple[CounterRef, ...], actual_nusd: int, *,
                      usage: UsageWrite | None = None, tokens: int = 0) -> SettleOutcome:
        """Settle `counters` (possibly none) and, with `usage`, write the attribution rollups and
        record in the same atomic call. Idempotent per request_id; never raises. `tokens` (all
        input kinds plus output, as the provider reported) is what token rate limits are charged.

        When Redis cannot take it, the call goes to the outbox ("queued") and is replayed later;
        without an outbox it is lost ("store_error", logged)."""
        if not counters and usage is None:
            return "nothing"
        actual = max(0, int(actual_nusd))
        keys, args = self._store.settle_call(list(counters), request_id=request_id, actual=actual,
                                             now=self._script_now(), ttl_now=self._clock(), usage=usage,
                                             actuals=settled_amounts(counters, actual, max(0, tokens)))
        try:
            outcome = await self._store.replay_settle(keys, args)
        except StoreError as e:
            if self.outbox is not None:
                try:
                    self.outbox.put(keys, args)
                except Exception:  # disk full, permissions: say so loudly, the settle is lost
                    log.exception("settle of %s (%d nUSD) lost: Redis failed (%s) and the outbox too",
                                  request_id, actual_nusd, e)
                    return "store_error"
                log.warning("settle of %s (%d nUSD) queued in the outbox: %s", request_id, actual_nusd, e)
                return "queued"
            log.error("settle of %s (%d nUSD) lost: %s", request_id, actual_nusd, e)
            return "store_error"
        return outcome  # type: ignore[return-value]

    async def replay_outbox(self, batch: int = 200) -> int:
        """Replay queued settles in order until the outbox is empty or Redis fails; returns how many
        were applied (a settle that had landed after all comes back as a duplicate, harmlessly)."""
        if self.outbox is None:
            return 0
        done = 0
        while True:
            entries = self.outbox.peek(batch)
            if not entries:
                return done
            for entry in entries:
                try:
                    await self._store.replay_settle(entry.keys, entry.args)
                except StoreError:
                    return done
                self.outbox.remove(entry.id)
                done += 1

    async def release(self, admission: Admission) -> ReleaseOutcome:
        """Drop the reservation without charging (it never reached the provider); never raises.
        If Redis fails the lease stays and expires into a charge: released leases are not queued,
        since the request may yet be settled by a retry of its own."""
        if not admission.counters:
            return "nothing"
        try:
            await self._store.release(list(admission.counters), request_id=admission.request_id, now=self._script_now())
        except StoreError as e:
            log.warning("budget release of %s failed (lease will expire): %s", admission.request_id, e)
            return "store_error"
        return "released"

    async def sweep_expired(self, batch: int = 200) -> int:
        """Charge leases that expired on counters no request touches any more (a crashed
        gateway's per-user counter, idle since): the scripts charge an expired lease the next
        time they touch its counter, and this touches the ones that hold one. Returns how many
        counters were swept. Raises StoreError if Redis is down."""
        redis = self._store.redis
        now = self._clock()
        swept = 0
        try:
            due: list[CounterRef] = []
            for kind in ("b", "rl"):
                async for raw in redis.scan_iter(match=f"{self._prefix}{kind}:*:leases", count=1000):
                    key = raw.decode() if isinstance(raw, bytes) else raw
                    if not await redis.zrangebyscore(key, "-inf", repr(float(now)), start=0, num=1):
                        continue
                    counter = key[: -len(":leases")]
                    # {prefix}b:{budget}:{period}:{per} or {prefix}rl:{name}:{unit}:{window}:{per}; names hold no ':'
                    parts = counter[len(self._prefix):].split(":", 4)
                    rolling = Rolling.from_key_part(parts[2] if kind == "b" else parts[3])
                    due.append(CounterRef(counter, None, rolling.bucket_seconds, rolling.n_buckets) if rolling
                               else CounterRef(counter, 0.0))
                    if len(due) >= batch:
                        await self._store.read(due, now=self._script_now())
                        swept, due = swept + len(due), []
            if due:
                await self._store.read(due, now=self._script_now())
                swept += len(due)
        except (RedisError, OSError) as e:
            raise StoreError(f"{type(e).__name__}: {e}") from e
        return swept

    async def status(self, attrs: Mapping[str, str | list[str]]) -> list[BudgetStatus]:
        """Every counter these attrs count against, right now. Budgets filtered by model/provider are
        included when attrs carry no `model`/`provider`. Raises StoreError if Redis is down."""
        now = self._clock()
        counters = self._counters(attrs, now, for_status=True)
        if not counters:
            return []
        states = await self._store.read([c.ref for c in counters], now=self._script_now())
        return [self._status(c, s, now, cost=0, held=False) for c, s in zip(counters, states)]



def _amount(unit: str, cost: int, tokens: int) -> int:
    """What a counter counts of a request: a budget its cost, a request rate limit one request, a
    token rate limit its tokens."""
    return cost if unit == "usd" else 1 if unit == "requests" else tokens


def _amounts(counters: Sequence[_Counter], cost: int, input_tokens: int, cap: int) -> list[int]:
    """What a reservation holds on each counter: the worst case (tokens: the input upper bound
    plus the output cap)."""
    return [_amount(c.cb.unit, cost, input_tokens + cap) for c in counters]


def settled_amounts(counters: tuple[CounterRef, ...], cost: int, tokens: int) -> list[int] | None:
    """What a settle charges each counter (None: the cost on every one, the settle's old layout)."""
    if all(c.unit == "usd" for c in counters):
        return None
    return [_amount(c.unit, cost, tokens) for c in counters]


def _int(v: object) -> int:
    """A Redis integer field (bytes, str or None; amounts are written as plain digits) as int; missing = 0."""
    return 0 if v is None else int(v)  # type: ignore[call-overload]
