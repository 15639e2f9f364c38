"""Rate limits in the budget engine, against a real Redis: counted in the same reserve call as the
budgets (all or nothing), settled in their own units, and expired like any lease."""

from __future__ import annotations

import redis.asyncio as aredis
from budget_helpers import FakeClock, admit, budgets

from extproc.budgets import BudgetEngine, RateLimit, usd_to_nusd

DAY = {"calendar": "day"}


def engine(rds: aredis.Redis, clock: FakeClock, prefix: str, budget_items: list[dict], *limits: dict) -> BudgetEngine:
    return BudgetEngine(budgets(*budget_items), rds, clock=clock, prefix=prefix,
                        rate_limits=[RateLimit.model_validate(x) for x in limits])


async def test_requests_and_tokens_settle_in_their_own_units(rds: aredis.Redis, clock: FakeClock, prefix: str) -> None:
    e = engine(rds, clock, prefix, [{"name": "daily", "per": ["user"], "limit_usd": 10, "window": DAY}],
               {"name": "rl", "per": ["user"], "requests": 2, "tokens": 5000, "window": "1m"})
    a = await admit(e, "r1", input_tokens=100, max_output_tokens=1000)
    assert a.decision == "allowed" and a.budgets == ["daily"]
    assert [c.unit for c in a.counters] == ["usd", "requests", "tokens"]  # the budget first: it keeps the meta
    by_unit = {st.unit: st for st in a.rate_limits}
    assert (by_unit["requests"].reserved_nusd, by_unit["requests"].remaining_nusd) == (1, 1)
    assert (by_unit["tokens"].reserved_nusd, by_unit["tokens"].remaining_nusd) == (1100, 3900)
    assert await e.settle(a, usd_to_nusd(0.001), tokens=130) == "settled"
    st = {s.name: s for s in await e.status({"user": "alice", "model": "gpt-4o", "provider": "openai"})}
    assert st["daily"].spent_nusd == usd_to_nusd(0.001)
    rl = await e._store.read([c for c in a.counters if c.unit != "usd"], now=clock())
    assert [(s.spent, s.reserved) for s in rl] == [(1, 0), (130, 0)]


async def test_a_rate_limit_refuses_all_or_nothing_and_no_clamp_helps(rds: aredis.Redis, clock: FakeClock,
                                                                      prefix: str) -> None:
    e = engine(rds, clock, prefix, [{"name": "daily", "per": ["user"], "limit_usd": 10, "window": DAY, "clamp": True}],
               {"name": "rl", "per": ["user"], "tokens": 1000, "window": "1m"})
    ok = await admit(e, "r1", max_output_tokens=900)
    assert ok.admitted
    refused = await admit(e, "r2", max_output_tokens=200)
    assert refused.decision == "blocked" and refused.blocking is None and refused.reserved_nusd == 0
    assert refused.limited is not None and refused.limited.name == "rl" and refused.limited.unit == "tokens"
    assert "rate limit 'rl'" in refused.reason
    # nothing was held on the budget for the refused request: the reserve is all or nothing
    st = {s.name: s for s in await e.status({"user": "alice", "model": "gpt-4o", "provider": "openai"})}
    assert st["daily"].reserved_nusd == ok.reserved_nusd


async def test_window_slides_on_the_engine_clock(rds: aredis.Redis, clock: FakeClock, prefix: str) -> None:
    e = engine(rds, clock, prefix, [], {"name": "rpm", "requests": 2, "window": "1m"})
    for rid in ("a", "b"):
        a = await admit(e, rid)
        assert a.admitted and a.budgets == []
        assert await e.settle(a, 0) == "settled"
    blocked = await admit(e, "c")
    assert blocked.limited is not None and 0 < (blocked.limited.retry_after_seconds or 0) <= 60
    clock.advance(61)
    assert (await admit(e, "d")).admitted


async def test_settle_in_the_old_layout_still_charges_every_counter(rds: aredis.Redis, clock: FakeClock,
                                                                    prefix: str) -> None:
    """A settle an older gateway queued in its outbox has no per-counter amounts: the script
    charges `actual` on every counter, as it always did."""
    e = engine(rds, clock, prefix, [{"name": "daily", "limit_usd": 10, "window": DAY}])
    a = await admit(e, "r1")
    keys, args = e._store.settle_call(list(a.counters), request_id="r1", actual=777, now=clock(), ttl_now=clock())
    assert "A" not in args
    assert await e._store.replay_settle(keys, args) == "settled"
    assert (await e._store.read(list(a.counters), now=clock()))[0].spent == 777


async def test_an_orphaned_rate_limit_lease_is_swept_into_its_window(rds: aredis.Redis, clock: FakeClock,
                                                                     prefix: str) -> None:
    """A gateway that died holding a lease: the sweep (which finds counters nobody touches any
    more) charges it on a rate limit's window as on a budget's, and nothing stays reserved."""
    e = engine(rds, clock, prefix, [], {"name": "rpm", "per": ["user"], "requests": 5, "tokens": 10_000, "window": "1h"})
    a = await admit(e, "dead", input_tokens=10, max_output_tokens=90, lease_seconds=5)
    assert a.admitted
    clock.advance(6)
    assert await e.sweep_expired() == 2
    states = await e._store.read(list(a.counters), now=clock())
    assert [(s.spent, s.reserved) for s in states] == [(1, 0), (100, 0)]
