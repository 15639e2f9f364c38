"""Process-wide state shared by every request: config, Redis, sinks. Built once at start-up."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import orjson
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError

from .alerts.monitor import AlertMonitor
from .attribution import Sink, stdout_sink
from .budgets import Admission, BudgetEngine
from .budgets.outbox import Outbox
from .budgets.pipe import ScriptPipe
from .config import Config, load_config, policy_files
from .policy_yaml import PolicyError
from .runtime import Runtime, describe_changes
from .identity import Authenticator
from .lifecycle.admitter import Admitter
from .lifecycle.concurrency import ConcurrencyCap
from .lifecycle.protect import drain
from .metrics import Metrics
from .processor import Processor
from .usage import expired_stream_key


log = logging.getLogger("tollgate.app")

# Between writing Envoy's xDS files and routing by the new policy: Envoy's file watch applied a
# rewrite within 1-25 ms (measured in tests/test_e2e_xds.py, under load); this leaves a margin.
XDS_PICKUP_SECONDS = 0.2


class Gateway:
    """What the processors share. The policy-derived part is `runtime` (extproc/runtime.py),
    replaced whole on reload; the rest (Redis, sinks, metrics, outbox, concurrency counts)
    lives as long as the process."""

    def __init__(self, config: Config, sink: Sink, auth: Authenticator | None = None,
                 redis: aioredis.Redis | None = None, *, clock: Callable[[], float] = time.time,
                 metrics: Metrics | None = None, outbox: Outbox | None = None, state_dir: Path | None = None,
                 xds_dir: Path | None = None) -> None:
        self.sink = sink
        self.redis = redis
        self.clock = clock
        self.metrics = metrics or Metrics()
        self.metrics_server: Any = None
        self.outbox = outbox
        self.state_dir = state_dir  # `serve --state-dir`: the admin API writes its access log there
        self.xds_dir = xds_dir  # `serve --xds-dir`: Envoy's provider clusters and routes, rewritten on reload
        self.concurrency = ConcurrencyCap()  # in-flight requests per identity
        # The budget scripts' and the response cache's connection (extproc/budgets/pipe.py); everything
        # else uses `redis`.
        self.pipe = ScriptPipe.for_client(redis) if redis is not None else None
        self.runtime = Runtime.build(config, redis=redis, outbox=outbox, metrics=self.metrics, auth=auth,
                                     pipe=self.pipe)
        self.metrics.policy_loaded(config.digest, self.runtime.loaded_at)
        self._reloading = asyncio.Lock()
        # Webhooks about budget events (extproc/alerts/): fed by `record`, run by `run_alerts`.
        self.alerts = AlertMonitor(redis, self.metrics, lambda: self.runtime.config, state_dir=state_dir,
                                   clock=clock) if redis is not None else None

    # The current runtime's parts, for code that runs outside one request (loops, admin API).
    @property
    def config(self) -> Config:
        return self.runtime.config

    @property
    def auth(self) -> Authenticator:
        return self.runtime.auth

    @property
    def budgets(self) -> BudgetEngine | None:
        return self.runtime.budgets

    @property
    def admitter(self) -> Admitter:
        return self.runtime.admitter

    @property
    def provider_keys(self) -> Mapping[str, str]:
        return self.runtime.provider_keys

    async def reload(self, why: str = "files changed") -> bool | None:
        """Load the policy directory again and swap in a new runtime: True if swapped, False if
        nothing changed, None if the new files are invalid or the reload failed (the running
        policy stays, the error is logged, with its file:line for a policy error, and counted in
        tollgate_policy_reload_errors_total). Never raises: the watcher and SIGHUP both call it."""
        try:
            return await self._reload(why)
        except Exception:
            log.exception("policy reload (%s) failed; still serving the running policy", why)
            self.metrics.policy_reload_failed()
            return None

    async def _reload(self, why: str) -> bool | None:
        async with self._reloading:
            old = self.runtime
            started = time.perf_counter()
            try:
                config = await asyncio.to_thread(load_config, old.config.source)
            except PolicyError as e:
                self.metrics.policy_reload_failed()
                log.error("policy reload (%s) refused, still serving %s: %s", why, old.digest[:12],
                          "; ".join(e.problems))
                return None
            if config.digest == old.digest:
                return False
            if self.xds_dir is not None:
                # Envoy must know a new provider before a request is routed there, and keep a
                # removed one until no request of the old policy can still be: both first.
                if await asyncio.to_thread(_write_xds, config, self.xds_dir, old.config):
                    await asyncio.sleep(XDS_PICKUP_SECONDS)
            new = old.succeeded_by(config, redis=self.redis, outbox=self.outbox, metrics=self.metrics, pipe=self.pipe)
            self.runtime = new
            old.retire()
            self.metrics.policy_loaded(config.digest, new.loaded_at)
            changes = describe_changes(old.config, config)
            log.warning("policy reloaded (%s) in %.0f ms: %s -> %s: %s", why, (time.perf_counter() - started) * 1000,
                        old.digest[:12], config.digest[:12], "; ".join(changes) or "no effective change")
            if self.xds_dir is not None:
                asyncio.get_running_loop().create_task(self._narrow_xds(old, new))
            return True

    async def _narrow_xds(self, old: Runtime, new: Runtime) -> None:
        """Once the old policy's last request has ended, drop the providers it alone had."""
        await old.closed()
        async with self._reloading:  # never after a newer reload's own write
            if self.runtime is new and self.xds_dir is not None:
                await asyncio.to_thread(_write_xds, new.config, self.xds_dir)

    async def watch_policies(self, interval: float = 0.5) -> None:
        """Reload whenever a policy file changes (names, sizes, modification times)."""
        seen = _fingerprint(self.config.source)
        while True:
            await asyncio.sleep(interval)
            now = _fingerprint(self.config.source)
            if now != seen:
                seen = now
                await self.reload()

    async def sweep_leases(self, interval: float = 10.0) -> None:
        """Every `interval` s, charge leases that expired on idle counters (see
        BudgetEngine.sweep_expired) and copy the records Redis wrote for them to the sinks."""
        while self.budgets is not None:
            await asyncio.sleep(interval)
            try:
                await self.budgets.sweep_expired()
                await self.export_expired()
            except Exception as e:  # Redis down: the request path reports it; try again later
                log.debug("expired-lease sweep failed: %s", e)

    async def export_expired(self, key: str = expired_stream_key(), consumer: str = "",
                             batch: int = 500) -> int:
        """Copy the records Redis wrote for leases that expired into a charge (stream
        `tollgate:attribution:expired`) to this process's sinks, so the record files hold them too.

        One consumer group shared by every ext_proc: each record goes to one of them. At least
        once: a crash between the write and the XACK writes it again, which the reconciliation
        rule (the last record per request_id wins) absorbs. Returns how many were exported."""
        if self.redis is None or not await self.redis.exists(key):  # Redis creates it at the first expiry
            return 0
        try:
            await self.redis.xgroup_create(key, "exporters", id="0", mkstream=True)
        except aioredis.ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise
        done = 0
        while True:
            got = await self.redis.xreadgroup("exporters", consumer or f"pid-{os.getpid()}", {key: ">"}, count=batch)
            entries = got[0][1] if got else []
            if not entries:
                return done
            ids = []
            for entry_id, fields in entries:
                try:
                    self.sink(orjson.loads(fields[b"record"]))
                except (KeyError, orjson.JSONDecodeError):
                    log.error("unreadable expired-lease record %s in %s", entry_id, key)
                ids.append(entry_id)
            await self.redis.xack(key, "exporters", *ids)
            await self.redis.xdel(key, *ids)
            done += len(ids)

    async def replay_outbox(self, interval: float = 1.0) -> None:
        """Replay settles the outbox holds whenever Redis answers again (every `interval` s)."""
        while self.budgets is not None and self.outbox is not None:
            try:
                pending = len(self.outbox)
                if pending:
                    done = await self.budgets.replay_outbox()
                    if done:
                        log.warning("replayed %d settles from the outbox (%d left)", done, pending - done)
                    pending -= done
                self.metrics.set_outbox_pending(pending)
            except Exception:
                log.exception("outbox replay failed; retrying")
            await asyncio.sleep(interval)

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

    def record(self, record: dict[str, Any], admission: "Admission | None" = None) -> None:
        """Every attribution record: to the log sink, into the metrics, and (with the request's
        admission, which names its counters) to the alert monitor, a list append."""
        self.sink(record)
        self.metrics.observe(record)
        if self.alerts is not None:
            self.alerts.offer(record, admission)

    async def run_alerts(self) -> None:
        """Evaluate and deliver alerts (extproc/alerts/monitor.py) until cancelled."""
        if self.alerts is not None:
            await self.alerts.run()

    def new_processor(self) -> Processor:
        return Processor(self)

    async def close(self) -> None:
        await drain()  # settles still running finish before Redis closes
        if self.budgets is not None and self.outbox is not None:
            try:
                await self.budgets.replay_outbox()
            except Exception:
                log.exception("final outbox replay failed; the next start replays it")
        if self.metrics_server is not None:
            await self.metrics_server.stop()
        if self.alerts is not None:
            await self.alerts.close()  # deliveries in flight get a moment, then are logged as abandoned
        self.runtime.retire()
        await self.runtime.closed()
        if self.pipe is not None:
            await self.pipe.close()
        if self.redis is not None:
            await self.redis.aclose()


