"""Alert evaluation, pure: counters and history in, events and payloads out, at a chosen `now`."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal

import orjson

from extproc.alerts import events as ev
from extproc.alerts.events import Counter
from extproc.alerts.policy import SpikeSpec
from extproc.budgets.admission import BudgetStatus
from extproc.budgets.money import usd_to_nusd
from extproc.forecast import Forecast

P = "tollgate:"
# 2026-11-28 10:30 UTC; the day's period ends at midnight
NOW = dt.datetime(2026, 11, 28, 10, 30, tzinfo=dt.timezone.utc).timestamp()
END = dt.datetime(2026, 11, 29, tzinfo=dt.timezone.utc).timestamp()
HOUR = int(NOW // 3600)


def counter(spent: float, limit: float = 10, *, key: str = "tollgate:b:team-daily:2026-11-28:team=ml",
            reserved: float = 0, end: float | None = END) -> Counter:
    return Counter.parse(key, P, spent_nusd=usd_to_nusd(spent), reserved_nusd=usd_to_nusd(reserved),
                         limit_nusd=usd_to_nusd(limit), window="calendar day (UTC)", period_end=end)


def test_a_counter_is_read_from_its_key():
    c = counter(1, key="tollgate:b:eng:2026-11:user=alice%40example.com,model=gpt-4o")
    assert (c.budget, c.period, dict(c.per)) == ("eng", "2026-11", {"user": "alice@example.com", "model": "gpt-4o"})
    assert c.scope == "user=alice@example.com,model=gpt-4o" and not c.rolling
    shared = counter(1, key="tollgate:b:company:2026-11:_")
    assert shared.per == {} and shared.scope == "(shared)"
    rolling = counter(1, key="tollgate:b:ci:r3600s60:service_token=ci", end=None)
    assert rolling.rolling and rolling.window_seconds == 3600 and rolling.period_label == "rolling 3600s"


def test_claims_last_to_the_period_end_or_one_rolling_window():
    assert counter(1).claim_ttl(NOW) == int(END - NOW) + ev.DEDUP_GRACE_SECONDS
    assert counter(1, key="tollgate:b:ci:r3600s60:_", end=None).claim_ttl(NOW) == 3600
    # a period read just after its end still gets a positive TTL
    assert counter(1).claim_ttl(END + 5) == 1 + ev.DEDUP_GRACE_SECONDS


def test_thresholds_are_reached_by_settled_spend_exactly():
    warn = [0.5, 0.8, 0.95]
    assert ev.thresholds_reached(counter(4.999999999), warn) == []
    assert ev.thresholds_reached(counter(5), warn) == [0.5]  # exactly half: reached
    assert ev.thresholds_reached(counter(8.1), warn) == [0.8, 0.5]  # highest first
    # reservations do not count: money that may never be spent is not "spent"
    assert ev.thresholds_reached(counter(1, reserved=9), warn) == []
    # 0.1 + 0.2 style float trouble cannot bite: 0.3 x $0.1 is exactly 30,000,000 nUSD
    assert ev.thresholds_reached(counter(0.03, limit=0.1), [0.3]) == [0.3]


def test_threshold_text_and_payload():
    e = ev.threshold(counter(8.25), 0.8, NOW)
    assert e.name == "threshold@0.8"
    assert e.text == ("Budget team-daily for team=ml has spent $8.25 of $10.00 (82%), past its 80% warning; "
                      "calendar day (UTC), resets at 2026-11-29T00:00:00Z.")
    p = ev.payload("finance", e)
    assert p["text"] == e.text  # Slack and Teams post `text` as it is
    assert {k: p[k] for k in ("event", "alert", "budget", "scope", "counter", "period", "spent_usd", "limit_usd",
                              "spent_nusd", "limit_nusd", "percent", "threshold", "resets_at")} == {
        "event": "threshold", "alert": "finance", "budget": "team-daily", "scope": {"team": "ml"},
        "counter": "team=ml", "period": "2026-11-28", "spent_usd": "8.25", "limit_usd": "10",
        "spent_nusd": 8_250_000_000, "limit_nusd": 10_000_000_000, "percent": 82.5, "threshold": 0.8,
        "resets_at": "2026-11-29T00:00:00Z"}
    assert p["id"] == "finance:threshold@0.8:tollgate:b:team-daily:2026-11-28:team=ml"
    orjson.dumps(p)  # plain JSON


def test_small_amounts_are_exact_in_the_sentence():
    e = ev.threshold(counter(0.00042, limit=0.0025), 0.1, NOW)
    assert "$0.00042 of $0.0025 (17%)" in e.text


def test_exhausted_and_downgrade_come_from_the_admission_status():
    st = BudgetStatus(name="trial-frontier", key="tollgate:b:trial-frontier:2026-11-28:user=trial",
                      per={"user": "trial"}, spent_nusd=420_000, reserved_nusd=0, limit_nusd=2_500_000,
                      remaining_nusd=2_080_000, resets_at=END, retry_after_seconds=END - NOW, mode="enforce",
                      window="calendar day (UTC)")
    c = Counter.from_status(st, P)
    req = {"request_id": "r1", "user": "trial", "model_requested": "gpt-4o", "model_served": "gpt-4o-mini"}
    x = ev.exhausted(c, NOW, req)
    assert x.name == "exhausted" and x.detail["request"]["request_id"] == "r1"
    assert x.text.startswith("Budget trial-frontier for user=trial is exhausted: a request for gpt-4o was refused")
    d = ev.downgrade(c, NOW, req)
    assert "downgraded to gpt-4o-mini" in d.text and d.detail["model_served"] == "gpt-4o-mini"
    assert ev.payload("a", d)["resets_at"] == "2026-11-29T00:00:00Z"


def _fc(exhausts_on: dt.date | None, spent: int = usd_to_nusd(4)) -> Forecast:
    return Forecast(rate_nusd_per_day=usd_to_nusd(3), projected_nusd=usd_to_nusd(12), low_nusd=usd_to_nusd(11),
                    high_nusd=usd_to_nusd(13), exhausts_on=exhausts_on, method="m", spent_nusd=spent,
                    limit_nusd=usd_to_nusd(10))


def test_a_forecast_event_needs_an_exhaustion_date_and_room_left():
    month = counter(4, key="tollgate:b:ml-monthly:2026-11:team=ml")
    e = ev.forecast(month, _fc(dt.date(2026, 11, 30)), "team ml exhausts its month on Nov 30 (...)", NOW)
    assert e is not None and e.detail["exhausts_on"] == "2026-11-30" and e.detail["projected_usd"] == "12"
    assert e.text == ("Budget ml-monthly for team=ml is forecast to run out: team ml exhausts its month on Nov 30 "
                      "(...) (about $3.00 a day; spent $4.00 of $10.00, projected $12.00 by the period's end); "
                      "calendar day (UTC), resets at 2026-11-29T00:00:00Z.")
    assert ev.forecast(month, _fc(None), "stays", NOW) is None
    # already spent: that is `exhausted`, not a forecast
    assert ev.forecast(counter(10, key="tollgate:b:ml-monthly:2026-11:team=ml"), _fc(dt.date(2026, 11, 28)),
                       "x", NOW) is None


def test_usual_hourly_rate_is_the_mean_since_history_began():
    hourly = {HOUR - 3: 300, HOUR - 2: 0, HOUR - 1: 600, HOUR: 10_000}
    assert ev.usual_hourly(hourly, since_hour=HOUR - 3, hour=HOUR, baseline_hours=24) == 300  # 900 / 3 hours
    assert ev.usual_hourly(hourly, since_hour=HOUR - 100, hour=HOUR, baseline_hours=24) == 900 // 24
    assert ev.usual_hourly(hourly, since_hour=HOUR, hour=HOUR, baseline_hours=24) is None  # no full hour yet
    assert ev.usual_hourly(hourly, since_hour=None, hour=HOUR, baseline_hours=24) is None


def test_a_spike_is_over_factor_times_usual_and_over_the_floor():
    spec = SpikeSpec(factor=Decimal(5), baseline="24h", min_usd=Decimal("0.5"))
    c = counter(3, key="tollgate:b:ci-daily:2026-11-28:service_token=ci")
    usual = usd_to_nusd("0.2")  # $0.20 an hour, every hour of the last day
    history = {h: usual for h in range(HOUR - 24, HOUR)}
    assert ev.spike(c, spec, {**history, HOUR: usd_to_nusd(1)}, since_hour=HOUR - 48, now=NOW) is None  # exactly 5x
    e = ev.spike(c, spec, {**history, HOUR: usd_to_nusd("1.000000001")}, since_hour=HOUR - 48, now=NOW)
    assert e is not None and e.detail["usual_hourly_usd"] == "0.2" and e.detail["hour_usd"] == "1.000000001"
    assert "5.0x its usual $0.2 an hour (mean of the last 24h)" in e.text and "since 10:00 UTC" in e.text
    # under the floor, however steep
    quiet = {h: 1 for h in range(HOUR - 24, HOUR)}
    assert ev.spike(c, spec, {**quiet, HOUR: usd_to_nusd("0.4")}, since_hour=HOUR - 48, now=NOW) is None
    # a counter with no spend at all so far, then $2 this hour: a spike from nothing
    e = ev.spike(c, spec, {HOUR: usd_to_nusd(2)}, since_hour=HOUR - 5, now=NOW)
    assert e is not None and "from nothing" in e.text
    # no full hour of history yet: nothing is "usual"
    assert ev.spike(c, spec, {HOUR: usd_to_nusd(2)}, since_hour=HOUR, now=NOW) is None
