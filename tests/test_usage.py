"""Usage rollups: written in the settle call, idempotent, grouped by any dimensions."""

from __future__ import annotations

import uuid
from datetime import date

import orjson
import pytest
import redis.asyncio as aredis

from extproc.budgets import BudgetEngine
from extproc.usage import query_usage, usage_write


def rec(user, team, model, cost, *, groups=(), ts="2026-11-28T10:00:00+00:00", inp=10, out=5):
    return {"ts": ts, "request_id": uuid.uuid4().hex, "user": user, "team": team, "app": "a", "groups": list(groups),
            "model_served": model, "provider": "fake", "service_token": None, "input_tokens": inp,
            "output_tokens": out, "cached_input_tokens": 1, "cache_write_tokens": 0, "cost_nusd": cost}


@pytest.fixture
async def env(redis_url):
    r = aredis.Redis.from_url(redis_url)
    prefix = f"t{uuid.uuid4().hex[:8]}:"
    yield r, BudgetEngine([], r, prefix=prefix), prefix
    await r.aclose()


async def test_rollups_group_and_filter(env):
    r, engine, prefix = env
    records = [
        rec("alice", "web", "gpt-4o", 100, groups=["eng", "seniors"]),
        rec("alice", "web", "gpt-4o", 50, groups=["eng", "seniors"]),
        rec("bob", "web", "gpt-4o-mini", 7, groups=["eng"]),
        rec("carol", "ml", "gpt-4o", 1000, ts="2026-11-27T23:59:59+00:00"),
    ]
    for x in records:
        assert await engine.account(x["request_id"], (), x["cost_nusd"], usage=usage_write(x, prefix=prefix)) == "recorded"
    q = await query_usage(r, group_by=["team"], start=date(2026, 11, 27), end=date(2026, 11, 28), prefix=prefix)
    assert [(row.key["team"], row.cost_nusd, row.requests) for row in q.rows] == [("ml", 1000, 1), ("web", 157, 3)]
    assert q.totals.cost_nusd == 1157 and q.totals.input_tokens == 40 and q.totals.cached_input_tokens == 4
    q = await query_usage(r, group_by=["user", "model"], start=date(2026, 11, 28), end=date(2026, 11, 28), prefix=prefix)
    assert {(row.key["user"], row.key["model"]): row.cost_nusd for row in q.rows} == {
        ("alice", "gpt-4o"): 150, ("bob", "gpt-4o-mini"): 7}
    q = await query_usage(r, group_by=["group"], start=date(2026, 11, 28), end=date(2026, 11, 28), prefix=prefix)
    assert {row.key["group"]: row.cost_nusd for row in q.rows} == {"eng": 157, "seniors": 150}
    assert q.totals.cost_nusd == 157  # each request once, whatever its groups
    q = await query_usage(r, group_by=["user"], start=date(2026, 11, 1), end=date(2026, 11, 30), prefix=prefix,
                          where={"group": "seniors"})
    assert [(row.key["user"], row.cost_nusd) for row in q.rows] == [("alice", 150)]


async def test_settle_is_idempotent_for_rollups_and_stream(env):
    r, engine, prefix = env
    x = rec("dave", "web", "gpt-4o", 42)
    w = usage_write(x, prefix=prefix)
    assert await engine.account(x["request_id"], (), 42, usage=w) == "recorded"
    assert await engine.account(x["request_id"], (), 42, usage=w) == "duplicate"
    q = await query_usage(r, group_by=["user"], start=date(2026, 11, 28), end=date(2026, 11, 28), prefix=prefix)
    assert q.totals.cost_nusd == 42 and q.totals.requests == 1
    entries = await r.xrange(f"{prefix}attribution")
    assert len(entries) == 1 and orjson.loads(entries[0][1][b"record"])["request_id"] == x["request_id"]


async def test_unknown_dimension_is_refused(env):
    r, _, prefix = env
    with pytest.raises(ValueError, match="unknown dimension"):
        await query_usage(r, group_by=["colour"], start=date(2026, 11, 1), end=date(2026, 11, 2), prefix=prefix)
