"""Redis side of budgets: the Lua scripts and the typed calls around them.

Key layout (all under the engine's prefix, default `tollgate:`):

* `{prefix}b:{budget}:{period}:{per}` — HASH for one counter. Fields: `spent` (calendar, settled
  nano-USD) or `b:<bucket index>` (rolling, settled nano-USD per bucket) plus `lo` (oldest bucket
  kept); `reserved` (sum of live leases); `r:<request_id>` (one live lease's amount);
  `x:<request_id>` (the tombstone of a lease that expired into a charge: the amount charged, kept
  a day for a late settle); `m:<request_id>` (on a request's first counter only, while its lease
  lives: what an expiry needs to roll up and record the charge). `{period}` is the calendar
  period id (`2026-11-28`, `W2026-11-23`, `2026-11`) or `r<window>s<bucket>` for rolling. `{per}`
  is `attr=value` pairs joined by `,` (values URL-quoted), or `_` for a shared counter.
* `{prefix}rl:{rate limit}:{requests|tokens}:r{window}s{bucket}:{per}` — HASH for one rate-limit
  window (docs/ratelimits.md): the rolling counter's fields, counting requests or tokens.
* `{counter}:leases` — ZSET scored by expiry on Redis's clock: `<request_id>` for a live lease,
  `x:<request_id>` for a tombstone.
* `{prefix}settled:{request_id}` — STRING marker, only for a request that counts against no
  budget (it has no lease to make its settle idempotent), kept `NO_COUNTER_MARKER_TTL`.
* `{prefix}cache:{scope}:{digest}` — STRING, one response-cache entry with its TTL; written once
  (SET NX) by extproc/cache/store.py, whose docstring has its format.
* `{prefix}alerts:sent:...`, `{prefix}alerts:spend:...` — alert claims (SET NX: each event sent
  once) and counters' hourly spend history, written by extproc/alerts/store.py, whose docstring
  has their format.

Counters expire `KEY_GRACE_SECONDS` after their calendar period ends (the expiry set by the key's
first write; rolling: after a full window without writes, refreshed by every call). Every script
first purges the expired leases of the counters it touches: a lease that expired without a settle
is charged (its gateway died or lost Redis after forwarding).
All keys of one call are passed as KEYS, except the rollup and stream keys an expiry writes (held
in the lease's meta); for Redis Cluster they would need a common hash tag.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from importlib import resources
from typing import Any

import redis.asyncio as aredis
from redis.exceptions import RedisError

from .pipe import ScriptPipe, sha1

NO_COUNTER_MARKER_TTL = 86400
"""How long a request that counts against no budget is remembered as settled: its settle can be
retried (from the outbox) within this time without being rolled up twice."""


@dataclass(slots=True)
class UsageWrite:
    """What a settle also writes for attribution: day rollup increments and the record itself."""

    usage_key: str
    stream_key: str
    ttl: int
    stream_maxlen: int
    stream_max_age_ms: int
    record_json: bytes  # the record as a JSON object without its closing brace: the script adds "settlement"
    increments: tuple[tuple[str, int], ...]


class StoreError(Exception):
    """Redis could not be reached or answered with an error; the engine maps this to fail_open/fail_closed."""


@dataclass(frozen=True)
class CounterRef:
    """Where one counter lives and how to address its window; kept in the Admission for settle/release."""

    key: str
    period_end: float | None  # calendar: end of the period the reservation was made in; rolling: None
    bucket_seconds: int = 0  # rolling only
    n_buckets: int = 0  # 0 = calendar counter
    unit: str = "usd"  # what it counts: "usd" (a budget, nano-USD), "requests" or "tokens" (a rate limit)

    @property
    def lease_key(self) -> str:
        return self.key + ":leases"

    def bucket_index(self, now: float) -> int:
        return math.floor(now / self.bucket_seconds) if self.n_buckets else 0

    def window_args(self) -> list[int]:
        """How a script finds the counter's window on its own clock: buckets and their seconds (0, 0: calendar)."""
        return [self.n_buckets, self.bucket_seconds or 1]

    def ttl(self, now: float, grace: int) -> int:
        """Relative TTL (computed on the engine clock, so tests with a fake clock do not expire keys early)."""
        if self.n_buckets:
            return self.n_buckets * self.bucket_seconds + grace
        assert self.period_end is not None
        return max(1, math.ceil(self.period_end - now)) + grace


@dataclass(slots=True)
class CounterState:
    """A counter as the script saw it: settled spend, live reservations (excluding the asking request), buckets."""

    spent: int
    reserved: int
    over: bool = False
    buckets: tuple[int, ...] = ()


@dataclass(slots=True)
class ReserveResult:
    ok: bool
    states: list[CounterState]
    now: float = 0.0  # the clock the script used (Redis's, unless the engine has its own)


def _script_text(name: str) -> str:
    lua = resources.files(__package__).joinpath("lua")
    return lua.joinpath("common.lua").read_text() + "\n" + lua.joinpath(f"{name}.lua").read_text()


_SCRIPTS = {name: _script_text(name) for name in ("reserve", "settle", "release", "read")}
_SHAS = {name: sha1(text) for name, text in _SCRIPTS.items()}


def _keys(counters: list[CounterRef]) -> list[str]:
    out: list[str] = []
    for c in counters:
        out += [c.key, c.lease_key]
    return out


def _num(now: float | None) -> str:
    """A script's `now` argument: '' makes the script use Redis's own clock."""
    return "" if now is None else repr(float(now))


