"""Random sequences of admit / settle / release / clock jumps checked against a plain-Python model of the ledger,
plus the raw Redis layout the engine leaves behind."""

from __future__ import annotations

import random
from collections.abc import Callable
from datetime import datetime, timezone

import pytest
import redis.asyncio as aredis
from budget_helpers import FakeClock, admit

from extproc.budgets import Admission, BudgetEngine, usd_to_nusd

LIMIT = usd_to_nusd(1)


@pytest.mark.parametrize("seed", range(6))
async def test_engine_matches_model(make_engine: Callable[..., BudgetEngine], clock: FakeClock, seed: int) -> None:
    rng = random.Random(seed)
    e = make_engine({"name": "d", "limit_usd": 1, "window": {"calendar": "day"}})
    clock.set("2026-11-28T01:00:00")
    leases: dict[str, tuple[int, float]] = {}  # request_id -> (amount, expiry): live leases
    tombs: dict[str, int] = {}  # request_id -> amount its expired lease was charged
    handles: dict[str, Admission] = {}
    spent = 0

    def expire(now: float) -> None:
        """What the scripts' purge does: a lease at or past its expiry becomes a charge."""
        nonlocal spent
        for rid, (amount, exp) in list(leases.items()):
            if exp <= now:
                del leases[rid]
                tombs[rid] = amount
                spent += amount

    def live(exclude: str = "") -> int:
        return sum(a for rid, (a, _) in leases.items() if rid != exclude)

    for step in range(250):
        op = rng.choice(["admit", "admit", "admit", "settle", "release", "tick"])
        now = clock()
        expire(now)
        if op == "admit":
            rid = rng.choice([f"r{step}", *[r for r in list(handles)[-3:] if r in leases]]) if handles else f"r{step}"
            cost = rng.randint(1, 30) * usd_to_nusd(0.01)
            lease = rng.choice([5, 30, 120])
            a = await admit(e, rid, max_output_tokens=cost // 10_000, lease_seconds=lease)
            fits = spent + live(exclude=rid) + cost <= LIMIT
            assert a.admitted == fits, (step, a)
            if fits:
                leases[rid] = (cost, now + lease)
                handles[rid] = a
            else:
                assert a.blocking and a.blocking.spent_nusd == spent and a.blocking.reserved_nusd == live(rid)
        elif op == "settle" and handles:
            rid = rng.choice(list(handles))
            actual = rng.randint(0, handles[rid].reserved_nusd)
            outcome = await e.settle(handles[rid], actual)
            if rid in leases:
                assert outcome == "settled", step
                spent += actual
                del leases[rid]
            elif rid in tombs:
                assert outcome == "settled_after_expiry", step
                spent += actual - tombs.pop(rid)
            else:
                assert outcome == "duplicate", step
        elif op == "release" and handles:
            rid = rng.choice(list(handles))
            await e.release(handles[rid])
            leases.pop(rid, None)
            spent -= tombs.pop(rid, 0)
        else:
            clock.advance(rng.choice([1, 10, 40]))
        expire(clock())
        (st,) = await e.status({})
        assert (st.spent_nusd, st.reserved_nusd) == (spent, live()), step


async def test_redis_layout(make_engine: Callable[..., BudgetEngine], clock: FakeClock, prefix: str, rds: aredis.Redis) -> None:
    e = make_engine(
        {"name": "monthly", "per": ["user"], "limit_usd": 5, "window": {"calendar": "month"}},
        {"name": "roll", "limit_usd": 5, "window": {"rolling": "24h"}},
    )
    clock.set("2026-11-28T10:00:00")
    a = await admit(e, "req-1", user="al:ice", max_output_tokens=1000, lease_seconds=60)
    cal, roll = f"{prefix}b:monthly:2026-11:user=al%3Aice", f"{prefix}b:roll:r86400s3600:_"
    assert [c.key for c in a.counters] == [cal, roll]
    dec_1 = str(int(datetime(2026, 12, 1, tzinfo=timezone.utc).timestamp()))
    assert await rds.hgetall(cal) == {b"reserved": b"10000000", b"r:req-1": b"10000000",
                                      b"limit": b"5000000000", b"until": dec_1.encode()}
    assert await rds.zrange(f"{cal}:leases", 0, -1, withscores=True) == [(b"req-1", clock() + 60)]
    await e.settle(a, 7)
    assert await rds.hgetall(cal) == {b"reserved": b"0", b"spent": b"7", b"limit": b"5000000000", b"until": dec_1.encode()}
    bucket = int(clock() // 3600)
    assert await rds.hgetall(roll) == {b"reserved": b"0", b"lo": str(bucket - 23).encode(), f"b:{bucket}".encode(): b"7",
                                       b"limit": b"5000000000", b"until": b""}
    assert await rds.exists(f"{prefix}settled:req-1") == 0  # a request with a lease needs no marker
    assert 86400 < await rds.ttl(roll) <= 3 * 86400
    await e.load_scripts()
