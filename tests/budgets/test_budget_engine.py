"""BudgetEngine decisions against a real Redis: block, downgrade, clamp, shadow, leases, settle, release, windows."""

from __future__ import annotations

from collections.abc import Callable

import redis.asyncio as aredis
from budget_helpers import FakeClock, admit, budgets, ts

from extproc.budgets import BudgetEngine, usd_to_nusd
from extproc.budgets.windows import KEY_GRACE_SECONDS

USD = usd_to_nusd(1)
DAY = {"calendar": "day"}


def tokens_for(usd: float) -> int:
    """gpt-4o output tokens whose worst case costs `usd` ($10 per million)."""
    return round(usd_to_nusd(usd) / 10_000)


async def spend(engine: BudgetEngine, rid: str, usd: float, **kw) -> None:  # type: ignore[no-untyped-def]
    """Admit a request and settle it at exactly `usd`."""
    a = await admit(engine, rid, max_output_tokens=max(1, tokens_for(usd)), **kw)
    assert a.admitted, a
    assert await engine.settle(a, usd_to_nusd(usd)) == "settled"


async def test_block_reports_spent_limit_and_reset(make_engine: Callable[..., BudgetEngine], clock: FakeClock) -> None:
    e = make_engine({"name": "daily", "per": ["user"], "limit_usd": 1, "window": DAY})
    clock.set("2026-11-28T10:00:00")
    await spend(e, "r1", 0.6)
    a = await admit(e, "r2", max_output_tokens=tokens_for(0.5))
    assert a.decision == "blocked" and not a.admitted and a.reserved_nusd == 0
    b = a.blocking
    assert b is not None
    assert (b.name, b.per, b.mode) == ("daily", {"user": "alice"}, "enforce")
    assert (b.spent_nusd, b.reserved_nusd, b.limit_nusd, b.remaining_nusd) == (usd_to_nusd(0.6), 0, USD, usd_to_nusd(0.4))
    assert b.resets_at == ts("2026-11-29T00:00") and b.retry_after_seconds == 14 * 3600
    assert b.key.endswith(":b:daily:2026-11-28:user=alice")
    assert "daily" in a.reason and "exceeded" in a.reason
    # other users have their own counter; a smaller request still fits
    assert (await admit(e, "r3", user="bob", max_output_tokens=tokens_for(0.5))).decision == "allowed"
    assert (await admit(e, "r4", max_output_tokens=tokens_for(0.4))).decision == "allowed"
    # the next day starts from zero
    clock.set("2026-11-29T00:00:00")
    a = await admit(e, "r5", max_output_tokens=tokens_for(0.9))
    assert a.decision == "allowed" and a.tightest is not None
    assert a.tightest.key.endswith(":2026-11-29:user=alice") and a.tightest.remaining_nusd == usd_to_nusd(0.1)


async def test_counters_shared_per_user_per_team(make_engine: Callable[..., BudgetEngine]) -> None:
    e = make_engine(
        {"name": "org", "limit_usd": 100, "window": DAY},
        {"name": "users", "per": ["user"], "limit_usd": 10, "window": DAY},
        {"name": "teams", "per": ["team"], "limit_usd": 50, "window": DAY},
        {"name": "eng", "match": {"where": {"groups": "eng-*"}}, "per": ["team", "user"], "limit_usd": 5, "window": DAY},
    )

    def keys(**attrs: str | list[str]) -> set[str]:
        return {k.split(":", 2)[2] for k in e.counter_keys({"model": "gpt-4o", "provider": "openai", **attrs})}

    day = keys(user="x")
    day = next(iter(day)).split(":")[1]  # the period id the fake clock is in
    assert keys(user="alice", team="ml") == {f"org:{day}:_", f"users:{day}:user=alice", f"teams:{day}:team=ml"}
    assert keys(user="bob", team="ml") == {f"org:{day}:_", f"users:{day}:user=bob", f"teams:{day}:team=ml"}
    assert f"teams:{day}:team=-" in keys(user="carol")  # missing per attribute -> "-"
    assert f"eng:{day}:team=ml,user=dan" in keys(user="dan", team="ml", groups=["sales", "eng-infra"])
    assert not any(k.startswith("eng:") for k in keys(user="dan", team="ml", groups=["sales"]))

    # shared counter: alice's and bob's spend add up on "org", not on "users"
    await spend(e, "a1", 3, user="alice", team="ml")
    await spend(e, "b1", 4, user="bob", team="ml")
    by_name = {s.name: s for s in await e.status({"user": "bob", "team": "ml"})}
    assert by_name["org"].spent_nusd == 7 * USD
    assert by_name["teams"].spent_nusd == 7 * USD
    assert by_name["users"].spent_nusd == 4 * USD


