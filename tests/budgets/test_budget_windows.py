"""Window math at the edges: period ids and resets for calendar windows, ageing for rolling ones."""

from __future__ import annotations

from datetime import datetime, timezone
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from extproc.budgets.policy import CalendarWindowSpec, RollingWindowSpec
from extproc.budgets.windows import WEEKDAYS, Calendar, Rolling, window_for


def ts(iso: str, tz: str = "UTC") -> float:
    return datetime.fromisoformat(iso).replace(tzinfo=ZoneInfo(tz)).timestamp()


def cal(unit: str, tz: str = "UTC", week_start: str = "monday") -> Calendar:
    w = window_for(CalendarWindowSpec(calendar=unit, timezone=tz, week_start=week_start))  # type: ignore[arg-type]
    assert isinstance(w, Calendar)
    return w


@pytest.mark.parametrize(
    ("unit", "tz", "week_start", "now", "pid", "start", "end"),
    [
        # day rollover, UTC
        ("day", "UTC", "monday", "2026-03-01T23:59:59.999", "2026-03-01", "2026-03-01T00:00", "2026-03-02T00:00"),
        ("day", "UTC", "monday", "2026-03-02T00:00:00", "2026-03-02", "2026-03-02T00:00", "2026-03-03T00:00"),
        # ISO week, Monday start: Sunday night is still the old week; across a year boundary
        ("week", "UTC", "monday", "2026-11-29T23:59:59", "W2026-11-23", "2026-11-23T00:00", "2026-11-30T00:00"),
        ("week", "UTC", "monday", "2026-11-30T00:00:00", "W2026-11-30", "2026-11-30T00:00", "2026-12-07T00:00"),
        ("week", "UTC", "monday", "2026-01-01T12:00:00", "W2025-12-29", "2025-12-29T00:00", "2026-01-05T00:00"),
        # Sunday start: Saturday night is the old week, Sunday 00:00 the new one
        ("week", "UTC", "sunday", "2026-11-28T23:59:59", "W2026-11-22", "2026-11-22T00:00", "2026-11-29T00:00"),
        ("week", "UTC", "sunday", "2026-11-29T00:00:00", "W2026-11-29", "2026-11-29T00:00", "2026-12-06T00:00"),
        # month ends: February (common and leap year), December -> January
        ("month", "UTC", "monday", "2026-02-28T23:59:59", "2026-02", "2026-02-01T00:00", "2026-03-01T00:00"),
        ("month", "UTC", "monday", "2028-02-29T12:00:00", "2028-02", "2028-02-01T00:00", "2028-03-01T00:00"),
        ("month", "UTC", "monday", "2026-12-31T23:59:59", "2026-12", "2026-12-01T00:00", "2027-01-01T00:00"),
        ("month", "UTC", "monday", "2027-01-01T00:00:00", "2027-01", "2027-01-01T00:00", "2027-02-01T00:00"),
    ],
)
def test_calendar_periods_utc(unit: str, tz: str, week_start: str, now: str, pid: str, start: str, end: str) -> None:
    p = cal(unit, tz, week_start).period(ts(now))
    assert (p.id, p.start, p.end) == (pid, ts(start), ts(end))


def test_new_york_month_and_day_follow_local_midnight() -> None:
    ny = "America/New_York"
    late = ts("2026-11-30T23:30", ny)  # 04:30 UTC on Dec 1: UTC says December, New York says November
    assert datetime.fromtimestamp(late, timezone.utc).month == 12
    assert cal("month", ny).period(late).id == "2026-11"
    assert cal("month", ny).period(late).end == ts("2026-12-01T05:00")  # EST = UTC-5
    assert cal("day", ny).period(late).id == "2026-11-30"
    assert cal("month", ny).period(ts("2026-12-01T00:00", ny)).id == "2026-12"


def test_kolkata_half_hour_offset() -> None:
    ist = "Asia/Kolkata"
    assert cal("month", ist).period(ts("2026-11-30T18:29:59")).id == "2026-11"
    p = cal("month", ist).period(ts("2026-11-30T18:30:00"))  # midnight IST (UTC+5:30)
    assert (p.id, p.start) == ("2026-12", ts("2026-11-30T18:30"))
    assert cal("day", ist).period(ts("2026-11-30T18:30:00")).end == ts("2026-12-01T18:30")


