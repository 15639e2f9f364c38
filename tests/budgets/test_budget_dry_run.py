"""BudgetEngine.dry_run: the same decision admit() would make, and not one byte written to Redis."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import redis.asyncio as aredis
from budget_helpers import PROVIDERS, FakeClock, admit, cost_fn, provider_of
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from extproc.budgets import Admission, BudgetEngine, usd_to_nusd
from extproc.procs import free_port

DAY = {"calendar": "day"}


def tokens_for(usd: float) -> int:
    return round(usd_to_nusd(usd) / 10_000)  # gpt-4o output tokens ($10 per million)


async def snapshot(rds: aredis.Redis, prefix: str) -> dict[bytes, Any]:
    """Every key under the prefix with its type, content and TTL."""
    out: dict[bytes, Any] = {}
    async for key in rds.scan_iter(match=f"{prefix}*"):
        kind = await rds.type(key)
        if kind == b"hash":
            val: Any = await rds.hgetall(key)
        elif kind == b"zset":
            val = await rds.zrange(key, 0, -1, withscores=True)
        else:
            val = await rds.get(key)
        out[key] = (kind, val, await rds.ttl(key))
    return out


async def dry(engine: BudgetEngine, *, user: str = "alice", model: str = "gpt-4o", input_tokens: int = 0,
              max_output_tokens: int = 1000, min_output_tokens: int = 16, **attrs: Any) -> Admission:
    return await engine.dry_run(attrs={"user": user, **attrs}, model=model, provider=PROVIDERS[model],
                                input_tokens=input_tokens, max_output_tokens=max_output_tokens,
                                min_output_tokens=min_output_tokens, cost_fn=cost_fn, provider_of=provider_of)


def same(a: Admission, b: Admission) -> None:
    """The parts of a decision a client sees."""
    assert (a.decision, a.model, a.provider, a.max_output_tokens) == (b.decision, b.model, b.provider, b.max_output_tokens)
    assert a.reserved_nusd == b.reserved_nusd and a.budgets == b.budgets
    assert a.reason == b.reason
    for x, y in ((a.blocking, b.blocking), (a.tightest, b.tightest)):
        assert (x is None) == (y is None)
        if x is not None and y is not None:
            assert (x.name, x.per, x.spent_nusd, x.reserved_nusd, x.limit_nusd, x.remaining_nusd) == (
                y.name, y.per, y.spent_nusd, y.reserved_nusd, y.limit_nusd, y.remaining_nusd)
            assert (x.resets_at, x.retry_after_seconds) == (y.resets_at, y.retry_after_seconds)
    assert [s.name for s in a.shadow_blocked] == [s.name for s in b.shadow_blocked]
    assert [s.name for s in a.warnings] == [s.name for s in b.warnings]


async def check(engine: BudgetEngine, rds: aredis.Redis, prefix: str, rid: str, **kw: Any) -> Admission:
    """Dry-run, prove nothing changed, then admit for real and compare."""
    before = await snapshot(rds, prefix)
    d = await dry(engine, **kw)
    assert await snapshot(rds, prefix) == before
    assert d.counters == () and d.request_id == ""
    a = await admit(engine, rid, **kw)
    same(d, a)
    return a


async def test_dry_run_matches_admit_allow_block_downgrade(make_engine: Callable[..., BudgetEngine], rds, prefix) -> None:  # type: ignore[no-untyped-def]
    e = make_engine(
        {"name": "frontier", "match": {"models": ["gpt-4o"]}, "per": ["user"], "limit_usd": 0.01, "window": DAY,
         "action": "downgrade", "fallbacks": ["gpt-4o-mini"], "warn_at": [0.5]},
        {"name": "small", "match": {"models": ["gpt-4o-mini"]}, "per": ["user"], "limit_usd": 0.0006, "window": DAY},
        {"name": "team-shadow", "per": ["team"], "limit_usd": 0.001, "window": DAY, "mode": "shadow"},
    )
    decisions = []
    for i in range(8):
        a = await check(e, rds, prefix, f"r{i}", max_output_tokens=tokens_for(0.004), team="ml")
        decisions.append(a.decision)
        if a.admitted:
            assert await e.settle(a, a.reserved_nusd) == "settled"
    assert decisions[:2] == ["allowed", "allowed"] and "downgraded" in decisions and decisions[-1] == "blocked"


async def test_dry_run_sees_live_leases_but_not_expired_ones(make_engine: Callable[..., BudgetEngine], rds, prefix,  # type: ignore[no-untyped-def]
                                                             clock: FakeClock) -> None:
    e = make_engine({"name": "d", "per": ["user"], "limit_usd": 1, "window": DAY})
    held = await admit(e, "held", max_output_tokens=tokens_for(0.7), lease_seconds=30)
    assert held.admitted
    d = await dry(e, max_output_tokens=tokens_for(0.5))
    assert d.decision == "blocked" and d.blocking is not None and d.blocking.reserved_nusd == usd_to_nusd(0.7)
    clock.advance(31)  # the lease expired: the scripts would purge it, the dry run leaves it out (and in place)
    await check(e, rds, prefix, "after", max_output_tokens=tokens_for(0.5))


async def test_dry_run_clamp_and_rolling(make_engine: Callable[..., BudgetEngine], rds, prefix, clock: FakeClock) -> None:  # type: ignore[no-untyped-def]
    e = make_engine(
        {"name": "clamped", "per": ["user"], "limit_usd": 1, "window": DAY, "clamp": True},
        {"name": "roll", "per": ["user"], "limit_usd": 2, "window": {"rolling": "4h", "bucket": "1h"}},
    )
    a = await admit(e, "a", max_output_tokens=tokens_for(0.8))
    await e.settle(a, usd_to_nusd(0.8))
    c = await check(e, rds, prefix, "c", max_output_tokens=tokens_for(0.5))
    assert c.decision == "clamped" and c.max_output_tokens == tokens_for(0.2)
    await e.settle(c, c.reserved_nusd)
    # blocked below the minimum answer; the rolling counter reports its buckets the same way
    await check(e, rds, prefix, "d", max_output_tokens=tokens_for(0.5), min_output_tokens=tokens_for(0.1))
    clock.advance(3600)
    e2 = make_engine({"name": "roll2", "per": ["user"], "limit_usd": 0.5, "window": {"rolling": "2h", "bucket": "1h"}})
    a = await admit(e2, "x", max_output_tokens=tokens_for(0.4))
    await e2.settle(a, usd_to_nusd(0.4))
    clock.advance(1800)
    b = await check(e2, rds, prefix, "y", max_output_tokens=tokens_for(0.3))
    assert b.decision == "blocked" and b.blocking is not None and b.blocking.retry_after_seconds


async def test_dry_run_store_down_follows_on_store_error() -> None:
    dead = aredis.Redis(host="127.0.0.1", port=free_port(), socket_timeout=0.2, socket_connect_timeout=0.2,
                        retry=Retry(NoBackoff(), 0))
    try:
        from budget_helpers import budgets

        closed = BudgetEngine(budgets({"name": "c", "limit_usd": 1, "window": DAY}), dead, clock=FakeClock())
        assert (await dry(closed)).decision == "store_error"
        opened = BudgetEngine(budgets({"name": "o", "limit_usd": 1, "window": DAY, "on_store_error": "fail_open"}),
                              dead, clock=FakeClock())
        d = await dry(opened)
        assert d.decision == "allowed" and d.store_error
    finally:
        await dead.aclose()