async def test_tiers_and_overrides_pick_the_limit(make_engine: Callable[..., BudgetEngine]) -> None:
    e = make_engine({
        "name": "monthly", "per": ["user"], "window": {"calendar": "month"},
        "limit_usd": {
            "default": 1,
            "tiers": [{"where": {"groups": "senior-*"}, "limit_usd": 2}],
            "overrides": [{"where": {"email": "alice@example.com"}, "limit_usd": 3}],
        },
    })
    big = tokens_for(10)
    a = await admit(e, "1", user="u1", max_output_tokens=big)
    b = await admit(e, "2", user="u2", max_output_tokens=big, groups=["eng", "senior-eng"])
    c = await admit(e, "3", user="u3", max_output_tokens=big, groups=["senior-eng"], email="alice@example.com")
    assert [x.blocking.limit_nusd for x in (a, b, c) if x.blocking] == [1 * USD, 2 * USD, 3 * USD]


async def test_downgrade_picks_first_fallback_that_fits(make_engine: Callable[..., BudgetEngine]) -> None:
    e = make_engine(
        {"name": "gpt4o", "match": {"models": ["gpt-4o*"]}, "limit_usd": 1, "window": DAY,
         "action": "downgrade", "fallbacks": ["no-such-model", "claude-sonnet", "gpt-4o-mini"]},
        {"name": "claude", "match": {"providers": ["anthropic"]}, "limit_usd": 0.01, "window": DAY},
    )
    await spend(e, "r0", 0.95)
    a = await admit(e, "r1", max_output_tokens=10_000)  # $0.10 on gpt-4o does not fit
    assert a.decision == "downgraded" and a.admitted
    assert (a.model, a.provider, a.max_output_tokens) == ("gpt-4o-mini", "openai", 10_000)
    assert a.reserved_nusd == 10_000 * 600 and "gpt4o" in a.reason and a.blocking and a.blocking.name == "gpt4o"
    assert a.budgets == ["gpt4o"]
    # settle charges the fallback's counters
    assert await e.settle(a, 5_000_000) == "settled"
    (st,) = [s for s in await e.status({"model": "gpt-4o-mini", "provider": "openai"}) if s.name == "gpt4o"]
    assert st.spent_nusd == usd_to_nusd(0.955) and st.reserved_nusd == 0
    # when no fallback fits, the request is blocked by the original budget
    b = await admit(e, "r2", max_output_tokens=200_000)  # mini would be $0.12 > $0.045 left
    assert b.decision == "blocked" and b.blocking and b.blocking.name == "gpt4o" and "no fallback fits" in b.reason


async def test_clamp_lowers_cap_then_blocks_below_min_output(make_engine: Callable[..., BudgetEngine]) -> None:
    e = make_engine({"name": "c", "limit_usd": 1, "window": DAY, "clamp": True})
    await spend(e, "r0", 0.9)
    a = await admit(e, "r1", input_tokens=1_000, max_output_tokens=20_000)  # $0.2025 worst case, $0.10 left
    assert a.decision == "clamped" and a.max_output_tokens == 9_750  # (1e8 - 2.5e6) / 1e4
    assert a.reserved_nusd == 1_000 * 2_500 + 9_750 * 10_000 and a.blocking and a.blocking.name == "c"
    assert a.tightest and a.tightest.remaining_nusd == 0
    b = await admit(e, "r2", max_output_tokens=1_000, min_output_tokens=16)
    assert b.decision == "blocked"
    await e.release(a)
    c = await admit(e, "r3", max_output_tokens=100_000, min_output_tokens=10_001)  # min itself does not fit
    assert c.decision == "blocked"
    d = await admit(e, "r4", max_output_tokens=100_000, min_output_tokens=10_000)
    assert d.decision == "clamped" and d.max_output_tokens == 10_000


