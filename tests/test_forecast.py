"""Burn-rate forecasts (extproc/forecast.py) on synthetic series with answers worked out by hand,
and the counter series rebuilt from usage rollups (real Redis for the one that reads them)."""

from __future__ import annotations

import datetime as dt
from zoneinfo import ZoneInfo

import pytest
import redis.asyncio as aredis

from extproc.budgets.money import usd_to_nusd as usd
from extproc.budgets.policy import Budget
from extproc.forecast import (
    Forecast,
    daily_series,
    forecast,
    forecast_counter,
    forecast_elapsed,
    rollup_gap,
    sentence,
)
from extproc.reports import add_forecasts, budget_counters
from extproc.usage import RollupDay, usage_tuple, usage_write

UTC = dt.timezone.utc
NOON = dt.datetime(2026, 12, 10, 12, 0, tzinfo=UTC)  # half of today (UTC) elapsed
MONTH_END = dt.datetime(2027, 1, 1, tzinfo=UTC)  # 21.5 days after NOON


def test_constant_spend_projects_linearly_and_exhausts_on_the_right_day():
    # $10 a day for six days, and $5 by noon today: a rate of $10/day with no spread
    fc = forecast([usd(10)] * 6 + [usd(5)], spent_nusd=usd(100), limit_nusd=usd(300), period_end=MONTH_END, now=NOON)
    assert isinstance(fc, Forecast)
    assert fc.rate_nusd_per_day == usd(10) and fc.band_nusd_per_day == 0
    assert fc.projected_nusd == fc.low_nusd == fc.high_nusd == usd(100 + 10 * 21.5)
    # $200 left at $10/day: 20 days after Dec 10 12:00 is Dec 30 12:00
    assert fc.exhausts_on == dt.date(2026, 12, 30)
    assert fc.days_used == 7 and "weighted mean" in fc.method


def test_weights_favour_recent_days_and_today_counts_by_the_part_elapsed():
    # yesterday $10 (weight 1); today $10 by noon = a $20/day rate, weight 2 x 0.5 = 1
    fc = forecast([usd(10), usd(10)], spent_nusd=0, limit_nusd=usd(10_000), period_end=MONTH_END, now=NOON)
    assert fc.rate_nusd_per_day == usd(15)
    assert fc.band_nusd_per_day == usd(5)  # weighted s.d. of {10, 20} with equal weights
    assert fc.low_nusd == usd(10 * 21.5) and fc.high_nusd == usd(20 * 21.5) and fc.projected_nusd == usd(15 * 21.5)
    assert fc.exhausts_on is None
    # the same total spend, but early in the week vs late: the recent one projects higher
    early = forecast([usd(70), 0, 0, 0, 0, 0, 0], spent_nusd=0, limit_nusd=usd(1e6), period_end=MONTH_END, now=NOON)
    late = forecast([0, 0, 0, 0, 0, usd(70), 0], spent_nusd=0, limit_nusd=usd(1e6), period_end=MONTH_END, now=NOON)
    # weights 1..6 and 3.5 for today (sum 24.5): $70 x 1 / 24.5 vs $70 x 6 / 24.5
    assert early.rate_nusd_per_day == round(usd(70) / 24.5) and late.rate_nusd_per_day == round(usd(70) * 6 / 24.5)


def test_only_the_last_seven_days_count():
    old_spike = [usd(1000)] * 5 + [usd(10)] * 6 + [usd(5)]
    assert forecast(old_spike, spent_nusd=0, limit_nusd=usd(1), period_end=MONTH_END, now=NOON).rate_nusd_per_day == usd(10)


def test_exhaustion_edges():
    kw = dict(period_end=MONTH_END, now=NOON)
    # already spent: exhausted today
    assert forecast([usd(1)], spent_nusd=usd(50), limit_nusd=usd(50), **kw).exhausts_on == NOON.date()
    # $10/day, $215 of room left in 21.5 days: reaches the limit exactly at the reset, so not this period
    assert forecast([usd(10)] * 6 + [usd(5)], spent_nusd=usd(85), limit_nusd=usd(300), **kw).exhausts_on is None
    # nothing spent recently: never
    fc = forecast([0] * 7, spent_nusd=usd(3), limit_nusd=usd(5), **kw)
    assert (fc.rate_nusd_per_day, fc.projected_nusd, fc.exhausts_on) == (0, usd(3), None)
    # no data at all
    assert forecast([], spent_nusd=0, limit_nusd=usd(5), **kw).rate_nusd_per_day == 0


def test_the_exhaustion_date_is_in_the_budgets_time_zone():
    ny = ZoneInfo("America/New_York")
    now = dt.datetime(2026, 12, 10, 12, 0, tzinfo=UTC)
    end = dt.datetime(2027, 1, 1, tzinfo=ny)
    # $10/day, $195.5833 left -> 19.558 days: Dec 30 01:24 UTC, which is Dec 29 in New York
    fc = forecast([usd(10)] * 6 + [usd(5)], spent_nusd=usd(100), limit_nusd=usd(100) + usd(195.58333),
                  period_end=end, now=now)
    assert fc.exhausts_on == dt.date(2026, 12, 29)


def test_fallback_is_spent_over_elapsed_days():
    start = dt.datetime(2026, 12, 1, tzinfo=UTC)
    fc = forecast_elapsed(spent_nusd=usd(95), limit_nusd=usd(250), period_start=start, period_end=MONTH_END,
                          now=NOON, why="its scope uses email")
    # 9.5 days elapsed -> $10/day; 21.5 days left -> $310; $155 left -> 15.5 days -> Dec 26 00:00
    assert fc.rate_nusd_per_day == usd(10) and fc.projected_nusd == usd(310) and fc.band_nusd_per_day == 0
    assert fc.exhausts_on == dt.date(2026, 12, 26)
    assert "elapsed days" in fc.method and "email" in fc.method


