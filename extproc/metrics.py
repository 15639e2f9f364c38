"""Prometheus metrics for the ext_proc: a library, wired in by the server.

One `Metrics` instance owns its own `CollectorRegistry` (never the process-global one), so
tests and several instances in one process do not collide.

    m = Metrics()                       # Metrics(per_user=True) adds `user` to the spend counter
    m.observe(record)                   # once per request, from the attribution record
    m.phase_latency("request_headers", 0.0004)
    m.redis_error("reserve")
    m.set_budget_utilisation("team-daily", 0.42)
    m.render()                          # bytes, Prometheus text exposition format
    srv = await m.serve("127.0.0.1", 9464)   # aiohttp on the running loop, GET /metrics
    await srv.stop()

Cardinality: no per-user label unless `per_user=True` (spend counter only); the budget gauge is
meant for shared budgets (keyed by budget name, not by identity). `observe` is on the hot path:
label children are cached in plain dicts keyed by the label tuple, so a repeated combination
costs a dict lookup and an add per series (a plain one for the per-request counters and
histograms, `FastCounter` and `FastHistogram`; a locked one for prometheus_client's others).
"""

from __future__ import annotations

import copy
import time
from bisect import bisect_left
from collections.abc import Iterator, Mapping
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily

NANO_PER_USD = 1_000_000_000

# Whole requests to an LLM: a few ms (refusals, cache hits) to minutes (long streams).
REQUEST_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
# One ext_proc phase: sub-millisecond header work up to ~100 ms (Redis round trips, JWKS, big bodies).
PHASE_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25)

TOKEN_KINDS = (("input", "input_tokens"), ("cached_input", "cached_input_tokens"),
               ("cache_write", "cache_write_tokens"),
               ("cache_write_long", "cache_write_long_tokens"), ("output", "output_tokens"))

UNKNOWN = "unknown"
NO_TEAM = "none"
_SHAPES_MAX = 4096  # distinct label sets `observe` keeps (`_c_shape`)


def _label(v: Any, default: str = UNKNOWN) -> str:
    if v is None or v == "":
        return default
    return v if isinstance(v, str) else str(v)


def _status_class(status: Any) -> str:
    """200 -> "2xx", 429 -> "4xx", ...; 0/None/garbage (no response at all) -> "none"."""
    try:
        s = int(status)
    except (TypeError, ValueError):
        return "none"
    if 100 <= s <= 599:
        return f"{s // 100}xx"
    return "none"


def _num(v: Any) -> float:
    if v is None or isinstance(v, bool):
        return 0
    try:
        return v if isinstance(v, (int, float)) else float(v)
    except (TypeError, ValueError):
        return 0