async def test_clamp_needs_every_failing_budget_to_allow_it(make_engine: Callable[..., BudgetEngine]) -> None:
    e = make_engine(
        {"name": "soft", "limit_usd": 1, "window": DAY, "clamp": True},
        {"name": "hard", "limit_usd": 1, "window": {"calendar": "month"}},
    )
    await spend(e, "r0", 0.9)
    a = await admit(e, "r1", max_output_tokens=20_000)
    assert a.decision == "blocked" and a.blocking and a.blocking.name == "soft"


async def test_shadow_never_blocks_but_records_and_reports(make_engine: Callable[..., BudgetEngine]) -> None:
    e = make_engine({"name": "trial", "per": ["user"], "limit_usd": 0.05, "window": DAY, "mode": "shadow", "warn_at": [0.5]})
    for i in range(3):
        a = await admit(e, f"r{i}", max_output_tokens=tokens_for(0.04))
        assert a.decision == "allowed" and a.tightest is None
        assert await e.settle(a, usd_to_nusd(0.03)) == "settled"
    assert [s.name for s in a.shadow_blocked] == ["trial"]  # 0.06 spent + 0.04 > 0.05
    assert a.warnings and a.warnings[0].warn_level == 0.5
    (st,) = await e.status({"user": "alice"})
    assert (st.mode, st.spent_nusd, st.reserved_nusd) == ("shadow", usd_to_nusd(0.09), 0)


async def test_shadow_and_enforce_together(make_engine: Callable[..., BudgetEngine]) -> None:
    e = make_engine(
        {"name": "real", "limit_usd": 1, "window": DAY},
        {"name": "planned", "limit_usd": 0.01, "window": DAY, "mode": "shadow"},
    )
    a = await admit(e, "r1", max_output_tokens=tokens_for(0.5))
    assert a.decision == "allowed" and [s.name for s in a.shadow_blocked] == ["planned"]
    assert a.tightest and a.tightest.name == "real"
    b = await admit(e, "r2", max_output_tokens=tokens_for(0.6))
    assert b.decision == "blocked" and b.blocking and b.blocking.name == "real"


async def test_expired_lease_becomes_a_charge_and_a_late_settle_corrects_it(make_engine: Callable[..., BudgetEngine], clock: FakeClock) -> None:
    """A lease that outlives its gateway was forwarded as far as anyone knows: it expires into a
    charge of the reservation (never a refund that would let the budget overspend), and a settle
    that comes late after all replaces that charge by the real cost."""
    e = make_engine({"name": "d", "limit_usd": 1, "window": DAY})
    clock.set("2026-11-28T10:00:00")
    r1 = await admit(e, "r1", max_output_tokens=tokens_for(0.8), lease_seconds=30)
    assert r1.decision == "allowed"
    r2 = await admit(e, "r2", max_output_tokens=tokens_for(0.5))
    assert r2.decision == "blocked" and r2.blocking and r2.blocking.reserved_nusd == usd_to_nusd(0.8)
    clock.advance(30)  # the gateway holding r1 "crashed"; its lease is over
    (st,) = await e.status({})
    assert (st.spent_nusd, st.reserved_nusd) == (usd_to_nusd(0.8), 0)
    r2 = await admit(e, "r2", max_output_tokens=tokens_for(0.5))
    assert r2.decision == "blocked"  # $0.80 charged + $0.50 > $1: the cap holds
    r3 = await admit(e, "r3", max_output_tokens=tokens_for(0.1))
    assert r3.decision == "allowed"
    assert await e.settle(r1, usd_to_nusd(0.3)) == "settled_after_expiry"  # the real cost after all
    assert await e.settle(r1, usd_to_nusd(0.3)) == "duplicate"
    (st,) = await e.status({})
    assert (st.spent_nusd, st.reserved_nusd) == (usd_to_nusd(0.3), usd_to_nusd(0.1))


