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
                          "counter", "window", "mode", "resets_at")
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
    columns = [*report.group_by, *METRICS[:-1], "cost_usd"]
    rows = [{**r.key, **{m: getattr(r, m) for m in METRICS}, "cost_usd": round(r.cost_usd, 9)} for r in report.rows]
    t = report.totals
    totals = {**{m: getattr(t, m) for m in METRICS}, "cost_usd": round(t.cost_usd, 9)}
    return rows, totals, columns


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
        })
    return out


def parse_day(text: str) -> date:
    return date.fromisoformat(text)
