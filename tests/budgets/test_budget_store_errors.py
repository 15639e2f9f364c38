"""Redis unreachable: fail_closed answers store_error, fail_open lets through; settle/release never raise or hang."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aredis
from budget_helpers import FakeClock, admit, budgets
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from extproc.budgets import BudgetEngine, StoreError
from extproc.procs import free_port

DAY = {"calendar": "day"}


@pytest.fixture
async def dead_redis() -> AsyncIterator[aredis.Redis]:
    """A client pointed at a port nothing listens on, created the way the gateway should: short timeouts, no retries."""
    client = aredis.Redis(
        host="127.0.0.1", port=free_port(), socket_timeout=0.2, socket_connect_timeout=0.2, retry=Retry(NoBackoff(), 0)
    )
    try:
        yield client
    finally:
        await client.aclose()


def engine(redis: aredis.Redis, *items: dict) -> BudgetEngine:
    return BudgetEngine(budgets(*items), redis, clock=FakeClock(), prefix="dead:")


async def test_fail_closed_is_store_error(dead_redis: aredis.Redis) -> None:
    e = engine(
        dead_redis,
        {"name": "open", "limit_usd": 1, "window": DAY, "on_store_error": "fail_open"},
        {"name": "closed", "limit_usd": 1, "window": DAY},
    )
    t = time.monotonic()
    a = await admit(e, "r1")
    assert time.monotonic() - t < 2
    assert a.decision == "store_error" and a.store_error and not a.admitted and "closed" in a.reason
    assert await e.settle(a, 10) == "nothing"  # nothing was reserved


async def test_fail_open_allows_without_reservation(dead_redis: aredis.Redis) -> None:
    e = engine(dead_redis, {"name": "open", "limit_usd": 1, "window": DAY, "on_store_error": "fail_open"})
    a = await admit(e, "r1")
    assert a.decision == "allowed" and a.store_error and a.reserved_nusd == 0 and a.counters == ()


async def test_unmatched_request_needs_no_redis(dead_redis: aredis.Redis) -> None:
    e = engine(dead_redis, {"name": "gpt", "match": {"models": ["gpt-*"]}, "limit_usd": 1, "window": DAY})
    a = await admit(e, "r1", model="claude-haiku")
    assert a.decision == "allowed" and not a.store_error


async def test_settle_release_status_when_redis_dies(redis_url: str, prefix: str) -> None:
    live = aredis.Redis.from_url(redis_url, socket_timeout=1, socket_connect_timeout=1)
    clock = FakeClock()
    e = BudgetEngine(budgets({"name": "d", "limit_usd": 1, "window": DAY}), live, clock=clock, prefix=prefix)
    a = await admit(e, "r1")
    b = await admit(e, "r2")
    assert a.decision == b.decision == "allowed"
    await live.aclose()
    dead = aredis.Redis(host="127.0.0.1", port=free_port(), socket_timeout=0.2, socket_connect_timeout=0.2, retry=Retry(NoBackoff(), 0))
    e2 = BudgetEngine(budgets({"name": "d", "limit_usd": 1, "window": DAY}), dead, clock=clock, prefix=prefix)
    t = time.monotonic()
    assert await e2.settle(a, 100) == "store_error"
    assert await e2.release(b) == "store_error"
    with pytest.raises(StoreError):
        await e2.status({})
    assert time.monotonic() - t < 2
    await dead.aclose()


async def test_silent_redis_times_out_quickly() -> None:
    """A Redis that accepts but never answers (hung / blackholed): the socket timeout bounds admit."""
    import asyncio

    async def swallow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await reader.read(1 << 16):  # read and never answer, until the client hangs up
            pass
        writer.close()

    server = await asyncio.start_server(swallow, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client = aredis.Redis(host="127.0.0.1", port=port, socket_timeout=0.2, socket_connect_timeout=0.2, retry=Retry(NoBackoff(), 0))
    try:
        e = engine(client, {"name": "d", "limit_usd": 1, "window": DAY})
        t = time.monotonic()
        a = await admit(e, "r1")
        assert a.decision == "store_error"
        assert time.monotonic() - t < 1.5
    finally:
        await client.aclose()
        server.close()