def redis_client(url: str, config: Config) -> aioredis.Redis:
    """A Redis client whose pool waits for a free connection instead of failing at once.

    redis-py's default pool raises as soon as its 100 connections are busy: at 128 concurrent
    clients that answered 44 of 14,392 requests with 503 and lost settles. This pool holds up to
    `redis_max_connections` and makes a request wait up to `redis_pool_timeout_seconds` for one.
    Short socket timeouts, and one immediate retry on a connection error only: after Redis
    restarts, every pooled connection is dead, and without the retry each failed its first
    command (12 to 34 of 128 requests got 503 with Redis healthy again). The retry is safe because
    every script is idempotent per request (a reserve replaces the request's own lease, a settle
    charges only while the lease or its tombstone is there). Timeouts are not retried: a dead
    Redis must turn into a clear error (or an outbox entry) well inside Envoy's 3 s ext_proc
    message timeout (redis-py's default retries with backoff took 6 s on a hung Redis).
    """
    g = config.gateway
    pool = aioredis.BlockingConnectionPool.from_url(
        url, max_connections=g.redis_max_connections, timeout=g.redis_pool_timeout_seconds,
        socket_timeout=0.5, socket_connect_timeout=0.5, health_check_interval=0,
        retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)))
    return aioredis.Redis(connection_pool=pool)