class BudgetStore:
    """Typed wrappers over the four scripts (EVALSHA, loaded on first use); raises StoreError on any Redis failure."""

    def __init__(self, redis: aredis.Redis, *, prefix: str, grace: int, pipe: ScriptPipe | None = None) -> None:
        self.redis = redis
        self.prefix = prefix
        self.grace = grace
        self._scripts = {name: redis.register_script(text) for name, text in _SCRIPTS.items()}
        self._pipe = pipe  # the scripts' own connection, when the gateway has one (extproc/budgets/pipe.py)

    async def load(self) -> None:
        """SCRIPT LOAD every script, so the first EVALSHA does not miss."""
        try:
            for script in self._scripts.values():
                script.sha = await self.redis.script_load(script.script)
        except (RedisError, OSError, TimeoutError) as e:
            raise StoreError(f"{type(e).__name__}: {e}") from e

    async def _run(self, name: str, keys: list[str], args: list[Any]) -> Any:
        try:
            if self._pipe is not None:
                return await self._pipe.evalsha(_SHAS[name], _SCRIPTS[name], keys, args)
            return await self._scripts[name](keys=keys, args=args)
        except (RedisError, OSError, TimeoutError) as e:
            raise StoreError(f"{type(e).__name__}: {e}") from e

    async def reserve(
        self,
        counters: list[CounterRef],
        limits: list[int],
        enforce: list[bool],
        *,
        request_id: str,
        amounts: list[int],
        now: float | None,
        ttl_now: float,
        lease_seconds: float,
        meta: bytes = b"",
    ) -> ReserveResult:
        """Reserve each counter's amount if no enforce counter would exceed its limit; else reserve nothing.

        `now` is the script's clock (None: Redis's); `ttl_now` the engine's, for key TTLs. `meta`
        (see extproc/usage.py `lease_meta`) lets an expiry of this lease roll up and record its charge:
        it is kept on the first counter, which must then be a budget's (its amount is the cost).
        """
        args: list[Any] = [_num(now), request_id, repr(float(lease_seconds)), len(counters), meta]
        for c, limit, enf, amount in zip(counters, limits, enforce, amounts, strict=True):
            until = "" if c.period_end is None else f"{c.period_end:.0f}"
            args += [int(limit), 1 if enf else 0, c.ttl(ttl_now, self.grace), *c.window_args(), until, int(amount)]
        ok, rows, script_now = await self._run("reserve", _keys(counters), args)
        states = [
            CounterState(int(spent), int(reserved), bool(int(over)), tuple(int(b) for b in buckets))
            for spent, reserved, over, buckets in rows
        ]
        return ReserveResult(bool(int(ok)), states, float(script_now))

    async def settle(self, counters: list[CounterRef], *, request_id: str, actual: int, now: float | None,
                     ttl_now: float, usage: "UsageWrite | None" = None, actuals: list[int] | None = None) -> str:
        """Charge `actual` once per request_id and drop its leases; returns the script's outcome:
        settled | settled_after_expiry | recorded (no counters) | duplicate (already settled).

        With `usage`, the same atomic call rolls the request into the day's usage totals and
        appends its attribution record to the stream (see extproc/usage.py).
        """
        keys, args = self.settle_call(counters, request_id=request_id, actual=actual, now=now, ttl_now=ttl_now,
                                      usage=usage, actuals=actuals)
        return await self.replay_settle(keys, args)

    def settle_call(self, counters: list[CounterRef], *, request_id: str, actual: int, now: float | None,
                    ttl_now: float, usage: "UsageWrite | None" = None,
                    actuals: list[int] | None = None) -> tuple[list[str], list[Any]]:
        """The settle script's KEYS and ARGV: what the outbox keeps when Redis cannot take them.

        `actuals`, one per counter, when they differ from `actual` (rate limits settle in requests
        or tokens); without it every counter is charged `actual`, in the layout older gateways
        queued, which the script still takes."""
        args: list[Any] = [_num(now), request_id, int(actual), len(counters)]
        for c in counters:
            args += [c.ttl(ttl_now, self.grace), *c.window_args()]
        keys = _keys(counters)
        if usage is None:
            args.append(0)
        else:
            keys += [f"{self.prefix}settled:{request_id}", usage.usage_key, usage.stream_key]
            args += [1, usage.ttl, usage.stream_maxlen, usage.stream_max_age_ms, NO_COUNTER_MARKER_TTL,
                     usage.record_json, len(usage.increments)]
            for field, inc in usage.increments:
                args += [field, int(inc)]
        if actuals is not None:
            args += ["A", *(int(a) for a in actuals)]
        return keys, args

    async def replay_settle(self, keys: list[str], args: list[Any]) -> str:
        """Run a settle the outbox kept (idempotent: a settle that did land is a duplicate)."""
        outcome, _ = await self._run("settle", keys, args)
        return outcome.decode() if isinstance(outcome, bytes) else str(outcome)

    async def release(self, counters: list[CounterRef], *, request_id: str, now: float | None) -> int:
        """Drop request_id's leases; returns how many were still live."""
        args: list[Any] = [_num(now), request_id, len(counters)]
        for c in counters:
            args += c.window_args()
        return int(await self._run("release", _keys(counters), args))

    async def read(self, counters: list[CounterRef], *, now: float | None) -> list[CounterState]:
        """Spent and reserved of each counter right now."""
        args: list[Any] = [_num(now), len(counters)]
        for c in counters:
            args += c.window_args()
        rows = await self._run("read", _keys(counters), args)
        return [CounterState(int(s), int(r), False, tuple(int(b) for b in bs)) for s, r, bs in rows]
