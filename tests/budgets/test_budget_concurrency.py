"""No overspend under concurrency: many admits race for one $1 budget, from one or two engines/clients."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable

import pytest
import redis.asyncio as aredis
from budget_helpers import FakeClock, admit, budgets

from extproc.budgets import Admission, BudgetEngine, usd_to_nusd

LIMIT = usd_to_nusd(1)
N = 64


def worst_cases(seed: int) -> list[int]:
    """Output caps whose worst case is 3-20 cents on gpt-4o ($10 / M output tokens)."""
    rng = random.Random(seed)
    return [rng.randint(3_000, 20_000) for _ in range(N)]


async def race(engines: list[BudgetEngine], seed: int) -> tuple[list[Admission], int]:
    """64 concurrent admits spread over `engines`, then settle each admitted one at a random cost <= its reservation."""
    rng = random.Random(seed + 1)
    caps = worst_cases(seed)
    admissions = await asyncio.gather(
        *(admit(engines[i % len(engines)], f"req-{i}", max_output_tokens=caps[i]) for i in range(N))
    )
    settled = 0
    settles = []
    for i, a in enumerate(admissions):
        if a.admitted:
            actual = rng.randint(a.reserved_nusd // 2, a.reserved_nusd)
            settled += actual
            settles.append(engines[(i + 1) % len(engines)].settle(a, actual))
    assert set(await asyncio.gather(*settles)) <= {"settled"}
    return list(admissions), settled


def check(admissions: list[Admission], settled: int, statuses: list) -> None:  # type: ignore[type-arg]
    admitted = [a for a in admissions if a.admitted]
    blocked = [a for a in admissions if a.decision == "blocked"]
    assert len(admitted) + len(blocked) == N
    reserved_total = sum(a.reserved_nusd for a in admitted)
    assert reserved_total <= LIMIT  # at no point could the admitted worst cases exceed the limit
    (st,) = statuses
    assert st.spent_nusd == settled <= LIMIT and st.reserved_nusd == 0
    # reservations did not starve the budget: once something was blocked, the room left was smaller than it
    assert blocked, "64 requests of >= 3 cents must exhaust $1"
    assert reserved_total >= LIMIT - usd_to_nusd(0.20)
    smallest_blocked = min(a.blocking.spent_nusd + a.blocking.reserved_nusd for a in blocked if a.blocking)
    assert smallest_blocked > LIMIT - usd_to_nusd(0.20)


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_one_engine_never_overspends(make_engine: Callable[..., BudgetEngine], seed: int) -> None:
    e = make_engine({"name": "shared", "limit_usd": 1, "window": {"calendar": "day"}})
    admissions, settled = await race([e], seed)
    check(admissions, settled, await e.status({}))


@pytest.mark.parametrize("seed", [4, 5])
async def test_two_engines_two_clients_never_overspend(redis_url: str, prefix: str, clock: FakeClock, seed: int) -> None:
    clients = [aredis.Redis.from_url(redis_url, socket_timeout=2, socket_connect_timeout=2) for _ in range(2)]
    try:
        policy = budgets({"name": "shared", "limit_usd": 1, "window": {"rolling": "1h", "bucket": "5m"}})
        engines = [BudgetEngine(policy, c, clock=clock, prefix=prefix) for c in clients]
        admissions, settled = await race(engines, seed)
        check(admissions, settled, await engines[0].status({}))
    finally:
        for c in clients:
            await c.aclose()


async def test_clamp_under_contention_never_overspends(make_engine: Callable[..., BudgetEngine]) -> None:
    e = make_engine({"name": "c", "limit_usd": 1, "window": {"calendar": "day"}, "clamp": True})
    admissions = await asyncio.gather(*(admit(e, f"r{i}", max_output_tokens=17_000, min_output_tokens=100) for i in range(N)))
    admitted = [a for a in admissions if a.admitted]
    assert sum(a.reserved_nusd for a in admitted) <= LIMIT
    assert sum(a.reserved_nusd for a in admitted) > LIMIT - usd_to_nusd(0.001)  # clamping fills the last cent
    assert any(a.decision == "clamped" for a in admitted)
    for a in admitted:
        assert a.reserved_nusd == a.max_output_tokens * 10_000
