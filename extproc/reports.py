"""`tollgate report` and `tollgate budgets`: read Redis directly, render as a table, CSV or JSON.

Both work while the gateway runs: they only read (usage rollups, budget counter hashes).
"""

from __future__ import annotations

import csv
import io
import time
from collections.abc import Mapping, Sequence
from datetime import date, datetime, timezone
from typing import Any
from urllib.parse import unquote

import orjson
import redis.asyncio as aredis

from .usage import METRICS, UsageReport


def render(rows: Sequence[Mapping[str, Any]], columns: Sequence[str], fmt: str, *, title: str = "",
           totals: Mapping[str, Any] | None = None) -> str:
    """Rows as a rich table, CSV or JSON. Totals become a last table row, a last CSV row, or a JSON key."""
    if fmt == "json":
        return orjson.dumps({"rows": list(rows), "totals": totals}, option=orjson.OPT_INDENT_2).decode()
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
        if totals is not None:
            w.writerow({**{c: "" for c in columns}, columns[0]: "TOTAL", **totals})
        return buf.getvalue()
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title or None, show_footer=totals is not None)
    for c in columns:
        right = c not in ("user", "team", "app", "group", "model", "provider", "service_token", "budget",
                          "counter", "window", "mode", "resets_at", "exhausts_on", "forecast", "day")
        footer = "TOTAL" if c == columns[0] and totals is not None else _cell(c, (totals or {}).get(c, ""))
        table.add_column(c, justify="right" if right else "left", footer=footer)
    for r in rows:
        table.add_row(*(_cell(c, r.get(c, "")) for c in columns))
    out = io.StringIO()
    Console(file=out, width=200, force_terminal=False).print(table)
    return out.getvalue()


def _cell(column: str, v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.1f}" if column == "percent" else f"{v:.6f}"
    return "" if v is None else str(v)


def usage_rows(report: UsageReport) -> tuple[list[dict[str, Any]], dict[str, Any], list[str]]:
    columns = [*report.group_by, *METRICS[:-1], "cost_usd", *_CACHE_COLUMNS]
    rows = [{**r.key, **{m: getattr(r, m) for m in METRICS}, "cost_usd": round(r.cost_usd, 9), **_cache_cells(r)}
            for r in report.rows]
    t = report.totals
    totals = {**{m: getattr(t, m) for m in METRICS}, "cost_usd": round(t.cost_usd, 9), **_cache_cells(t)}
    return rows, totals, columns


# cache: response-cache hits (requests answered at $0) and the cost they avoided (extproc/cache/)
_CACHE_COLUMNS = ("cache_hits", "avoided_cost_usd")


def _cache_cells(r: Any) -> dict[str, Any]:
    return {"cache_hits": r.cache_hits, "avoided_cost_nusd": r.avoided_cost_nusd,
            "avoided_cost_usd": round(r.avoided_cost_usd, 9)}


def sort_rows(rows: list[dict[str, Any]], key: str) -> list[dict[str, Any]]:
    desc = not key.startswith("+")
    key = key.lstrip("+-")
    return sorted(rows, key=lambda r: (r.get(key) is None, r.get(key)), reverse=desc)


# ---- live budget counters --------------------------------------------------------------------

BUDGET_COLUMNS = ["budget", "counter", "window", "spent_usd", "reserved_usd", "limit_usd", "percent", "resets_at"]


