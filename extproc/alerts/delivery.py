"""Webhook delivery: POST the payload, retry with exponential backoff, log every attempt.

Each delivery is its own task on the ext_proc's event loop, so a receiver that hangs or fails
holds only its own delivery (an attempt is cut at the alert's `timeout_seconds`), never a
request nor another alert. An attempt succeeds on any 2xx; 5xx, 408, 429, a timeout or no
connection are retried (`retries` times, waiting `backoff_seconds`, doubling, at most
MAX_BACKOFF_SECONDS); any other status fails at once (a wrong URL does not get better).

The delivery log, `<state dir>/alerts-delivery.jsonl`, has one JSON line per attempt; the
ext_procs of a host share it (jsonl.py). Fields are added, never renamed (docs/alerts.md lists
them). The URL is logged as scheme and host only: webhook URLs carry their secret in the path.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
import orjson

from ..jsonl import append_line

if TYPE_CHECKING:
    from ..metrics import Metrics
    from .policy import Alert

log = logging.getLogger("tollgate.alerts")

FILE_NAME = "alerts-delivery.jsonl"
MAX_BACKOFF_SECONDS = 300.0
MAX_IN_FLIGHT = 1000
"""Deliveries (with their retries) held at once per process; past this, new ones are dropped,
logged and counted (tollgate_alert_deliveries_total{outcome="dropped"})."""
USER_AGENT = "tollgate-alerts/1"


class DeliveryLog:
    """Appends one JSON line per attempt to `path`; without one (no state dir), to the log."""

    def __init__(self, path: str | os.PathLike[str] | None) -> None:
        self.path = Path(path) if path is not None else None

    @classmethod
    def in_state_dir(cls, state_dir: str | os.PathLike[str] | None) -> "DeliveryLog":
        return cls(Path(state_dir) / FILE_NAME if state_dir is not None else None)

    def write(self, entry: Mapping[str, Any]) -> None:
        """Never raises: a delivery must not fail for its log line."""
        try:
            line = orjson.dumps(entry, default=str) + b"\n"
            if self.path is None:
                log.info("alert delivery: %s", line[:-1].decode())
            else:
                append_line(self.path, line)
        except Exception as e:  # noqa: BLE001
            log.error("alert delivery log %s: could not write: %s: %s", self.path, type(e).__name__, e)


@dataclass(frozen=True)
class Delivery:
    """One event for one alert: the payload and where it is going."""

    alert: "Alert"
    event: str  # the kind: threshold, exhausted, ...
    payload: Mapping[str, Any]


def _retryable(status: int) -> bool:
    return status >= 500 or status in (408, 429)


class Deliverer:
    """Sends deliveries in background tasks. `sleep` and `clock` are injectable for tests."""

    def __init__(self, metrics: "Metrics", delivery_log: DeliveryLog, *, clock: Callable[[], float] = time.time,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep, max_in_flight: int = MAX_IN_FLIGHT) -> None:
        self.metrics = metrics
        self.log = delivery_log
        self.clock = clock
        self.sleep = sleep
        self.max_in_flight = max_in_flight
        self._tasks: set[asyncio.Task[str]] = set()
        self._session: aiohttp.ClientSession | None = None

    @property
    def in_flight(self) -> int:
        return len(self._tasks)

    def submit(self, d: Delivery) -> bool:
        """Start delivering `d`; False (logged, counted) when too many are already in flight."""
        if len(self._tasks) >= self.max_in_flight:
            self.metrics.alert_delivery(d.alert.name, d.event, "dropped")
            self._write(d, attempt=0, outcome="dropped", error=f"{len(self._tasks)} deliveries already in flight")
            return False
        task = asyncio.get_running_loop().create_task(self.deliver(d))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return True

    async def deliver(self, d: Delivery) -> str:
        """Attempt until delivered, failed for good, or out of retries: "delivered" or "failed"."""
        a = d.alert
        body = orjson.dumps(d.payload)
        headers = {"content-type": "application/json", "user-agent": USER_AGENT, **a.headers}
        attempts = a.retries + 1
        for attempt in range(1, attempts + 1):
            started = time.perf_counter()
            status: int | None = None
            error: str | None = None
            try:
                session = self._client()
                async with session.post(a.url, data=body, headers=headers, allow_redirects=False,
                                        timeout=aiohttp.ClientTimeout(total=a.timeout_seconds)) as r:
                    status = r.status
                    await r.read()
            except asyncio.CancelledError:
                self._write(d, attempt=attempt, outcome="abandoned", started=started,
                            error="the gateway stopped during the attempt")
                raise
            except (aiohttp.ClientError, TimeoutError, OSError) as e:
                error = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
            if status is not None and 200 <= status < 300:
                self._write(d, attempt=attempt, outcome="delivered", status=status, started=started)
                self.metrics.alert_delivery(a.name, d.event, "delivered")
                return "delivered"
            self.metrics.alert_attempt_failed(a.name)
            if (status is not None and not _retryable(status)) or attempt == attempts:
                self._write(d, attempt=attempt, outcome="failed", status=status, error=error, started=started)
                self.metrics.alert_delivery(a.name, d.event, "failed")
                log.warning("alert %s: %s for %s not delivered after %d attempt(s): %s", a.name, d.event,
                            d.payload.get("counter"), attempt, error or f"HTTP {status}")
                return "failed"
            wait = min(a.backoff_seconds * 2 ** (attempt - 1), MAX_BACKOFF_SECONDS)
            self._write(d, attempt=attempt, outcome="retrying", status=status, error=error, started=started,
                        retry_in_s=wait)
            try:
                await self.sleep(wait)
            except asyncio.CancelledError:
                self._write(d, attempt=attempt, outcome="abandoned", error="the gateway stopped before a retry")
                raise
        return "failed"  # unreachable: the last attempt returns

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=32, limit_per_host=8), raise_for_status=False)
        return self._session

    def _write(self, d: Delivery, *, attempt: int, outcome: str, status: int | None = None, error: str | None = None,
               started: float | None = None, retry_in_s: float | None = None) -> None:
        p = d.payload
        self.log.write({
            "ts": datetime.fromtimestamp(self.clock(), timezone.utc).isoformat(timespec="milliseconds"),
            "alert": d.alert.name, "event": d.event, "id": p.get("id"), "url": d.alert.host,
            "budget": p.get("budget"), "counter": p.get("counter"), "period": p.get("period"),
            "attempt": attempt, "attempts": d.alert.retries + 1, "outcome": outcome, "status": status,
            "error": error, "retry_in_s": retry_in_s,
            "duration_ms": round((time.perf_counter() - started) * 1000, 3) if started is not None else None,
        })

    async def idle(self, timeout: float = 30.0) -> None:
        """Wait until no delivery is in flight (or `timeout`): for tests and a clean stop."""
        deadline = time.monotonic() + timeout
        while self._tasks and time.monotonic() < deadline:
            await asyncio.wait(list(self._tasks), timeout=max(0.0, deadline - time.monotonic()))

    async def close(self, grace: float = 2.0) -> None:
        """Give deliveries in flight `grace` seconds, then cancel them (logged as abandoned)."""
        if self._tasks:
            _, pending = await asyncio.wait(list(self._tasks), timeout=grace)
            for t in pending:
                t.cancel()
            if pending:
                await asyncio.wait(pending, timeout=1.0)
        if self._session is not None:
            await self._session.close()
            self._session = None
