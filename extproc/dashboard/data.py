"""What the dashboard shows for a date range, from the same readers as `tollgate report` and
`tollgate budgets` (extproc/usage.py `read_rollups` + `aggregate`, extproc/reports.py), so the page,
the CLI and the admin API can never disagree. Pure: the rollups are read once by the caller and
passed in; grouping them three ways (by day and dimension, by day, by dimension) reads Redis once.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, timedelta

from ..usage import DECISIONS, METRICS, RollupDay, UsageRow, aggregate

BY = ("team", "user", "model", "provider", "app")
"""The dimensions the page splits spend by (its selector)."""
DEFAULT_DAYS = 30
MAX_DAYS = 400


@dataclass(frozen=True)
class Series:
    key: str
    cost_nusd: list[int]
    total_nusd: int


@dataclass(frozen=True)
class DashboardUsage:
    days: list[date]
    series: list[Series]  # dearest first
    top: list[UsageRow]  # the range by `by`: the same rows as query_usage(group_by=[by])
    totals: UsageRow
    decisions: list[dict[str, int]] = field(default_factory=list)  # per day: allowed, downgraded, clamped, blocked


def date_range(start: str, end: str, today: date) -> tuple[date, date]:
    """The range a request names: `to` defaults to today, `from` to DEFAULT_DAYS - 1 days before
    `to`. ValueError for a bad date, a reversed range or one over MAX_DAYS."""
    last = date.fromisoformat(end) if end else today
    first = date.fromisoformat(start) if start else last - timedelta(days=DEFAULT_DAYS - 1)
    if last < first:
        raise ValueError(f"`to` ({last}) is before `from` ({first})")
    if (last - first).days >= MAX_DAYS:
        raise ValueError(f"at most {MAX_DAYS} days")
    return first, last


def usage(rollups: Sequence[RollupDay], *, by: str, where: Mapping[str, str] | None = None) -> DashboardUsage:
    """Spend per day split by `by`, the range's rows by `by`, and decisions per day: one
    `aggregate` pass by (day, `by`), summed over days for the rows (exact integers, so they equal
    `query_usage(group_by=[by])`'s: `by` is never `group`, whose rows overlap) and over keys for
    the decisions. Rows of tuples that were only ever blocked carry decisions but no request;
    they count in the decisions, never in the rows (as in `tollgate report`)."""
    if by not in BY:
        raise ValueError(f"by {by!r}: use one of {', '.join(BY)}")
    days = [r.day for r in rollups]
    index = {d.isoformat(): i for i, d in enumerate(days)}
    per_day = aggregate(rollups, group_by=["day", by], where=where, blocked_only_rows=True)
    series: dict[str, list[int]] = {}
    top: dict[str, UsageRow] = {}
    decisions = [dict.fromkeys(DECISIONS, 0) for _ in days]
    for row in per_day.rows:
        i, key = index[row.key["day"]], row.key[by]
        for d, n in row.decisions.items():
            if d in decisions[i]:
                decisions[i][d] += n
        if not row.requests:
            continue  # only blocked: no request reached a provider
        series.setdefault(key, [0] * len(days))[i] += row.cost_nusd
        acc = top.get(key)
        if acc is None:
            acc = top[key] = UsageRow(key={by: key})
        acc.add({m: getattr(row, m) for m in METRICS})
    out = sorted((Series(k, v, sum(v)) for k, v in series.items()), key=lambda s: (-s.total_nusd, s.key))
    rows = sorted(top.values(), key=lambda r: (-r.cost_nusd, tuple(r.key.values())))
    return DashboardUsage(days=days, series=out, top=rows, totals=per_day.totals, decisions=decisions)
