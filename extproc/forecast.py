"""Burn-rate forecasts for calendar budget counters: where the spend will be when the period ends.

Pure: every function takes the data and the time (`now`) it works on; nothing here reads Redis or
the clock, so a test can place `now` anywhere and know the answer.

**Method** (`forecast`). The daily spend series is UTC days, oldest first, the last entry today's
spend so far (the usage rollups are UTC days). Of the last `WINDOW_DAYS` (7) entries:

* each complete day's rate is its spend; today's rate is its spend divided by the fraction of
  the day elapsed (so a morning's spend is not read as a whole day's);
* the rate is their weighted mean, with linear weights favouring recent days (1 for the oldest
  of the seven ... 7 for today), today's weight scaled by the fraction of it elapsed (a day
  barely begun says little);
* the band is one weighted standard deviation of the daily rates around that mean;
* projected spend at the period's end = spent so far + rate x the time left; low / high use
  rate - band (never below 0) / rate + band;
* the counter is exhausted on the local date (the budget's time zone) at which spent + rate x t
  reaches the limit, if that is before the period ends (today when it is already spent; None when
  the projection stays under the limit).

Days before the rollups begin (the gateway was not recording) are not passed in, so a new
deployment is not read as a week of zeros.

**Fallback** (`forecast_elapsed`). A counter whose scope the rollups cannot rebuild (its `match`
or `per` uses an attribute the rollups do not keep, such as `email`, `source` or custom metadata)
is projected from its own spend: spent / elapsed days of the period, without a band. The
forecast's `method` says which was used and why.

Rolling windows have no end to project to: they get no forecast.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

from .budgets.match import budget_matches, per_values
from .budgets.policy import Budget, CalendarWindowSpec
from .budgets.windows import Calendar
from .usage import RollupDay

WINDOW_DAYS = 7
DAY_SECONDS = 86400
ROLLUP_ATTRIBUTES = frozenset({"user", "team", "app", "groups", "model", "provider", "service_token"})
"""What a usage rollup tuple holds (extproc/usage.py): the attributes a scope can be rebuilt from."""

METHOD_WEIGHTED = (f"weighted mean of the last {WINDOW_DAYS} UTC days' spend from the usage rollups (linear weights "
                   "favouring recent days, today's scaled by the part of it elapsed), band = 1 weighted s.d.")


@dataclass(frozen=True)
class Forecast:
    """Where a calendar counter is heading. Amounts are nano-USD; `exhausts_on` is a local date in
    the budget's time zone (None: the projection stays under the limit this period)."""

    rate_nusd_per_day: int
    projected_nusd: int
    low_nusd: int
    high_nusd: int
    exhausts_on: dt.date | None
    method: str
    band_nusd_per_day: int = 0
    spent_nusd: int = 0
    limit_nusd: int = 0
    period_end: dt.datetime | None = None
    days_used: int = 0  # how many daily values the rate came from (0 for the fallback)

    @property
    def exhausts(self) -> bool:
        return self.exhausts_on is not None


def _today_fraction(now: dt.datetime) -> Fraction:
    """How much of today (UTC) has elapsed, in (0, 1]."""
    utc = now.astimezone(dt.timezone.utc)
    seconds = utc.hour * 3600 + utc.minute * 60 + utc.second + Fraction(utc.microsecond, 1_000_000)
    return max(Fraction(seconds, DAY_SECONDS), Fraction(1, DAY_SECONDS))


def _project(rate: Fraction, band: Fraction, *, spent_nusd: int, limit_nusd: int, period_end: dt.datetime,
             now: dt.datetime, method: str, days_used: int) -> Forecast:
    left = max(Fraction(0), Fraction(str((period_end - now).total_seconds())) / DAY_SECONDS)
    projected = spent_nusd + rate * left
    low = spent_nusd + max(Fraction(0), rate - band) * left
    high = spent_nusd + (rate + band) * left
    exhausts_on: dt.date | None = None
    zone = period_end.tzinfo or dt.timezone.utc
    if spent_nusd >= limit_nusd:
        exhausts_on = now.astimezone(zone).date()
    elif rate > 0:
        t_days = (limit_nusd - spent_nusd) / rate
        if t_days < left:
            when = now + dt.timedelta(seconds=float(t_days * DAY_SECONDS))
            exhausts_on = when.astimezone(zone).date()
    return Forecast(
        rate_nusd_per_day=round(rate), projected_nusd=round(projected), low_nusd=round(low), high_nusd=round(high),
        exhausts_on=exhausts_on, method=method, band_nusd_per_day=round(band), spent_nusd=spent_nusd,
        limit_nusd=limit_nusd, period_end=period_end, days_used=days_used,
    )


def forecast(daily_nusd: Sequence[int], *, spent_nusd: int, limit_nusd: int, period_end: dt.datetime,
             now: dt.datetime) -> Forecast:
    """Project a calendar counter to the end of its period from its recent daily spend (the
    module docstring states the method). `daily_nusd` is oldest first, the last entry today's
    (UTC) spend so far; `period_end` and `now` are timezone-aware."""
    days = [int(x) for x in daily_nusd][-WINDOW_DAYS:]
    n = len(days)
    if n == 0:
        return _project(Fraction(0), Fraction(0), spent_nusd=spent_nusd, limit_nusd=limit_nusd,
                        period_end=period_end, now=now, method=METHOD_WEIGHTED, days_used=0)
    f = _today_fraction(now)
    rates = [Fraction(x) for x in days[:-1]] + [Fraction(days[-1]) / f]
    weights = [Fraction(i) for i in range(1, n)] + [n * f]
    total = sum(weights)
    rate = sum(w * r for w, r in zip(weights, rates)) / total
    var = sum(w * (r - rate) ** 2 for w, r in zip(weights, rates)) / total
    band = Fraction(math.isqrt(round(var))) if var else Fraction(0)
    return _project(rate, band, spent_nusd=spent_nusd, limit_nusd=limit_nusd, period_end=period_end, now=now,
                    method=METHOD_WEIGHTED, days_used=n)