def _budget(**kw) -> Budget:
    return Budget.model_validate({"name": "ml-monthly", "limit_usd": 300, "window": {"calendar": "month"}, **kw})


def _tuple(user: str, team: str, model: str, cost: float, groups=()) -> tuple[dict, dict]:
    values = {"user": user, "team": team, "app": "", "groups": list(groups), "model": model, "provider": "fake",
              "service_token": ""}
    return values, {"requests": 1, "cost_nusd": usd(cost)}


def test_daily_series_rebuilds_a_counter_from_the_rollups():
    b = _budget(match={"models": ["gpt-4o*"], "where": {"team": "ml"}}, per=["team"])
    days = [
        RollupDay(dt.date(2026, 12, 9), [_tuple("a", "ml", "gpt-4o", 4), _tuple("b", "ml", "gpt-4o-mini", 1),
                                         _tuple("c", "web", "gpt-4o", 100), _tuple("a", "ml", "claude-x", 50)]),
        RollupDay(dt.date(2026, 12, 10), [_tuple("a", "ml", "gpt-4o", 2)]),
    ]
    assert daily_series(b, {"team": "ml"}, days) == [usd(5), usd(2)]
    assert daily_series(b, {"team": "web"}, days) == [0, 0]  # web does not match the budget
    # per user: one counter each; a missing attribute is counted under "-"
    per_user = _budget(per=["user", "app"])
    assert daily_series(per_user, {"user": "a", "app": "-"}, days) == [usd(54), usd(2)]
    # groups: counted under the sorted, joined list
    g = _budget(per=["groups"])
    assert daily_series(g, {"groups": "x,y"}, [RollupDay(dt.date(2026, 12, 10), [_tuple("a", "ml", "m", 3, ["y", "x"])])]) \
        == [usd(3)]


def test_scopes_the_rollups_cannot_rebuild_fall_back_and_say_so():
    assert rollup_gap(_budget(per=["user"], match={"where": {"groups": "eng", "model": "gpt-*"}})) is None
    gap = rollup_gap(_budget(per=["email"], match={"where": {"suite": "x"}}))
    assert gap is not None and "email" in gap and "suite" in gap
    now = NOON.timestamp()
    fc = forecast_counter(_budget(per=["email"]), {"email": "a@x"}, spent_nusd=usd(95), limit_nusd=usd(300), now=now,
                          rollups=[])
    assert fc is not None and "elapsed days" in fc.method and "email" in fc.method
    assert fc.rate_nusd_per_day == usd(10)  # $95 over Dec 1 .. Dec 10 12:00
    rolling = Budget.model_validate({"name": "r", "limit_usd": 1, "window": {"rolling": "1h"}})
    assert forecast_counter(rolling, {}, spent_nusd=1, limit_nusd=2, now=now, rollups=[]) is None


def test_sentence():
    fc = forecast([usd(10)] * 6 + [usd(5)], spent_nusd=usd(100), limit_nusd=usd(300), period_end=MONTH_END, now=NOON)
    assert sentence("ml-monthly", {"team": "ml"}, "month", fc) == "team ml exhausts its month on Dec 30"
    calm = forecast([0] * 7, spent_nusd=0, limit_nusd=usd(300), period_end=MONTH_END, now=NOON)
    assert sentence("company", {}, "month", calm) == "budget company stays within its month"
    spent = forecast([0] * 7, spent_nusd=usd(300), limit_nusd=usd(300), period_end=MONTH_END, now=NOON)
    assert sentence("x", {"user": "trial", "model": "gpt-4o"}, "day", spent) == "user trial, model gpt-4o has exhausted its day"


@pytest.fixture
async def rds(redis_url: str):
    client = aredis.Redis.from_url(redis_url)
    try:
        yield client
    finally:
        await client.aclose()


async def test_add_forecasts_reads_the_rollups_and_the_counters(rds, redis_url):
    """`tollgate budgets --forecast`'s rows: the counter from its hash, the rate from the rollups."""
    prefix = "fc-test:"
    now = NOON.timestamp()
    b = _budget(match={"where": {"team": "ml"}}, per=["team"])
    for i in range(7):  # $10 a day for Dec 4..9, $5 today by noon
        day = dt.datetime(2026, 12, 4 + i, 11, tzinfo=UTC)
        rec = {"ts": day.isoformat(), "user": "a", "team": "ml", "groups": [], "model_served": "gpt-4o",
               "provider": "fake", "decision": "allowed", "cost_nusd": usd(5 if i == 6 else 10)}
        w = usage_write(rec, prefix=prefix)
        for f, v in w.increments:
            await rds.hincrby(w.usage_key, f, v)
    key = f"{prefix}b:ml-monthly:2026-12:team=ml"
    await rds.hset(key, mapping={"spent": usd(100), "reserved": 0, "limit": usd(300), "until": MONTH_END.timestamp()})
    try:
        rows = await budget_counters(rds, prefix=prefix, now=now)
        assert [r["counter"] for r in rows] == ["team=ml"] and rows[0]["spent_nusd"] == usd(100)
        (row,) = await add_forecasts(rds, rows, [b], prefix=prefix, now=now)
        assert row["rate_usd_per_day"] == 10.0 and row["exhausts_on"] == "2026-12-30"
        assert row["forecast"] == "team ml exhausts its month on Dec 30"
        assert usage_tuple(rec) in (await rds.hkeys(w.usage_key))[0].decode()  # the rollup was real
    finally:
        keys = [k async for k in rds.scan_iter(match=f"{prefix}*")]
        await rds.delete(*keys)
