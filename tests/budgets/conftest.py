"""Fixtures for the budget engine tests: a Redis client on the session server, a fresh key prefix, a fake clock."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import redis.asyncio as aredis
from budget_helpers import FakeClock, budgets

from extproc.budgets import BudgetEngine


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()





@pytest.fixture
def make_engine(rds: aredis.Redis, clock: FakeClock, prefix: str) -> Callable[..., BudgetEngine]:
    """make_engine(budget_dict, ...) -> an engine on the test Redis, fake clock and fresh prefix."""

    def make(*items: dict, redis: aredis.Redis | None = None) -> BudgetEngine:
        return BudgetEngine(budgets(*items), redis or rds, clock=clock, prefix=prefix)

    return make