def test_berlin_dst_days_are_23_and_25_hours() -> None:
    b = "Europe/Berlin"
    spring = cal("day", b).period(ts("2026-03-29T12:00", b))  # clocks jump 02:00 -> 03:00
    assert spring.id == "2026-03-29"
    assert spring.start == ts("2026-03-28T23:00")  # CET midnight
    assert spring.end == ts("2026-03-29T22:00")  # CEST midnight
    assert spring.end - spring.start == 23 * 3600
    autumn = cal("day", b).period(ts("2026-10-25T12:00", b))  # clocks fall back 03:00 -> 02:00
    assert (autumn.id, autumn.end - autumn.start) == ("2026-10-25", 25 * 3600)
    assert autumn.start == ts("2026-10-24T22:00") and autumn.end == ts("2026-10-25T23:00")
    # The week and the month containing the change reset at local midnight too.
    assert cal("week", b).period(ts("2026-03-29T12:00", b)).end == ts("2026-03-29T22:00")
    assert cal("month", b).period(ts("2026-10-25T12:00", b)).end == ts("2026-10-31T23:00")
    assert cal("month", b).period(ts("2026-03-31T23:59:59", b)).end == ts("2026-03-31T22:00")


def test_midnight_inside_a_dst_gap_starts_the_day_at_the_jump() -> None:
    # America/Santiago: 2026-09-06 00:00 does not exist (clocks go 23:59:59 -> 01:00).
    p = cal("day", "America/Santiago").period(ts("2026-09-06T12:00", "America/Santiago"))
    assert p.id == "2026-09-06" and p.start == ts("2026-09-06T04:00")
    prev = cal("day", "America/Santiago").period(p.start - 1)
    assert prev.id == "2026-09-05" and prev.end == p.start


ZONES = ["UTC", "Europe/Berlin", "America/New_York", "Asia/Kolkata", "America/Santiago", "Australia/Lord_Howe", "Pacific/Chatham"]


@settings(max_examples=300, deadline=None)
@given(
    now=st.floats(min_value=1.6e9, max_value=2.2e9, allow_nan=False),
    unit=st.sampled_from(["day", "week", "month"]),
    tz=st.sampled_from(ZONES),
    week_start=st.sampled_from(WEEKDAYS),
)
def test_periods_contain_now_and_tile_time(now: float, unit: str, tz: str, week_start: str) -> None:
    w = cal(unit, tz, week_start)
    p = w.period(now)
    assert p.start <= now < p.end
    assert w.period(p.end).start == p.end  # the next period starts exactly where this one ends
    assert w.period(p.start).id == p.id
    local_start = datetime.fromtimestamp(p.start, ZoneInfo(tz))
    if unit == "week":
        assert local_start.weekday() == WEEKDAYS.index(week_start)
    if unit == "month":
        assert local_start.day == 1


def test_rolling_defaults_and_buckets() -> None:
    assert RollingWindowSpec(rolling="24h").bucket_seconds == 3600
    assert RollingWindowSpec(rolling="7d").bucket_seconds == 7 * 3600
    assert RollingWindowSpec(rolling="5m").bucket_seconds == 15  # 20 buckets: 24 does not divide 300
    r = Rolling(86400, 3600)
    assert r.n_buckets == 24 and r.bucket_index(7200.5) == 2 and r.key_part() == "r86400s3600"


def test_rolling_retry_after() -> None:
    r = Rolling(4 * 3600, 3600)  # 4 one-hour buckets
    now = 10 * 3600 + 600  # 10 minutes into bucket 10; window = buckets 7..10
    buckets = [30, 0, 50, 20]  # oldest first
    assert r.retry_after(now, buckets, reserved=0, cost=10, limit=200) == 0
    # need 100 - (200 - 10 - ...) : total 100 + 10 > 100 -> drop bucket 7 (30) at start of bucket 11
    assert r.retry_after(now, buckets, reserved=0, cost=10, limit=100) == 11 * 3600 - now
    # dropping 7 and 8 (30 + 0) is not enough for cost 40; bucket 9 (50) leaves at start of bucket 13
    assert r.retry_after(now, buckets, reserved=0, cost=40, limit=100) == 13 * 3600 - now
    # reservations alone exceed the limit: never within the window
    assert r.retry_after(now, buckets, reserved=95, cost=10, limit=100) == 4 * 3600