class Metrics:
    """All of Tollgate's ext_proc metrics, in a registry of their own."""

    def __init__(self, per_user: bool = False, created_series: bool = False) -> None:
        self.per_user = per_user
        self.registry = CollectorRegistry(auto_describe=True)
        # prometheus_client adds a `<name>_created` timestamp series per counter/histogram child;
        # the text format does not need it and it doubles the series count, so render() drops it
        # unless asked (without touching prometheus_client's process-global switch).
        self._exposed = self.registry if created_series else _WithoutCreated(self.registry)
        r = self.registry
        self._requests = FastCounter("tollgate_requests", "Requests by decision, API, provider and status class.",
                                     ("decision", "api", "provider", "status_class"), registry=r)
        spend_labels = ("team", "model", "provider") + (("user",) if per_user else ())
        self._spend = FastCounter("tollgate_spend_usd", "Settled spend in USD, by team, model (the price-table "
                                  "entry that priced it: a model name or a glob) and provider.",
                                  spend_labels, registry=r)
        self._tokens = FastCounter("tollgate_tokens", "Tokens by kind (input, cached_input, cache_write, output), "
                                   "model (price-table entry) and provider.", ("kind", "model", "provider"),
                                   registry=r)
        self._duration = FastHistogram("tollgate_request_duration_seconds", "Whole-request latency seen by the ext_proc.",
                                       (), REQUEST_BUCKETS, registry=r)
        self._incomplete = Counter("tollgate_incomplete_responses", "Responses cut short (usage not fully known).",
                                   ("provider",), registry=r)
        self._store_errors = Counter("tollgate_budget_store_errors",
                                     "Requests whose budget admission hit a budget store error.", registry=r)
        self._phase = FastHistogram("tollgate_extproc_phase_seconds", "Time spent handling one ext_proc phase.",
                                    ("phase",), PHASE_BUCKETS, registry=r)
        self._redis_errors = Counter("tollgate_redis_errors", "Redis errors by operation.", ("op",), registry=r)
        self._lifecycle = Counter("tollgate_request_lifecycle_events",
                                  "Requests that ended off the happy path: cancelled_in_admission, "
                                  "estimated_<estimate> (settled without the provider's usage), overrun "
                                  "(real cost above the reservation).", ("event",), registry=r)
        self._outbox = Gauge("tollgate_outbox_pending", "Settles waiting in the local outbox for Redis.", registry=r)
        self._utilisation = Gauge("tollgate_budget_utilisation_ratio",
                                  "Spent (plus reserved) over limit for shared budgets.", ("budget",), registry=r)
        self._policy = Gauge("tollgate_policy_info", "The policy being served: 1 for its sha256 (of the policy "
                             "files), one series at a time.", ("digest",), registry=r)
        self._policy_loaded = Gauge("tollgate_policy_loaded_timestamp_seconds",
                                    "When the policy being served was loaded (Unix time).", registry=r)
        self._reload_errors = Counter("tollgate_policy_reload_errors",
                                      "Policy reloads refused (invalid files): the running policy stayed.", registry=r)
        # alerts (extproc/alerts/): label values are alert names from the policy, event kinds, outcomes
        self._alert_events = Counter("tollgate_alert_events", "Alert events this process found, by alert, event "
                                     "and outcome: sent (it claimed the event in Redis) or duplicate (another "
                                     "process, or an earlier evaluation, had).", ("alert", "event", "outcome"),
                                     registry=r)
        self._alert_deliveries = Counter("tollgate_alert_deliveries", "Webhook deliveries by alert, event and outcome: "
                                         "delivered, failed (after its retries, or refused by the receiver) or "
                                         "dropped (too many in flight).", ("alert", "event", "outcome"), registry=r)
        self._alert_attempt_failures = Counter("tollgate_alert_delivery_attempt_failures", "Webhook attempts that got "
                                               "no 2xx (each retry counts).", ("alert",), registry=r)
        self._alert_dropped = Counter("tollgate_alert_records_dropped", "Attribution records the alert monitor could "
                                      "not take (its queue was full): events they showed may be missed.", registry=r)
        # cache: the response cache (extproc/cache/, docs/cache.md)
        self._cache_requests = Counter("tollgate_cache_requests", "Requests a cache rule applied to, by result: "
                                       "hit, miss, skip.", ("result",), registry=r)
        self._cache_avoided = Counter("tollgate_cache_avoided_usd", "What cache hits would have cost (the cached "
                                      "answers' original cost), in USD, by team, model (price-table entry) and "
                                      "provider.", ("team", "model", "provider"), registry=r)
        self._cache_writes = Counter("tollgate_cache_writes", "Cache writes after a miss, by outcome: stored, exists "
                                     "(an identical miss wrote first), too_large, not_cacheable (error, incomplete "
                                     "or cut), error (Redis).", ("outcome",), registry=r)
        self._c_cache: dict[tuple[str, ...], Any] = {}

        # label tuple -> child; plain dicts, filled lazily (a miss costs one .labels() call)
        self._c_incomplete: dict[str, Any] = {}
        self._c_shape: dict[tuple[Any, ...], tuple[Any, tuple[str, ...], str, str]] = {}  # see `_shape`
        self._c_redis: dict[str, Any] = {}
        self._c_util: dict[str, Any] = {}
        self._c_lifecycle: dict[str, Any] = {}

    # ---- hot path -------------------------------------------------------------------
    def observe(self, record: Mapping[str, Any]) -> None:
        """Account one attribution record (as built by `Processor._record`)."""
        get = record.get
        raw = (get("decision"), get("api"), get("provider"), get("status"), get("priced_as"), get("team"),
               get("user") if self.per_user else None)
        try:
            shape = self._c_shape.get(raw)
        except TypeError:  # a label value that is not hashable: worked out without the cache
            shape, raw = None, None
        if shape is None:
            shape = self._shape(record)
            if raw is not None:
                if len(self._c_shape) >= _SHAPES_MAX:
                    self._c_shape.clear()  # many distinct label sets: start over rather than grow
                self._c_shape[raw] = shape
        requests, skey, model, provider = shape
        requests[0] += 1

        cost = get("cost_nusd")
        cost = cost if type(cost) is int else _num(cost)
        if cost > 0:
            self._spend.child(skey)[0] += cost / NANO_PER_USD

        for kind, field in TOKEN_KINDS:
            n = get(field)
            if type(n) is not int:
                n = _num(n)
            if n > 0:
                self._tokens.child((kind, model, provider))[0] += n

        latency_ms = get("latency_ms")
        if latency_ms is not None:
            self._duration.observe((), _num(latency_ms) / 1000.0)

        if get("complete") is False:
            child = self._c_incomplete.get(provider)
            if child is None:
                child = self._c_incomplete[provider] = self._incomplete.labels(provider)
            child.inc()

        if get("budget_store_error"):
            self._store_errors.inc()

        cache = get("cache")  # cache: hit | miss | skip counted; off (no rule) is not
        if cache is not None and cache != "off":
            ckey: tuple[str, ...] = ("r", cache)
            child = self._c_cache.get(ckey)
            if child is None:
                child = self._c_cache[ckey] = self._cache_requests.labels(_label(cache))
            child.inc()
            avoided = _num(get("avoided_cost_nusd"))
            if cache == "hit" and avoided > 0:
                ckey = ("a", _label(get("team"), NO_TEAM), model, provider)
                child = self._c_cache.get(ckey)
                if child is None:
                    child = self._c_cache[ckey] = self._cache_avoided.labels(*ckey[1:])
                child.inc(avoided / NANO_PER_USD)

    def _shape(self, record: Mapping[str, Any]) -> tuple[Any, tuple[str, ...], str, str]:
        """What records of one decision, API, provider, status, price entry and team share: the
        requests counter's child, the spend labels, the model and provider labels. Kept per
        distinct set of those record values (`_c_shape`): label cleaning and the lookups were
        about half of `observe`."""
        get = record.get
        provider = _label(get("provider"))
        key = (_label(get("decision")), _label(get("api")), provider, _status_class(get("status")))
        child = self._requests.child(key)
        # The price-table entry, not the served name: a glob prices any name a client sends, and
        # each would be a new series (50 names: +150 series before this).
        model = _label(get("priced_as"))
        skey: tuple[str, ...] = (_label(get("team"), NO_TEAM), model, provider)
        if self.per_user:
            skey += (_label(get("user"), NO_TEAM),)
        return child, skey, model, provider

    def phase_latency(self, phase: str, seconds: float) -> None:
        self._phase.observe((phase or UNKNOWN,), seconds)

    def redis_error(self, op: str) -> None:
        child = self._c_redis.get(op)
        if child is None:
            child = self._c_redis[op] = self._redis_errors.labels(_label(op))
        child.inc()

    def lifecycle(self, event: str) -> None:
        child = self._c_lifecycle.get(event)
        if child is None:
            child = self._c_lifecycle[event] = self._lifecycle.labels(_label(event))
        child.inc()

    def cache_write(self, outcome: str) -> None:
        """cache: what became of a miss's answer (extproc/cache/flow.py)."""
        key = ("w", outcome)
        child = self._c_cache.get(key)
        if child is None:
            child = self._c_cache[key] = self._cache_writes.labels(_label(outcome))
        child.inc()

    def policy_loaded(self, digest: str, at: float) -> None:
        self._policy.clear()
        self._policy.labels(digest).set(1)
        self._policy_loaded.set(at)

    def policy_reload_failed(self) -> None:
        self._reload_errors.inc()

    def alert_event(self, alert: str, event: str, outcome: str) -> None:
        self._alert_events.labels(alert, event, outcome).inc()

    def alert_delivery(self, alert: str, event: str, outcome: str) -> None:
        self._alert_deliveries.labels(alert, event, outcome).inc()

    def alert_attempt_failed(self, alert: str) -> None:
        self._alert_attempt_failures.labels(alert).inc()

    def alert_records_dropped(self) -> None:
        self._alert_dropped.inc()

    def set_outbox_pending(self, n: int) -> None:
        self._outbox.set(n)

    def set_budget_utilisation(self, budget: str, ratio: float) -> None:
        """Shared budgets only (keyed by budget name, never by user)."""
        child = self._c_util.get(budget)
        if child is None:
            child = self._c_util[budget] = self._utilisation.labels(_label(budget))
        child.set(ratio)

    # ---- exposition -----------------------------------------------------------------
    def render(self) -> bytes:
        """The registry in Prometheus text exposition format."""
        return generate_latest(self._exposed)

    content_type = CONTENT_TYPE_LATEST  # for callers serving render() themselves

    async def serve(self, host: str = "127.0.0.1", port: int = 9464) -> "MetricsServer":
        """Start an aiohttp server for GET /metrics on the running event loop (uvloop is fine).

        Returns once listening; `port=0` picks a free port (see `MetricsServer.port`).
        Stop it with `await server.stop()`.
        """
        srv = MetricsServer(self, host, port)
        await srv.start()
        return srv


