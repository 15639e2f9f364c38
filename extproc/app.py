"""Process-wide state shared by every request: config, Redis, sinks. Built once at start-up."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from .attribution import Sink, stdout_sink
from .budgets import BudgetEngine
from .config import Config
from .identity import Authenticator
from .metrics import Metrics
from .processor import Processor


log = logging.getLogger("tollgate.app")


@dataclass
class Gateway:
    """What the processors share. `config` is replaced whole on reload, never mutated."""

    config: Config
    sink: Sink
    auth: Authenticator
    redis: aioredis.Redis | None = None
    budgets: BudgetEngine | None = None
    clock: Callable[[], float] = time.time
    provider_keys: dict[str, str] = field(default_factory=dict)
    metrics: Metrics = field(default_factory=Metrics)
    metrics_server: Any = None

    def __post_init__(self) -> None:
        self.refresh_keys()
        if self.redis is not None:
            # Even with no budgets: the engine's settle call also writes the usage rollups.
            self.budgets = BudgetEngine(list(self.config.doc.budgets), self.redis, clock=self.clock)

    async def watch_shared_budgets(self, interval: float = 15.0) -> None:
        """Keep the utilisation gauge of shared (no `per`) budget counters fresh, off the hot path."""
        from .reports import budget_counters

        while self.redis is not None:
            try:
                for row in await budget_counters(self.redis):
                    if row["counter"] == "(shared)" and row["limit_usd"]:
                        self.metrics.set_budget_utilisation(
                            row["budget"], (row["spent_usd"] + row["reserved_usd"]) / row["limit_usd"])
            except Exception as e:  # Redis down: the request path reports it; just try again later
                log.debug("shared budget gauge refresh failed: %s", e)
                self.metrics.redis_error("gauge")
            await asyncio.sleep(interval)

    def record(self, record: dict[str, Any]) -> None:
        """Every attribution record: to the log sink and into the metrics."""
        self.sink(record)
        self.metrics.observe(record)

    def refresh_keys(self) -> None:
        """Read gateway-held provider keys once (env or file), not per request."""
        self.provider_keys = {
            name: key for name, p in self.config.providers.items() if p.key and (key := p.key.read())
        }

    def new_processor(self) -> Processor:
        return Processor(self)

    async def close(self) -> None:
        if self.metrics_server is not None:
            await self.metrics_server.stop()
        await self.auth.close()
        if self.redis is not None:
            await self.redis.aclose()


async def build_gateway(config: Config, *, redis_url: str | None) -> Gateway:
    redis = None
    if redis_url:
        # Short timeouts: a dead Redis must turn into a clear error well inside Envoy's
        # 3 s ext_proc message timeout, never a hung request.
        # No retries either: redis-py's default retries with backoff took 6 s on a hung Redis.
        redis = aioredis.Redis.from_url(redis_url, socket_timeout=0.5, socket_connect_timeout=0.5,
                                        health_check_interval=0, retry=Retry(NoBackoff(), 0))
    return Gateway(config=config, sink=stdout_sink(), auth=Authenticator(config.doc.identity), redis=redis)