async def test_release_after_expiry_refunds_the_charge(make_engine: Callable[..., BudgetEngine], clock: FakeClock) -> None:
    e = make_engine({"name": "d", "limit_usd": 1, "window": {"rolling": "1h"}})
    clock.set("2026-11-28T10:00:00")
    r1 = await admit(e, "r1", max_output_tokens=tokens_for(0.4), lease_seconds=30)
    clock.advance(31)
    assert [(s.spent_nusd, s.reserved_nusd) for s in await e.status({})] == [(usd_to_nusd(0.4), 0)]
    assert await e.release(r1) == "released"
    assert [(s.spent_nusd, s.reserved_nusd) for s in await e.status({})] == [(0, 0)]


async def test_settle_is_idempotent_and_release_frees(make_engine: Callable[..., BudgetEngine]) -> None:
    e = make_engine({"name": "d", "limit_usd": 1, "window": DAY}, {"name": "r", "limit_usd": 1, "window": {"rolling": "1h"}})
    a = await admit(e, "r1", max_output_tokens=tokens_for(0.7))
    assert await e.settle(a, usd_to_nusd(0.2)) == "settled"
    assert await e.settle(a, usd_to_nusd(0.2)) == "duplicate"
    assert await e.settle(a, usd_to_nusd(0.9)) == "duplicate"
    assert [(s.spent_nusd, s.reserved_nusd) for s in await e.status({})] == [(usd_to_nusd(0.2), 0)] * 2
    b = await admit(e, "r2", max_output_tokens=tokens_for(0.8))
    assert b.decision == "allowed"
    assert (await admit(e, "r3", max_output_tokens=tokens_for(0.1))).decision == "blocked"
    assert await e.release(b) == "released"
    assert await e.release(b) == "released"  # harmless twice
    assert [(s.spent_nusd, s.reserved_nusd) for s in await e.status({})] == [(usd_to_nusd(0.2), 0)] * 2
    assert (await admit(e, "r3", max_output_tokens=tokens_for(0.8))).decision == "allowed"


async def test_readmitting_a_request_id_replaces_its_lease(make_engine: Callable[..., BudgetEngine]) -> None:
    e = make_engine({"name": "d", "limit_usd": 1, "window": DAY})
    for _ in range(3):
        assert (await admit(e, "same", max_output_tokens=tokens_for(0.6))).decision == "allowed"
    (st,) = await e.status({})
    assert st.reserved_nusd == usd_to_nusd(0.6)


async def test_warnings_and_tightest(make_engine: Callable[..., BudgetEngine]) -> None:
    e = make_engine(
        {"name": "day", "limit_usd": 1, "window": DAY, "warn_at": [0.5, 0.8]},
        {"name": "month", "limit_usd": 10, "window": {"calendar": "month"}, "warn_at": [0.9]},
    )
    a = await admit(e, "r1", max_output_tokens=tokens_for(0.4))
    assert a.warnings == [] and a.tightest and a.tightest.name == "day"
    assert a.tightest.remaining_nusd == usd_to_nusd(0.6) and a.tightest.reserved_nusd == usd_to_nusd(0.4)
    b = await admit(e, "r2", max_output_tokens=tokens_for(0.45))  # crosses 0.8
    assert [(w.name, w.warn_level) for w in b.warnings] == [("day", 0.8)]
    await e.settle(a, usd_to_nusd(0.4))
    c = await admit(e, "r3", max_output_tokens=tokens_for(0.05))  # already above 0.8: still warned
    assert [(w.name, w.warn_level) for w in c.warnings] == [("day", 0.8)]