def forecast_elapsed(*, spent_nusd: int, limit_nusd: int, period_start: dt.datetime, period_end: dt.datetime,
                     now: dt.datetime, why: str) -> Forecast:
    """The fallback: spent so far / elapsed days of the period, no band; `why` goes into `method`."""
    elapsed = Fraction(str(max((now - period_start).total_seconds(), 1.0))) / DAY_SECONDS
    rate = Fraction(spent_nusd) / elapsed
    return _project(rate, Fraction(0), spent_nusd=spent_nusd, limit_nusd=limit_nusd, period_end=period_end,
                    now=now, method=f"spent so far / elapsed days of the period ({why}); no band", days_used=0)


# ---- a counter's daily series, from the usage rollups -------------------------------------------

def rollup_gap(budget: Budget) -> str | None:
    """Why the usage rollups cannot rebuild this budget's counters, or None when they can.

    The rollups keep (user, team, app, groups, model served, provider, service token) per UTC day;
    `match.models` / `providers` apply to the served model (a downgraded request counts against
    its fallback's budgets), which is what the rollups keep."""
    used = [*budget.match.where, *budget.per]
    missing = sorted({a for a in used if a not in ROLLUP_ATTRIBUTES})
    if missing:
        return f"its scope uses {', '.join(missing)}, which the usage rollups do not keep"
    return None


def _attrs(values: Mapping[str, Any]) -> dict[str, str | list[str]]:
    """A rollup tuple as request attributes (empty values are missing attributes, as on the request)."""
    out: dict[str, str | list[str]] = {}
    for k, v in values.items():
        if v:
            out[k] = list(v) if isinstance(v, (list, tuple)) else str(v)
    return out


SeriesIndex = dict[tuple[tuple[str, str], ...], list[int]]
"""A budget's counters (their sorted `per` items) -> spend per day, from one pass over the rollups."""


def series_index(budget: Budget, days: Sequence[RollupDay]) -> SeriesIndex:
    """Every counter of `budget` the rollups hold, with its spend per day (nano-USD, oldest first):
    each tuple that matches the budget is added to the counter its attributes land in. One pass
    over the days, however many counters are asked about."""
    out: SeriesIndex = {}
    for i, day in enumerate(days):
        for values, metrics in day.tuples:
            attrs = _attrs(values)
            if not budget_matches(budget, attrs):
                continue
            key = tuple(sorted(per_values(budget, attrs).items()))
            row = out.get(key)
            if row is None:
                row = out[key] = [0] * len(days)
            row[i] += metrics.get("cost_nusd", 0)
    return out


def daily_series(budget: Budget, per: Mapping[str, str], days: Sequence[RollupDay],
                 index: SeriesIndex | None = None) -> list[int]:
    """The spend per day (nano-USD) of one counter of `budget` (its `per` values), oldest first,
    from the rollups: the tuples that match the budget and land in that counter."""
    index = series_index(budget, days) if index is None else index
    return list(index.get(tuple(sorted(per.items())), [0] * len(days)))


def forecast_counter(budget: Budget, per: Mapping[str, str], *, spent_nusd: int, limit_nusd: int, now: float,
                     rollups: Sequence[RollupDay], index: SeriesIndex | None = None) -> Forecast | None:
    """The forecast of one live counter of `budget` at epoch `now`, or None for a rolling window.
    `rollups` are the last days up to today (UTC), oldest first (`usage.recent_rollups`);
    `index`, the budget's `series_index` of them when many counters are forecast at once."""
    if not isinstance(budget.window, CalendarWindowSpec):
        return None
    cal = Calendar.from_spec(budget.window)
    period = cal.period(now)
    start = dt.datetime.fromtimestamp(period.start, cal.tz)
    end = dt.datetime.fromtimestamp(period.end, cal.tz)
    at = dt.datetime.fromtimestamp(now, cal.tz)
    gap = rollup_gap(budget)
    if gap is not None:
        return forecast_elapsed(spent_nusd=spent_nusd, limit_nusd=limit_nusd, period_start=start, period_end=end,
                                now=at, why=gap)
    return forecast(daily_series(budget, per, rollups, index), spent_nusd=spent_nusd, limit_nusd=limit_nusd,
                    period_end=end, now=at)


# ---- in words ----------------------------------------------------------------------------------

def counter_label(budget_name: str, per: Mapping[str, str]) -> str:
    """`team ml`, `user alice@example.com, model gpt-4o`, or `budget company-monthly` (shared)."""
    if not per:
        return f"budget {budget_name}"
    return ", ".join(f"{k} {v}" for k, v in per.items())


def sentence(budget_name: str, per: Mapping[str, str], unit: str, fc: Forecast) -> str:
    """"team ml exhausts its month on Dec 19", "user trial has exhausted its day", "budget company
    stays within its month": the counter, in words (the numbers are beside it, in the forecast)."""
    who = counter_label(budget_name, per)
    if fc.exhausts_on is None:
        return f"{who} stays within its {unit}"
    if fc.spent_nusd >= fc.limit_nusd:
        return f"{who} has exhausted its {unit}"
    return f"{who} exhausts its {unit} on {fc.exhausts_on:%b} {fc.exhausts_on.day}"


def window_unit(budget: Budget) -> str:
    """`day`, `week` or `month` for a calendar budget; `window` otherwise."""
    return budget.window.calendar if isinstance(budget.window, CalendarWindowSpec) else "window"
