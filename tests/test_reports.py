"""Rendering of reports and the live budget counter listing."""

from __future__ import annotations

import csv
import io
import json
import time
import uuid

import redis.asyncio as aredis

from extproc.budgets import BudgetEngine, load_budgets
from extproc.reports import budget_counters, render


def test_render_formats_agree():
    rows = [{"team": "web", "requests": 3, "cost_usd": 0.000157}, {"team": "ml", "requests": 1, "cost_usd": 0.001}]
    totals = {"requests": 4, "cost_usd": 0.001157}
    cols = ["team", "requests", "cost_usd"]
    data = json.loads(render(rows, cols, "json", totals=totals))
    assert data == {"rows": rows, "totals": totals}
    parsed = list(csv.DictReader(io.StringIO(render(rows, cols, "csv", totals=totals))))
    assert [r["team"] for r in parsed] == ["web", "ml", "TOTAL"] and parsed[-1]["cost_usd"] == "0.001157"
    table = render(rows, cols, "table", totals=totals, title="spend")
    assert "web" in table and "0.001157" in table and "TOTAL" in table


async def test_budget_counters_show_spent_reserved_limit(redis_url):
    r = aredis.Redis.from_url(redis_url)
    prefix = f"t{uuid.uuid4().hex[:8]}:"
    budgets = load_budgets({"budgets": [
        {"name": "daily", "per": ["user"], "limit_usd": 2, "window": {"calendar": "day"}},
        {"name": "roll", "limit_usd": 1, "window": {"rolling": "1h", "bucket": "1m"}},
    ]})
    engine = BudgetEngine(budgets, r, prefix=prefix)

    async def admit(rid: str, user: str, lease_seconds: float = 60):
        return await engine.admit(request_id=rid, attrs={"user": user}, model="m", provider="p", input_tokens=0,
                                  max_output_tokens=100, cost_fn=lambda m, i, o: o * 1_000_000,
                                  provider_of=lambda m: None, lease_seconds=lease_seconds)

    a = await admit("r1", "alice@x.com")
    await engine.settle(a, 40_000_000)
    await admit("r2", "alice@x.com")  # still in flight
    await admit("r3", "bob", lease_seconds=1)
    rows = await budget_counters(r, prefix=prefix)
    by = {(x["budget"], x["counter"]): x for x in rows}
    alice = by[("daily", "user=alice@x.com")]
    assert (alice["spent_usd"], alice["reserved_usd"], alice["limit_usd"]) == (0.04, 0.1, 2.0)
    assert alice["percent"] == 7.0 and alice["resets_at"].endswith("T00:00:00+00:00")
    shared = by[("roll", "(shared)")]
    assert (shared["spent_usd"], shared["reserved_usd"], shared["resets_at"]) == (0.04, 0.2, "rolling")
    only_bob = await budget_counters(r, prefix=prefix, where={"user": "bob"})
    assert [(x["budget"], x["reserved_usd"]) for x in only_bob] == [("daily", 0.1)]
    # Leases past their expiry no longer count, even before any script purges them.
    # (A few seconds on, not minutes: the daily counter read is the day `now` falls in, and a
    # later day has none; this failed when run two minutes before midnight UTC.)
    later = await budget_counters(r, prefix=prefix, where={"user": "bob"}, now=time.time() + 3)
    assert later[0]["reserved_usd"] == 0
    await r.aclose()