async def test_rolling_window_ages_out(make_engine: Callable[..., BudgetEngine], clock: FakeClock) -> None:
    e = make_engine({"name": "roll", "limit_usd": 1, "window": {"rolling": "4h", "bucket": "1h"}})
    clock.set("2026-11-28T10:30:00")
    await spend(e, "r1", 0.5)  # bucket 10:00
    clock.set("2026-11-28T11:30:00")
    await spend(e, "r2", 0.3)  # bucket 11:00
    clock.set("2026-11-28T12:15:00")
    a = await admit(e, "r3", max_output_tokens=tokens_for(0.4))  # 0.8 + 0.4 > 1: wait for the 10:00 bucket to leave
    assert a.decision == "blocked" and a.blocking
    assert a.blocking.spent_nusd == usd_to_nusd(0.8)
    assert a.blocking.retry_after_seconds == ts("2026-11-28T14:00") - clock()
    assert a.blocking.resets_at == ts("2026-11-28T14:00")
    big = await admit(e, "r4", max_output_tokens=tokens_for(1.5))  # never fits
    assert big.blocking and big.blocking.retry_after_seconds == 4 * 3600
    clock.set("2026-11-28T13:59:59")
    assert (await admit(e, "r3", max_output_tokens=tokens_for(0.4))).decision == "blocked"
    clock.set("2026-11-28T14:00:00")
    a = await admit(e, "r3", max_output_tokens=tokens_for(0.4))
    assert a.decision == "allowed" and a.tightest and a.tightest.spent_nusd == usd_to_nusd(0.3)
    clock.set("2026-11-29T14:00:00")  # a day later everything has aged out (and been pruned)
    await e.release(a)
    (st,) = await e.status({})
    assert (st.spent_nusd, st.reserved_nusd, st.remaining_nusd) == (0, 0, USD)


async def test_calendar_counter_is_per_period_with_ttl(make_engine: Callable[..., BudgetEngine], clock: FakeClock, rds) -> None:  # type: ignore[no-untyped-def]
    e = make_engine({"name": "m", "limit_usd": 1, "window": {"calendar": "month", "timezone": "Europe/Berlin"}})
    clock.set("2026-11-30T23:30:00", "Europe/Berlin")
    await spend(e, "r1", 0.9)
    (st,) = await e.status({})
    assert st.key.endswith(":b:m:2026-11:_") and st.resets_at == ts("2026-12-01T00:00", "Europe/Berlin")
    ttl = await rds.ttl(st.key)
    assert 1800 + 86400 < ttl <= 1800 + 2 * 86400  # a bit past the period end
    clock.set("2026-12-01T00:00:00", "Europe/Berlin")
    a = await admit(e, "r2", max_output_tokens=tokens_for(0.9))
    assert a.decision == "allowed" and a.tightest and a.tightest.key.endswith(":b:m:2026-12:_")


async def test_unpriced_and_unmatched_models(make_engine: Callable[..., BudgetEngine]) -> None:
    e = make_engine({"name": "gpt", "match": {"models": ["gpt-*"]}, "limit_usd": 1, "window": DAY})
    a = await admit(e, "r1", model="claude-haiku", max_output_tokens=100)
    assert a.decision == "allowed" and a.counters == () and a.budgets == []
    assert await e.settle(a, 123) == "nothing" and await e.release(a) == "nothing"
    b = await admit(e, "r2", model="gpt-unpriced", max_output_tokens=100)
    assert b.decision == "blocked" and "no price" in b.reason


async def test_status_without_model_lists_model_scoped_budgets(make_engine: Callable[..., BudgetEngine]) -> None:
    e = make_engine(
        {"name": "gpt", "match": {"models": ["gpt-*"]}, "per": ["user"], "limit_usd": 1, "window": DAY},
        {"name": "ml", "match": {"where": {"team": "ml"}}, "limit_usd": 1, "window": DAY},
    )
    assert [s.name for s in await e.status({"user": "alice"})] == ["gpt"]
    assert [s.name for s in await e.status({"user": "alice", "model": "claude-haiku"})] == []
    assert [s.name for s in await e.status({"user": "alice", "team": "ml"})] == ["gpt", "ml"]