async def build_gateway(config: Config, *, redis_url: str | None, outbox_path: Path | None = None,
                        sink: Sink | None = None, state_dir: Path | None = None,
                        xds_dir: Path | None = None) -> Gateway:
    redis = redis_client(redis_url, config) if redis_url else None
    outbox = Outbox(outbox_path) if (outbox_path is not None and redis is not None) else None
    if state_dir is None and outbox_path is not None:
        state_dir = outbox_path.parent  # the outbox lives in the state dir (`serve --state-dir`)
    return Gateway(config=config, sink=sink or stdout_sink(), redis=redis, outbox=outbox, state_dir=state_dir,
                   xds_dir=xds_dir)


def _write_xds(config: Config, xds_dir: Path, keep: Config | None = None) -> bool:
    """Envoy's provider clusters and routes for `config`, plus those only `keep` has."""
    from .envoy_config import write_xds

    if keep is not None:
        providers = {**keep.providers, **config.providers}
        config = dataclasses.replace(config, doc=config.doc.model_copy(update={"providers": providers}))
    return write_xds(config, xds_dir)


def _fingerprint(root: Path) -> tuple[tuple[str, int, int], ...]:
    """Cheap to take twice a second: a changed file changes its size or mtime (a ConfigMap's
    symlink swap changes both)."""
    out = []
    for p in policy_files(root):
        try:
            st = p.stat()
        except OSError:
            continue
        out.append((str(p), st.st_size, st.st_mtime_ns))
    return tuple(out)
