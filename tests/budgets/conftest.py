"""Fixtures for the budget engine tests: a Redis client on the session server, a fresh key prefix, a fake clock."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable

import pytest
import redis.asyncio as aredis
from budget_helpers import FakeClock, budgets

from extproc.budgets import BudgetEngine


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def prefix() -> str:
    """A fresh key prefix per test, so tests never see each other's counters."""
    return f"t{uuid.uuid4().hex[:12]}:"


@pytest.fixture
async def rds(redis_url: str) -> AsyncIterator[aredis.Redis]:
    client = aredis.Redis.from_url(redis_url, socket_timeout=2, socket_connect_timeout=2)
    try:
        yield client
    finally:
        await client.aclose()



@pytest.fixture
def make_engine(rds: aredis.Redis, clock: FakeClock, prefix: str) -> Callable[..., BudgetEngine]:
    """make_engine(budget_dict, ...) -> an engine on the test Redis, fake clock and fresh prefix."""

    def make(*items: dict, redis: aredis.Redis | None = None) -> BudgetEngine:
        return BudgetEngine(budgets(*items), redis or rds, clock=clock, prefix=prefix)

    return make
