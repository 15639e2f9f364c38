"""A lease whose gateway died: Redis charges it, rolls it up and records it by itself; a late settle
replaces all three, so records, rollups and counters still agree."""

from __future__ import annotations

from datetime import datetime, timezone

import orjson
import redis.asyncio as aredis
from budget_helpers import FakeClock, budgets, cost_fn, provider_of

from extproc.budgets import BudgetEngine, usd_to_nusd
from extproc.usage import lease_meta, query_usage, usage_write

POLICY = [{"name": "d", "limit_usd": 5, "window": {"calendar": "day"}}]


def _record(**kw) -> dict:
    return {"ts": "2026-11-28T10:00:00+00:00", "request_id": "r1", "user": "alice", "team": "ml",
            "model_served": "gpt-4o", "provider": "openai", **kw}


async def _admit(e: BudgetEngine, meta):  # type: ignore[no-untyped-def]
    return await e.admit(request_id="r1", attrs={"user": "alice"}, model="gpt-4o", provider="openai",
                         input_tokens=100, max_output_tokens=10_000, cost_fn=cost_fn, provider_of=provider_of,
                         lease_seconds=30, meta=meta)


async def _records(rds: aredis.Redis, prefix: str) -> list[dict]:
    return [orjson.loads(f[b"record"]) for _, f in await rds.xrange(f"{prefix}attribution")]


async def test_expiry_is_recorded_and_a_late_settle_supersedes_it(rds: aredis.Redis, prefix: str,
                                                                   clock: FakeClock) -> None:
    clock.set("2026-11-28T10:00:00")
    e = BudgetEngine(budgets(*POLICY), rds, clock=clock, prefix=prefix)
    a = await _admit(e, lambda model, provider, names, reserved: lease_meta(
        _record(model_served=model, provider=provider, budgets=names, reserved_usd=reserved / 1e9), prefix=prefix))
    reserved = a.reserved_nusd
    clock.advance(31)
    (st,) = await e.status({})  # any script touching the counter charges the expired lease
    assert (st.spent_nusd, st.reserved_nusd) == (reserved, 0)
    (rec,) = await _records(rds, prefix)
    assert rec["settlement"] == "lease_expired" and rec["cost_nusd"] == reserved
    assert rec["cost_usd"] == reserved / 1e9 and rec["user"] == "alice" and rec["estimate"] == "reservation"
    assert rec["budgets"] == ["d"] and rec["reserved_usd"] == reserved / 1e9 and rec["model_served"] == "gpt-4o"
    day = datetime.fromtimestamp(clock(), timezone.utc).date()
    rep = await query_usage(rds, group_by=["team"], start=day, end=day, prefix=prefix)
    assert (rep.totals.requests, rep.totals.cost_nusd) == (1, reserved)

    actual = usd_to_nusd(0.01)
    w = usage_write(_record(input_tokens=100, output_tokens=7, cost_nusd=actual), prefix=prefix)
    assert await e.account("r1", a.counters, actual, usage=w) == "settled_after_expiry"
    (st,) = await e.status({})
    assert (st.spent_nusd, st.reserved_nusd) == (actual, 0)
    recs = await _records(rds, prefix)
    assert [r["settlement"] for r in recs] == ["lease_expired", "settled_after_expiry"]
    assert recs[-1]["cost_nusd"] == actual  # the last record per request wins
    rep = await query_usage(rds, group_by=["team"], start=day, end=day, prefix=prefix)
    assert (rep.totals.requests, rep.totals.cost_nusd, rep.totals.output_tokens) == (1, actual, 7)
    # Nothing of the request is left behind but its tombstone-free counter.
    h = await rds.hgetall(a.counters[0].key)
    assert not [k for k in h if k.startswith((b"r:", b"x:", b"m:"))]
    assert await rds.zcard(a.counters[0].lease_key) == 0


async def test_sweep_charges_expired_leases_on_idle_counters(rds: aredis.Redis, prefix: str, clock: FakeClock) -> None:
    clock.set("2026-11-28T10:00:00")
    e = BudgetEngine(budgets(*POLICY, {"name": "roll", "limit_usd": 5, "window": {"rolling": "1h"}}), rds,
                     clock=clock, prefix=prefix)
    a = await _admit(e, None)
    cal, roll = (c.key for c in a.counters)
    assert await e.sweep_expired() == 0  # nothing expired yet: nothing touched
    assert await rds.hget(cal, "reserved") == str(a.reserved_nusd).encode()
    clock.advance(31)
    assert await e.sweep_expired() == 2
    for key in (cal, roll):
        h = await rds.hgetall(key)
        assert h[b"reserved"] == b"0" and b"x:r1" in h
    assert [s.spent_nusd for s in await e.status({})] == [a.reserved_nusd] * 2


async def test_expired_lease_records_reach_the_record_files(rds: aredis.Redis, prefix: str, clock: FakeClock,
                                                            redis_url: str) -> None:
    """Redis writes an expired lease's record itself; the ext_procs copy it to their sinks (the
    record files), each record once, through one consumer group."""
    from extproc.app import Gateway
    from extproc.config import load_config
    from extproc.identity import Authenticator

    clock.set("2026-11-28T10:00:00")
    e = BudgetEngine(budgets(*POLICY), rds, clock=clock, prefix=prefix)
    await _admit(e, lambda model, provider, names, reserved: lease_meta(
        _record(model_served=model, budgets=names), prefix=prefix))
    clock.advance(31)
    await e.sweep_expired()
    config = load_config("policies")
    got: list[dict] = []
    gws = [Gateway(config=config, sink=got.append, auth=Authenticator(config.doc.identity), redis=rds) for _ in range(2)]
    key = f"{prefix}attribution:expired"
    assert [await gw.export_expired(key, consumer=f"c{i}") for i, gw in enumerate(gws)] == [1, 0]
    (rec,) = got
    assert rec["request_id"] == "r1" and rec["settlement"] == "lease_expired" and rec["budgets"] == ["d"]
    assert await rds.xlen(key) == 0  # exported records leave the hand-off stream
