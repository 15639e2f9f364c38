"""The alert monitor: a background task in each ext_proc that turns what requests did into events.

The request path gives it one thing: `offer(record, admission)`, called with each attribution
record as it is written (Gateway.record), a list append and nothing else. Everything else runs
here, once a second (TICK_SECONDS), off the request path:

1. The records taken since the last tick are read for the events they show themselves: a request
   blocked by a budget (its admission names the counter, with its numbers as the reserve script
   saw them) is the counter's `exhausted` event; a downgraded one, its `downgrade` event. The
   counters admitted requests counted against are marked to be read, and their settled cost is
   added to the hourly history of the counters a `spike` alert watches.
2. Those counters are read from Redis (the budget engine's own read), and checked for a `warn_at`
   threshold crossed by settled spend; at most every SLOW_CHECK_SECONDS per counter also for a
   forecast to exhaust before the period ends (extproc/forecast.py, from the usage rollups, as
   the dashboard and `tollgate budgets --forecast` compute it) and for a spend spike.
3. Each event is claimed in Redis for each alert that watches its counter (`SET NX`, expiring with
   the counter's period: alerts/store.py), and delivered by whoever claimed it (alerts/delivery.py).
   Several ext_procs evaluate the same counters; one sends.

The policy is read at every tick from the runtime being served, so a reload changes the alerts
with everything else. Without an `alerts:` section, `offer` returns at once and the tick reads
nothing.

What this misses, by design: a lease that expired into a charge (its gateway died) and a settle
replayed from the outbox move a counter without a record here; the counter is checked again at
its next request. A delivery's claim is taken before it is sent: a process killed during the
retries loses that delivery (its attempts are in the delivery log).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..budgets.store import CounterRef
from ..budgets.windows import window_for
from . import events as ev
from .delivery import Deliverer, Delivery, DeliveryLog
from .events import Counter, Event
from .policy import Alert, EventKind
from .store import AlertStore, claim_key, history_base

if TYPE_CHECKING:
    import redis.asyncio as aredis

    from ..budgets.admission import Admission
    from ..budgets.policy import Budget
    from ..config import Config
    from ..forecast import Forecast
    from ..metrics import Metrics
    from ..usage import RollupDay

log = logging.getLogger("tollgate.alerts")

TICK_SECONDS = 1.0
SLOW_CHECK_SECONDS = 30.0
"""Forecast and spike checks of one counter, at most this often per process (they read days of
rollups and hours of history; a counter's threshold is checked at every tick it was touched)."""
ROLLUPS_FRESH_SECONDS = 60.0
"""The usage rollups a forecast reads are read once for every counter checked within this."""
QUEUE_SIZE = 100_000
"""Records held between two ticks; past this `offer` drops them (tollgate_alert_records_dropped_total)."""
RETRY_SIZE = 10_000
"""Events whose claim Redis could not take, kept for the next ticks."""

Forecaster = Callable[..., "Forecast | None"]
"""extproc.forecast.forecast_counter's shape: (budget, per, *, spent_nusd, limit_nusd, now, rollups)."""


@dataclass(frozen=True)
class Rules:
    """The `alerts:` section of one loaded policy, indexed for the monitor."""

    alerts: tuple[Alert, ...]
    budgets: Mapping[str, "Budget"]
    windows: Mapping[str, str]  # budget name -> its window described
    _by: dict[tuple[str, str], tuple[Alert, ...]] = field(default_factory=dict)

    @classmethod
    def of(cls, config: "Config") -> "Rules":
        budgets = {b.name: b for b in config.doc.budgets}
        return cls(tuple(config.doc.alerts), budgets,
                   {n: window_for(b.window).describe() for n, b in budgets.items()})

    def wanting(self, budget: str, kind: EventKind) -> tuple[Alert, ...]:
        """Alerts that watch `budget` and want `kind` (before their `where`)."""
        key = (budget, kind)
        hit = self._by.get(key)
        if hit is None:
            hit = self._by[key] = tuple(a for a in self.alerts if kind in a.events and a.watches(budget))
        return hit

    def reads(self, budget: str) -> bool:
        """Does an alert want an event found by reading this budget's counters?"""
        return any(self.wanting(budget, k) for k in ("threshold", "forecast", "spike"))

    def for_counter(self, c: Counter, kind: EventKind) -> list[Alert]:
        return [a for a in self.wanting(c.budget, kind) if a.in_scope(dict(c.per))]


def _budget_of(key: str, prefix: str) -> str:
    return key[len(prefix) + 2:].split(":", 1)[0]


class AlertMonitor:
    """One per ext_proc process; `run()` is its loop, `offer()` the request path's only call."""

    def __init__(self, redis: "aredis.Redis", metrics: "Metrics", config: Callable[[], "Config"], *,
                 state_dir: Path | None, clock: Callable[[], float] = time.time, prefix: str = "tollgate:",
                 forecaster: Forecaster | None = None,
                 rollups: Callable[[float], Any] | None = None, deliverer: Deliverer | None = None) -> None:
        self.metrics = metrics
        self.config = config
        self.clock = clock
        self.prefix = prefix
        self.store = AlertStore(redis, prefix=prefix)
        self.redis = redis
        self.deliverer = deliverer or Deliverer(metrics, DeliveryLog.in_state_dir(state_dir), clock=clock)
        self._forecaster = forecaster
        self._read_rollups = rollups  # (now) -> awaitable list[RollupDay]; default: usage.recent_rollups
        self._rules: Rules | None = None
        self._rules_for: "Config | None" = None
        self._items: list[tuple[Mapping[str, Any], "Admission"]] = []
        self._dirty: dict[str, CounterRef] = {}
        self._spend: dict[tuple[str, int], int] = {}
        self._retry: list[tuple[Event, tuple[Alert, ...]]] = []
        self._claimed: dict[str, float] = {}  # claim key -> local expiry: each key is asked of Redis once
        self._slow_checked: dict[str, float] = {}  # counter key -> when forecast/spike last ran here
        self._rollups: tuple[float, list["RollupDay"]] | None = None

    # ---- the request path ---------------------------------------------------------------------

    def offer(self, record: Mapping[str, Any], admission: "Admission | None") -> None:
        """Take one attribution record and its admission for the next tick. A list append; never
        raises, never awaits."""
        if admission is None or (not admission.counters and admission.blocking is None):
            return
        if not self.config().doc.alerts:
            return
        if len(self._items) >= QUEUE_SIZE:
            self.metrics.alert_records_dropped()
            return
        self._items.append((record, admission))

    def rules(self) -> Rules:
        config = self.config()
        if config is not self._rules_for or self._rules is None:
            self._rules, self._rules_for = Rules.of(config), config
        return self._rules

    # ---- the loop -----------------------------------------------------------------------------

    async def run(self, interval: float = TICK_SECONDS) -> None:
        failing = False
        while True:
            await asyncio.sleep(interval)
            try:
                await self.tick()
                if failing:
                    log.warning("alert evaluation works again")
                failing = False
            except Exception as e:  # Redis down or slow: what could not be done is kept for the next tick
                # said once per outage, not every second
                (log.debug if failing else log.warning)(
                    "alert evaluation failed (retrying every %.0f s): %s: %s", interval, type(e).__name__, e)
                failing = True
                self.metrics.redis_error("alerts")

    async def tick(self) -> int:
        """One evaluation; returns how many deliveries it started."""
        rules = self.rules()
        items, self._items = self._items, []
        if not rules.alerts:
            self._dirty.clear()
            self._spend.clear()
            self._retry.clear()
            return 0
        now = self.clock()
        found = self._from_records(rules, items, now)
        if self._spend:
            spend, self._spend = self._spend, {}
            try:
                await self.store.add_spend(spend)
            except Exception:
                for k, v in spend.items():
                    self._spend[k] = self._spend.get(k, 0) + v
                self._keep(found)
                raise
        if self._dirty:
            dirty, self._dirty = self._dirty, {}
            try:
                found += await self._from_counters(rules, list(dirty.values()), now)
            except Exception:
                self._dirty.update(dirty)
                self._keep(found)
                raise
        sent = await self._send(found, now)
        self._prune(now)
        return sent

    # ---- 1. what the records show -------------------------------------------------------------

    def _from_records(self, rules: Rules, items: Sequence[tuple[Mapping[str, Any], "Admission"]],
                      now: float) -> list[tuple[Event, tuple[Alert, ...]]]:
        found: list[tuple[Event, tuple[Alert, ...]]] = []
        hour = int(now // 3600)
        for record, adm in items:
            st = adm.blocking
            if st is not None and adm.decision in ("blocked", "downgraded") and st.mode == "enforce":
                kind: EventKind = "exhausted" if adm.decision == "blocked" else "downgrade"
                if rules.wanting(st.name, kind):
                    c = Counter.from_status(st, self.prefix)
                    alerts = tuple(rules.for_counter(c, kind))
                    if alerts:
                        e = ev.exhausted(c, now, record) if kind == "exhausted" else ev.downgrade(c, now, record)
                        found.append((e, alerts))
            if not adm.admitted:
                continue
            cost = int(record.get("cost_nusd") or 0)
            for ref in adm.counters:
                if ref.unit != "usd":  # a rate limit's window (docs/ratelimits.md): no budget alerts
                    continue
                name = _budget_of(ref.key, self.prefix)
                if not rules.reads(name):
                    continue
                self._dirty[ref.key] = ref
                if cost > 0 and rules.wanting(name, "spike"):
                    k = (history_base(self.prefix, ref.key), hour)
                    self._spend[k] = self._spend.get(k, 0) + cost
        return found

    # ---- 2. what the counters show ------------------------------------------------------------

    async def _from_counters(self, rules: Rules, refs: list[CounterRef],
                             now: float) -> list[tuple[Event, tuple[Alert, ...]]]:
        found: list[tuple[Event, tuple[Alert, ...]]] = []
        read = await self.store.counters(refs)
        counters: list[Counter] = []
        for ref, (state, limit) in zip(refs, read):
            name = _budget_of(ref.key, self.prefix)
            if limit is None or name not in rules.budgets:
                continue
            counters.append(Counter.parse(ref.key, self.prefix, spent_nusd=state.spent, reserved_nusd=state.reserved,
                                          limit_nusd=limit, window=rules.windows[name], period_end=ref.period_end))
        for c in counters:
            alerts = rules.for_counter(c, "threshold")
            if alerts:
                for level in ev.thresholds_reached(c, rules.budgets[c.budget].warn_at):
                    found.append((ev.threshold(c, level, now), tuple(alerts)))
        slow = [c for c in counters if now - self._slow_checked.get(c.key, float("-inf")) >= SLOW_CHECK_SECONDS
                and (rules.for_counter(c, "forecast") or rules.for_counter(c, "spike"))]
        if slow:
            for c in slow:
                self._slow_checked[c.key] = now
            found += await self._forecasts(rules, [c for c in slow if rules.for_counter(c, "forecast")], now)
            found += await self._spikes(rules, [c for c in slow if rules.for_counter(c, "spike")], now)
        return found

    async def _forecasts(self, rules: Rules, counters: list[Counter],
                         now: float) -> list[tuple[Event, tuple[Alert, ...]]]:
        counters = [c for c in counters if not c.rolling and c.spent_nusd < c.limit_nusd]
        if not counters:
            return []
        from ..forecast import forecast_counter, sentence, window_unit

        forecaster = self._forecaster or forecast_counter
        rollups = await self._recent_rollups(now)
        out = []
        for c in counters:
            budget = rules.budgets[c.budget]
            fc = forecaster(budget, dict(c.per), spent_nusd=c.spent_nusd, limit_nusd=c.limit_nusd, now=now,
                            rollups=rollups)
            if fc is None:
                continue
            e = ev.forecast(c, fc, sentence(c.budget, dict(c.per), window_unit(budget), fc), now)
            if e is not None:
                out.append((e, tuple(rules.for_counter(c, "forecast"))))
        return out

    async def _recent_rollups(self, now: float) -> list["RollupDay"]:
        if self._rollups is not None and now - self._rollups[0] < ROLLUPS_FRESH_SECONDS:
            return self._rollups[1]
        if self._read_rollups is not None:
            days = await self._read_rollups(now)
        else:
            from ..usage import recent_rollups

            days = await recent_rollups(self.redis, datetime.fromtimestamp(now, timezone.utc).date(),
                                        prefix=self.prefix)
        self._rollups = (now, days)
        return days

    async def _spikes(self, rules: Rules, counters: list[Counter], now: float) -> list[tuple[Event, tuple[Alert, ...]]]:
        if not counters:
            return []
        hour = int(now // 3600)
        hours = max(a.spike.baseline_hours for c in counters for a in rules.for_counter(c, "spike"))
        bases = {c.key: history_base(self.prefix, c.key) for c in counters}
        history = await self.store.history(set(bases.values()), hour, hours)
        out = []
        for c in counters:
            hourly, since = history[bases[c.key]]
            for a in rules.for_counter(c, "spike"):
                e = ev.spike(c, a.spike, hourly, since_hour=since, now=now)
                if e is not None:
                    out.append((e, (a,)))
        return out

    # ---- 3. claim and deliver -----------------------------------------------------------------

    async def _send(self, found: list[tuple[Event, tuple[Alert, ...]]], now: float) -> int:
        """Claim each (event, alert) once in Redis; deliver the ones this process claimed. Of the
        thresholds of one counter claimed at once, only the highest is sent (the lower ones are
        marked sent: an alert that says 90% need not also say 50%)."""
        found = self._retry + found
        self._retry = []
        todo: list[tuple[Event, Alert, str]] = []
        seen: set[str] = set()
        for e, alerts in found:
            for a in alerts:
                key = claim_key(self.prefix, a.name, e.name, e.counter.key)
                if key in seen or self._claimed.get(key, 0.0) > now:
                    continue
                seen.add(key)
                todo.append((e, a, key))
        if not todo:
            return 0
        try:
            won = await self.store.claim([(key, e.counter.claim_ttl(now)) for e, _, key in todo], now)
        except Exception:
            self._keep(found)
            raise
        sent = 0
        best: dict[tuple[str, str], tuple[Event, Alert]] = {}
        for (e, a, key), mine in zip(todo, won):
            self._claimed[key] = now + e.counter.claim_ttl(now)
            if not mine:
                self.metrics.alert_event(a.name, e.kind, "duplicate")
                continue
            if e.kind != "threshold":
                sent += self._deliver(e, a)
                continue
            group = (a.name, e.counter.key)
            prev = best.get(group)
            if prev is None or e.detail["threshold"] > prev[0].detail["threshold"]:
                if prev is not None:
                    self.metrics.alert_event(a.name, "threshold", "superseded")
                best[group] = (e, a)
            else:
                self.metrics.alert_event(a.name, "threshold", "superseded")
        for e, a in best.values():
            sent += self._deliver(e, a)
        return sent

    def _deliver(self, e: Event, a: Alert) -> int:
        self.metrics.alert_event(a.name, e.kind, "sent")
        log.info("alert %s: %s", a.name, e.text)
        return int(self.deliverer.submit(Delivery(a, e.kind, ev.payload(a.name, e))))

    def _keep(self, found: list[tuple[Event, tuple[Alert, ...]]]) -> None:
        """Events found but not claimed (Redis failed): tried again next tick, the newest kept."""
        self._retry = (self._retry + found)[-RETRY_SIZE:]

    def _prune(self, now: float) -> None:
        """Forget local state that has expired (claims past their TTL, old slow-check times)."""
        if len(self._claimed) > QUEUE_SIZE:
            self._claimed = {k: t for k, t in self._claimed.items() if t > now}
        if len(self._slow_checked) > QUEUE_SIZE:
            self._slow_checked = {k: t for k, t in self._slow_checked.items() if now - t < SLOW_CHECK_SECONDS}

    async def close(self) -> None:
        await self.deliverer.close()