async def test_downgrade_to_unbudgeted_or_clamped_fallback(make_engine: Callable[..., BudgetEngine]) -> None:
    e = make_engine(
        {"name": "premium", "match": {"models": ["gpt-4o", "gpt-unpriced"]}, "limit_usd": 0.01, "window": DAY,
         "action": "downgrade", "fallbacks": ["claude-haiku"]},
        {"name": "cheap", "match": {"providers": ["anthropic"]}, "limit_usd": 0.002, "window": DAY, "clamp": True},
    )
    # gpt-4o: $0.10 > $0.01 -> claude-haiku: 1000 * $4/M = $0.004 > $0.002, but "cheap" clamps to 500 tokens
    a = await admit(e, "r1", max_output_tokens=10_000)
    assert a.decision == "downgraded" and (a.model, a.provider) == ("claude-haiku", "anthropic")
    assert a.max_output_tokens == 500 and "max_output_tokens=500" in a.reason
    # an unpriced model matched by an enforce budget cannot be bounded: downgrade applies too
    await e.release(a)
    b = await admit(e, "r2", model="gpt-unpriced", max_output_tokens=100)
    assert b.decision == "downgraded" and b.model == "claude-haiku" and b.max_output_tokens == 100


async def test_downgrade_to_a_model_no_budget_covers(make_engine: Callable[..., BudgetEngine]) -> None:
    e = make_engine({"name": "gpt4o", "match": {"models": ["gpt-4o"]}, "limit_usd": 0.01, "window": DAY,
                     "action": "downgrade", "fallbacks": ["gpt-4o-mini"]})
    a = await admit(e, "r1", max_output_tokens=10_000)
    assert a.decision == "downgraded" and a.model == "gpt-4o-mini" and a.counters == () and a.reserved_nusd == 0


async def test_skewed_gateway_clocks_agree_on_leases(redis_url: str, prefix: str) -> None:
    """Two gateways an hour apart share one Redis. Leases run on Redis's clock, so the fast one
    cannot purge the slow one's live lease (which let a counter reach $1.80 on a $1 limit), and
    a settle after a lease expired replaces the expiry's charge instead of adding to it."""
    import asyncio
    import time

    import redis.asyncio as aredis

    from budget_helpers import budgets

    policy = budgets({"name": "d", "limit_usd": 1, "window": {"rolling": "24h"}})
    clients = [aredis.Redis.from_url(redis_url), aredis.Redis.from_url(redis_url)]
    try:
        slow = BudgetEngine(policy, clients[0], clock=time.time, redis_time=True, prefix=prefix)
        fast = BudgetEngine(policy, clients[1], clock=lambda: time.time() + 3600, redis_time=True, prefix=prefix)
        a = await admit(slow, "slow-1", max_output_tokens=tokens_for(0.9), lease_seconds=1.5)
        assert a.decision == "allowed"
        b = await admit(fast, "fast-1", max_output_tokens=tokens_for(0.5), lease_seconds=600)
        assert b.decision == "blocked"  # on the fast gateway's own clock the slow lease had expired
        await asyncio.sleep(1.6)  # now it really expired: it became a charge, not free room
        b = await admit(fast, "fast-1", max_output_tokens=tokens_for(0.5), lease_seconds=600)
        assert b.decision == "blocked"
        assert await slow.settle(a, usd_to_nusd(0.3)) == "settled_after_expiry"
        b = await admit(fast, "fast-1", max_output_tokens=tokens_for(0.5), lease_seconds=600)
        assert b.decision == "allowed"
        assert await fast.settle(b, usd_to_nusd(0.5)) == "settled"
        (st,) = await slow.status({})
        assert (st.spent_nusd, st.reserved_nusd) == (usd_to_nusd(0.8), 0)
        assert st.spent_nusd <= st.limit_nusd
    finally:
        for c in clients:
            await c.aclose()


