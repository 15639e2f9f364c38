"""Work a cancel must not stop halfway: a Redis call whose effect must be known (a reserve that
may have landed, a settle), run in a task of its own that the caller awaits through a future.

grpc.aio cancels a stream's handler when Envoy resets the stream. Awaiting a task directly would
pass that cancel on to the task; the caller here awaits a separate future instead, so only the
wait is cancelled, and the task runs to its end (kept referenced until then, and awaited at
shutdown by `drain`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

_BACKGROUND: set[asyncio.Task[Any]] = set()


def run_protected(coro: Coroutine[Any, Any, Any]) -> "asyncio.Future[Any]":
    """Run `coro` in its own task, kept referenced until done, and return a future of its result:
    the caller may be cancelled while waiting (which cancels only that future), the work is not."""
    return start_protected(coro)[1]


def start_protected(coro: Coroutine[Any, Any, Any]) -> "tuple[asyncio.Task[Any], asyncio.Future[Any]]":
    """`run_protected`, also returning the task (which `Settler.close` awaits after a cancel).

    Unlike `asyncio.shield(task)`, the result reaches the caller from inside the task's last
    step: its wake-up is scheduled in the same event-loop turn, not two turns later (the task's
    done callbacks, then the shield's). At one connection each turn is an epoll_wait and a round
    of callbacks, so this is felt in the latency of every Redis call on the request path."""
    loop = asyncio.get_running_loop()
    out = loop.create_future()
    task = loop.create_task(_run_into(coro, out))
    _BACKGROUND.add(task)
    task.add_done_callback(_finished)
    return task, out


async def _run_into(coro: Coroutine[Any, Any, Any], out: "asyncio.Future[Any]") -> Any:
    try:
        result = await coro
    except asyncio.CancelledError:
        out.cancel()
        raise
    except BaseException as e:
        if not out.done():
            out.set_exception(e)
        raise
    if not out.done():
        out.set_result(result)
    return result


def _finished(task: "asyncio.Task[Any]") -> None:
    _BACKGROUND.discard(task)
    if not task.cancelled():
        task.exception()  # the caller had it through its future; nothing is "never retrieved" here


async def drain(timeout: float = 5.0) -> None:
    """Wait for settles still running (at shutdown, before Redis is closed)."""
    if _BACKGROUND:
        await asyncio.wait(list(_BACKGROUND), timeout=timeout)