async def budget_counters(redis: aredis.Redis, *, prefix: str = "tollgate:", where: Mapping[str, str] | None = None,
                          now: float | None = None) -> list[dict[str, Any]]:
    """Every live budget counter: settled spend in its current window, live reservations, limit."""
    now = time.time() if now is None else now
    keys = [k async for k in redis.scan_iter(match=f"{prefix}b:*", count=1000) if not k.endswith(b":leases")]
    out = []
    for key in sorted(keys):
        name, period, per = key.decode()[len(prefix) + 2:].split(":", 2)
        per_values = {} if per == "_" else dict(p.split("=", 1) for p in per.split(","))
        per_values = {k: unquote(v) for k, v in per_values.items()}
        if where and any(per_values.get(k) != v for k, v in where.items()):
            continue
        h = {k.decode(): v.decode() for k, v in (await redis.hgetall(key)).items()}
        if "limit" not in h:
            continue
        live = await redis.zrangebyscore(key + b":leases", now, "+inf")
        reserved = sum(int(h.get(f"r:{rid.decode()}", 0)) for rid in live)
        if period.startswith("r"):  # rolling: r<window>s<bucket>
            window_s, bucket_s = (int(x) for x in period[1:].split("s"))
            idx, nb = int(now // bucket_s), window_s // bucket_s
            spent = sum(int(h.get(f"b:{i}", 0)) for i in range(idx - nb + 1, idx + 1))
            window, resets = f"rolling {window_s}s", "rolling"
        else:
            until = float(h["until"]) if h.get("until") else None
            if until is not None and until <= now:
                continue  # an ended period kept for its grace time
            spent, window = int(h.get("spent", 0)), period
            resets = datetime.fromtimestamp(until, timezone.utc).isoformat(timespec="seconds") if until else ""
        limit = int(h["limit"])
        out.append({
            "budget": name, "counter": ",".join(f"{k}={v}" for k, v in per_values.items()) or "(shared)",
            "window": window, "spent_usd": spent / 1e9, "reserved_usd": reserved / 1e9, "limit_usd": limit / 1e9,
            "percent": round(100 * (spent + reserved) / limit, 2) if limit else 100.0, "resets_at": resets,
            # exact, for forecasts and the admin API (JSON output shows them; tables and CSV do not)
            "per": per_values, "period": period,
            "spent_nusd": spent, "reserved_nusd": reserved, "limit_nusd": limit,
        })
    return out


def _current_period(budget: Any, period: str, now: float) -> bool:
    from .budgets.policy import CalendarWindowSpec
    from .budgets.windows import Calendar, Rolling

    if isinstance(budget.window, CalendarWindowSpec):
        return Calendar.from_spec(budget.window).period(now).id == period
    return Rolling.from_key_part(period) is not None


FORECAST_COLUMNS = ["projected_usd", "low_usd", "high_usd", "rate_usd_per_day", "exhausts_on", "forecast"]


async def counter_forecasts(redis: aredis.Redis, rows: Sequence[Mapping[str, Any]], budgets: Sequence[Any], *,
                            prefix: str = "tollgate:", now: float | None = None,
                            rollups: Sequence[Any] | None = None) -> list[tuple[Any, str]]:
    """One (Forecast or None, sentence or why not) per counter row (`budget_counters` or
    `status_row` shape), for calendar counters of the current period whose budget the policy
    still defines (extproc/forecast.py). One read of the last 7 days of rollups serves every row
    (`rollups`: days already read that end today, e.g. the dashboard's range; else they are read)."""
    from .forecast import WINDOW_DAYS, SeriesIndex, forecast_counter, rollup_gap, sentence, series_index, window_unit
    from .usage import recent_rollups

    now = time.time() if now is None else now
    by_name = {b.name: b for b in budgets}
    today = datetime.fromtimestamp(now, timezone.utc).date()
    if rollups is not None and len(rollups) >= WINDOW_DAYS and rollups[-1].day == today:
        recent = list(rollups[-WINDOW_DAYS:])
        while len(recent) > 1 and not recent[0].tuples:
            recent.pop(0)  # as recent_rollups: days before the rollups begin are not zeros
        rollups = recent
    else:
        rollups = await recent_rollups(redis, today, WINDOW_DAYS, prefix=prefix)
    indexes: dict[str, SeriesIndex] = {}
    out: list[tuple[Any, str]] = []
    for row in rows:
        b = by_name.get(row["budget"])
        if b is None:
            out.append((None, "(budget no longer in the policy)"))
        elif not _current_period(b, row["period"], now):
            out.append((None, "(a counter of the window the budget had before an edit)"))
        else:
            if b.name not in indexes and rollup_gap(b) is None and not b.window.model_dump().get("rolling"):
                indexes[b.name] = series_index(b, rollups)
            fc = forecast_counter(b, row["per"], spent_nusd=row["spent_nusd"], limit_nusd=row["limit_nusd"], now=now,
                                  rollups=rollups, index=indexes.get(b.name))
            out.append((fc, sentence(row["budget"], row["per"], window_unit(b), fc) if fc is not None
                        else "(rolling window: no period end to project to)"))
    return out


async def add_forecasts(redis: aredis.Redis, rows: list[dict[str, Any]], budgets: Sequence[Any], *,
                        prefix: str = "tollgate:", now: float | None = None) -> list[dict[str, Any]]:
    """`budget_counters` rows with FORECAST_COLUMNS (and `forecast_method`): `tollgate budgets --forecast`."""
    out = []
    for row, (fc, text) in zip(rows, await counter_forecasts(redis, rows, budgets, prefix=prefix, now=now)):
        extra: dict[str, Any] = {**dict.fromkeys([*FORECAST_COLUMNS, "forecast_method"], ""), "forecast": text}
        if fc is not None:
            extra.update(projected_usd=fc.projected_nusd / 1e9, low_usd=fc.low_nusd / 1e9, high_usd=fc.high_nusd / 1e9,
                         rate_usd_per_day=fc.rate_nusd_per_day / 1e9,
                         exhausts_on=fc.exhausts_on.isoformat() if fc.exhausts_on else "never",
                         forecast_method=fc.method)
        out.append({**row, **extra})
    return out


def status_row(st: Any, prefix: str = "tollgate:") -> dict[str, Any]:
    """An engine BudgetStatus (a caller's own counters) in the shape of a `budget_counters` row."""
    period = st.key[len(prefix):].split(":", 3)[2] if st.key.startswith(prefix) else ""
    used = st.spent_nusd + st.reserved_nusd
    return {
        "budget": st.name, "counter": ",".join(f"{k}={v}" for k, v in st.per.items()) or "(shared)",
        "window": st.window, "spent_usd": st.spent_nusd / 1e9, "reserved_usd": st.reserved_nusd / 1e9,
        "limit_usd": st.limit_nusd / 1e9,
        "percent": round(100 * used / st.limit_nusd, 2) if st.limit_nusd else 100.0,
        "resets_at": datetime.fromtimestamp(st.resets_at, timezone.utc).isoformat(timespec="seconds")
        if st.resets_at else "",
        "per": dict(st.per), "period": period, "spent_nusd": st.spent_nusd, "reserved_nusd": st.reserved_nusd,
        "limit_nusd": st.limit_nusd, "mode": st.mode,
    }


def parse_day(text: str) -> date:
    return date.fromisoformat(text)