def test_admitted_names_what_statuses_of_every_counter_would(clock: FakeClock) -> None:
    """`_admitted` builds a status only for the counters its answer names (the tightest enforced
    budget, those past a warn_at, the rate limits): what it answers equals picking them from a
    status of every counter, on states that put each kind of counter under, near and over."""
    import itertools

    import redis.asyncio as aredis

    from extproc.budgets import RateLimit
    from extproc.budgets.store import CounterState

    e = BudgetEngine(budgets(
        {"name": "a", "limit_usd": 1, "window": DAY, "warn_at": [0.5, 0.8]},
        {"name": "b", "limit_usd": 1, "window": {"calendar": "month"}},
        {"name": "shadow", "limit_usd": 1, "window": DAY, "mode": "shadow", "warn_at": [0.5]},
        {"name": "c", "limit_usd": 2, "window": {"rolling": "4h", "bucket": "1h"}, "warn_at": [0.9]},
    ), aredis.Redis(port=1), clock=clock, prefix="t:",  # never connected: no call reaches Redis here
        rate_limits=[RateLimit.model_validate({"name": "rl", "requests": 3, "tokens": 9000, "window": "1m"})])
    now = clock()
    counters = e._counters({"user": "u", "model": "gpt-4o", "provider": "openai"}, now)
    assert [c.cb.unit for c in counters].count("usd") == 4 and len(counters) == 6
    levels = [0, usd_to_nusd(0.55), usd_to_nusd(0.95), usd_to_nusd(1.5)]
    for spent in itertools.product(levels, repeat=4):
        states = [CounterState(sp, sp // 3, sp > usd_to_nusd(1), (sp,) if c.ref.n_buckets else ())
                  for sp, c in zip((*spent, 1, 4000), counters)]
        amounts = [usd_to_nusd(0.01)] * 4 + [1, 500]
        adm = e._admitted("allowed", counters, states, usd_to_nusd(0.01), amounts, now, {
            "model": "gpt-4o", "provider": "openai", "max_output_tokens": 16, "request_id": "r", "budgets": []})
        every = [e._status(c, s, now, cost=a, held=True) for c, s, a in zip(counters, states, amounts)]
        enforce = [st for st in every if st.mode == "enforce" and st.unit == "usd"]
        assert adm.tightest == min(enforce, key=lambda st: st.remaining_nusd), spent
        assert adm.warnings == [st for st in every if st.warn_level is not None], spent
        assert adm.rate_limits == [st for st in every if st.unit != "usd"], spent


async def test_calendar_keys_keep_their_first_expiry_and_rolling_keys_slide(
        make_engine: Callable[..., BudgetEngine], clock: FakeClock, rds: aredis.Redis) -> None:
    """A calendar counter's keys expire at their period's end plus the grace, set by their first
    write and left by every later reserve and settle (an EXPIRE on every call cost 8.9 AOF entries
    per forwarded request); a key found without an expiry gets one. A rolling counter's expiry
    moves with every call, so a window in use never expires."""
    e = make_engine({"name": "daily", "per": ["user"], "limit_usd": 5, "window": DAY},
                    {"name": "hourly", "per": ["user"], "limit_usd": 5, "window": {"rolling": "1h"}})
    clock.set("2026-11-28T10:00:00")
    a = await admit(e, "r1", max_output_tokens=tokens_for(0.1))
    assert a.admitted and len(a.counters) == 2
    cal, roll = sorted(a.counters, key=lambda c: c.n_buckets)
    grace = KEY_GRACE_SECONDS
    first = await rds.ttl(cal.key)
    assert 14 * 3600 + grace - 5 <= first <= 14 * 3600 + grace
    assert first - 5 <= await rds.ttl(cal.lease_key) <= first
    assert 3600 + grace - 5 <= await rds.ttl(roll.key) <= 3600 + grace
    # Shorten both by hand: a later call leaves the calendar key's, puts the rolling key's back.
    await rds.expire(cal.key, 1000)
    await rds.expire(roll.key, 1000)
    clock.advance(30)  # within the lease
    assert await e.settle(a, usd_to_nusd(0.05)) == "settled"
    assert 990 <= await rds.ttl(cal.key) <= 1000
    assert 3600 + grace - 5 <= await rds.ttl(roll.key) <= 3600 + grace
    await rds.persist(cal.key)  # no expiry at all: the next call sets the period's
    clock.advance(3600 - 30)
    b = await admit(e, "r2", max_output_tokens=tokens_for(0.1))
    assert b.admitted
    assert 13 * 3600 + grace - 5 <= await rds.ttl(cal.key) <= 13 * 3600 + grace
    assert await e.settle(b, usd_to_nusd(0.05)) == "settled"
    assert 13 * 3600 + grace - 5 <= await rds.ttl(cal.key) <= 13 * 3600 + grace