class FastCounter:
    """A counter added to on every request, without prometheus_client's locks.

    prometheus_client's `Counter.inc` is four Python calls and a lock; `observe` made four of
    them a request (requests, spend, two token kinds). Adds come only from the event loop's
    thread (as for `FastHistogram`), so a series is a plain list: `child(labels)[0] += n`. Exposed
    as a normal counter family (`_total`, and `_created` for `Metrics(created_series=True)`)."""

    def __init__(self, name: str, documentation: str, labelnames: tuple[str, ...],
                 registry: CollectorRegistry) -> None:
        self.name, self.documentation, self.labelnames = name, documentation, labelnames
        self._series: dict[tuple[str, ...], list[float]] = {}  # labels -> [value, created]
        registry.register(self)

    def child(self, labels: tuple[str, ...]) -> list[float]:
        series = self._series.get(labels)
        if series is None:
            series = self._series[labels] = [0, time.time()]
        return series

    def describe(self) -> list[CounterMetricFamily]:
        return [CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)]

    def collect(self) -> Iterator[CounterMetricFamily]:
        fam = CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for labels, (value, created) in list(self._series.items()):
            fam.add_metric(list(labels), value, created=created)
        yield fam


class FastHistogram:
    """A histogram observed several times per request, without prometheus_client's locks.

    prometheus_client's Histogram takes a lock per bucket add and per sum add and walks its
    buckets in Python: about 3% of the ext_proc's samples under load for the phase histogram
    (four observations a request). Observations here come only from the event loop's thread, so
    plain lists of ints suffice: a bisect and two adds. Exposed as a normal histogram family
    (`_bucket` cumulative with `le`, `_count`, `_sum`).
    """

    def __init__(self, name: str, documentation: str, labelnames: tuple[str, ...], buckets: tuple[float, ...],
                 registry: CollectorRegistry) -> None:
        self.name, self.documentation, self.labelnames = name, documentation, labelnames
        self._bounds = tuple(buckets)
        self._series: dict[tuple[str, ...], list[float]] = {}  # labels -> [n per bucket..., n above, sum]
        registry.register(self)

    def observe(self, labels: tuple[str, ...], value: float) -> None:
        series = self._series.get(labels)
        if series is None:
            series = self._series[labels] = [0] * (len(self._bounds) + 2)
        series[bisect_left(self._bounds, value)] += 1
        series[-1] += value

    def describe(self) -> list[HistogramMetricFamily]:
        return [HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)]

    def collect(self) -> Iterator[HistogramMetricFamily]:
        fam = HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for labels, series in list(self._series.items()):
            cumulative, buckets = 0, []
            for bound, n in zip((*self._bounds, float("inf")), series[:-1]):
                cumulative += int(n)
                buckets.append((_le(bound), cumulative))
            fam.add_metric(list(labels), buckets, series[-1])
        yield fam


def _le(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(float(bound))


class _WithoutCreated:
    """A collector view of a registry minus the `_created` samples."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry

    def collect(self) -> Iterator[Any]:
        for fam in self._registry.collect():
            if any(s.name.endswith("_created") for s in fam.samples):
                fam = copy.copy(fam)
                fam.samples = [s for s in fam.samples if not s.name.endswith("_created")]
            yield fam


class MetricsServer:
    """A started /metrics endpoint; `await stop()` closes it."""

    def __init__(self, metrics: Metrics, host: str, port: int) -> None:
        self.metrics = metrics
        self.host = host
        self.port = port
        self._runner: Any = None

    async def start(self) -> None:
        from aiohttp import web  # off the hot path; only processes that serve metrics import it

        async def handle(_request: web.Request) -> web.Response:
            return web.Response(body=self.metrics.render(), headers={"Content-Type": CONTENT_TYPE_LATEST})

        app = web.Application()
        app.router.add_get("/metrics", handle)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        site = web.TCPSite(runner, self.host, self.port)
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        if self.port == 0 and runner.addresses:
            self.port = runner.addresses[0][1]

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/metrics"

    async def stop(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()
