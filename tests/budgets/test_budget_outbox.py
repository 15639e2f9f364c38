"""Settles Redis cannot take wait in the outbox and are replayed exactly once when it is back."""

from __future__ import annotations

from pathlib import Path

import redis.asyncio as aredis
from budget_helpers import FakeClock, admit, budgets
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from extproc.budgets import BudgetEngine, usd_to_nusd
from extproc.budgets.outbox import Outbox
from extproc.procs import free_port
from extproc.usage import usage_write

POLICY = [{"name": "d", "limit_usd": 1, "window": {"calendar": "day"}}]


def _record(rid: str, cost: int) -> dict:
    return {"ts": "2026-11-28T10:00:00+00:00", "request_id": rid, "user": "alice", "model_served": "gpt-4o",
            "provider": "openai", "input_tokens": 10, "output_tokens": 5, "cost_nusd": cost}


async def test_queued_settle_is_replayed_once(rds: aredis.Redis, prefix: str, clock: FakeClock, tmp_path: Path) -> None:
    clock.set("2026-11-28T10:00:00")
    outbox = Outbox(tmp_path / "outbox.sqlite")
    live = BudgetEngine(budgets(*POLICY), rds, clock=clock, prefix=prefix, outbox=outbox)
    a = await admit(live, "r1", max_output_tokens=30_000)
    dead = aredis.Redis(host="127.0.0.1", port=free_port(), socket_timeout=0.2, socket_connect_timeout=0.2,
                        retry=Retry(NoBackoff(), 0))
    try:
        down = BudgetEngine(budgets(*POLICY), dead, clock=clock, prefix=prefix, outbox=outbox)
        cost = usd_to_nusd(0.1)
        w = usage_write(_record("r1", cost), prefix=prefix)
        assert await down.account("r1", a.counters, cost, usage=w) == "queued"
        assert len(Outbox(tmp_path / "outbox.sqlite")) == 1  # on disk, visible to another process
        assert await down.replay_outbox() == 0 and len(outbox) == 1  # Redis still down: kept
    finally:
        await dead.aclose()
    assert await live.replay_outbox() == 1 and len(outbox) == 0
    (st,) = await live.status({})
    assert (st.spent_nusd, st.reserved_nusd) == (cost, 0)
    entries = await rds.xrange(f"{prefix}attribution")
    assert len(entries) == 1 and b'"settlement":"settled"' in entries[0][1][b"record"]
    # A settle that did land but whose reply was lost (a timeout) is queued too: replaying it is harmless.
    keys_args = live._store.settle_call(list(a.counters), request_id="r1", actual=cost, now=None, ttl_now=clock(),
                                        usage=w)
    outbox.put(*keys_args)
    assert await live.replay_outbox() == 1
    (st,) = await live.status({})
    assert st.spent_nusd == cost and len(await rds.xrange(f"{prefix}attribution")) == 1


async def test_no_budget_settle_replays_once_via_marker(rds: aredis.Redis, prefix: str, clock: FakeClock,
                                                         tmp_path: Path) -> None:
    clock.set("2026-11-28T10:00:00")
    e = BudgetEngine([], rds, clock=clock, prefix=prefix, outbox=Outbox(tmp_path / "o.sqlite"))
    w = usage_write(_record("n1", 5), prefix=prefix)
    assert await e.account("n1", (), 5, usage=w) == "recorded"
    assert await e.account("n1", (), 5, usage=w) == "duplicate"
    assert 0 < await rds.ttl(f"{prefix}settled:n1") <= 86400
    assert len(await rds.xrange(f"{prefix}attribution")) == 1
