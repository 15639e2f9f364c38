"""The alert monitor in this process, on the session's real Redis, posting to a real local webhook
receiver; the budget engine makes real counters and admissions, on an injected clock.

Two monitors on one Redis stand for two ext_proc processes: each sees the requests it served,
and an event either shows is sent once.
"""

from __future__ import annotations

import datetime as dt
import json
import shutil
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
import redis.asyncio as aredis

from extproc.alerts.delivery import Deliverer, DeliveryLog
from extproc.alerts.monitor import SLOW_CHECK_SECONDS, AlertMonitor
from extproc.alerts.store import AlertStore, history_base
from extproc.budgets import Admission, BudgetEngine
from extproc.budgets.money import usd_to_nusd
from extproc.config import Config, load_config
from extproc.forecast import Forecast
from extproc.metrics import Metrics
from tests.alert_receiver import Receiver  # the `receiver` fixture: tests/conftest.py
from tests.conftest import REPO

T0 = dt.datetime(2026, 11, 28, 10, 0, 5, tzinfo=dt.timezone.utc).timestamp()

POLICY = """\
budgets:
  - name: mon-cap
    match: {{where: {{suite: mon}}}}
    per: [run]
    limit_usd: 1
    window: {{calendar: day}}
    warn_at: [0.5, 0.8]
  - name: mon-down
    match: {{models: [big], where: {{suite: mon}}}}
    per: [run]
    limit_usd: 0.5
    window: {{calendar: day}}
    action: downgrade
    fallbacks: [small]
  - name: mon-month
    match: {{where: {{suite: mon-month}}}}
    per: [run]
    limit_usd: 100
    window: {{calendar: month}}
alerts:
  - name: all
    url: {url}/all
    budgets: ["mon-*"]
    events: [threshold, exhausted, downgrade]
    backoff_seconds: 0.05
  - name: trend
    url: {url}/trend
    budgets: [mon-month]
    events: [forecast, spike]
    spike: {{factor: 4, baseline: 6h, min_usd: 0.01}}
  - name: run-b-only
    url: {url}/b
    where: {{run: "b-*"}}
    events: [exhausted]
"""


class Clock:
    def __init__(self, t: float = T0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


# `prefix` and `rds` (a fresh key prefix, a client on the session Redis): tests/conftest.py


def write_policies(d: Path, receiver: Receiver, path: str, text: str = POLICY) -> Config:
    for f in (REPO / "policies").glob("*.yaml"):
        shutil.copy(f, d / f.name)
    (d / "alerts-test.yaml").write_text(text.format(url=receiver.url(path).rstrip("/")))
    return load_config(d)


class World:
    """One policy, one engine, N monitors (processes) on one Redis, one clock."""

    def __init__(self, config: Config, rds: aredis.Redis, prefix: str, tmp: Path, n: int = 2, **kw) -> None:
        self.config = config
        self.clock = Clock()
        self.engine = BudgetEngine(list(config.doc.budgets), rds, clock=self.clock, prefix=prefix)
        self.metrics = [Metrics() for _ in range(n)]
        self.logs = [tmp / f"delivery-{i}.jsonl" for i in range(n)]
        self.monitors = [
            AlertMonitor(rds, m, lambda: self.config, state_dir=None, clock=self.clock, prefix=prefix,
                         deliverer=Deliverer(m, DeliveryLog(log), clock=self.clock), **kw)
            for m, log in zip(self.metrics, self.logs)]

    async def request(self, run: str, usd: float | str, *, model: str = "m", suite: str = "mon",
                      on: int = 0) -> Admission:
        """One request of `run` costing `usd` (worst case = real cost), served by monitor `on`."""
        rid = uuid.uuid4().hex
        cost = usd_to_nusd(usd)
        adm = await self.engine.admit(
            request_id=rid, attrs={"suite": suite, "run": run, "user": "u"}, model=model, provider="fake",
            input_tokens=1, max_output_tokens=1, cost_fn=lambda m, i, o: cost, provider_of=lambda m: "fake",
            lease_seconds=60)
        settled = 0
        if adm.admitted:
            await self.engine.settle(adm, cost)
            settled = cost
        record = {"request_id": rid, "decision": adm.decision, "cost_nusd": settled, "user": "u",
                  "model_requested": model, "model_served": adm.model}
        self.monitors[on].offer(record, adm)
        return adm

    async def tick(self) -> int:
        sent = 0
        for m in self.monitors:
            sent += await m.tick()
        for m in self.monitors:
            await m.deliverer.idle()
        return sent

    def log_lines(self) -> list[dict]:
        return [json.loads(line) for p in self.logs if p.exists() for line in p.read_text().splitlines()]

    def metric(self, i: int, name: str, **labels: str) -> float:
        v = self.metrics[i].registry.get_sample_value(name, labels)
        return v or 0.0


@pytest.fixture
async def world(tmp_path: Path, receiver: Receiver, rds: aredis.Redis, prefix: str) -> AsyncIterator[Callable[..., World]]:
    made: list[World] = []

    def make(path: str | None = None, **kw) -> World:
        path = path or uuid.uuid4().hex
        made.append(World(write_policies(tmp_path, receiver, path), rds, prefix, tmp_path, **kw))
        return made[-1]

    try:
        yield make
    finally:
        for w in made:
            for m in w.monitors:
                await m.close()


def events(receiver: Receiver, base: str) -> list[tuple[str, object]]:
    return [(p["event"], p.get("threshold")) for p in receiver.got(f"/{base}/all")]


async def test_thresholds_then_exhausted_each_once_across_two_processes(world, receiver):
    base = uuid.uuid4().hex
    w = world(base)
    run = "a-" + uuid.uuid4().hex
    await w.request(run, "0.3", on=0)
    assert await w.tick() == 0
    await w.request(run, "0.3", on=1)  # 60%: past 50%
    await w.request(run, "0.01", on=0)  # both processes now see the counter past 50%
    assert await w.tick() == 1
    assert events(receiver, base) == [("threshold", 0.5)]
    await w.request(run, "0.25", on=1)  # 86%
    await w.tick()
    blocked = [await w.request(run, "0.5", on=i % 2) for i in range(4)]  # blocked, in both processes
    assert {a.decision for a in blocked} == {"blocked"}
    await w.tick()
    await w.tick()
    assert events(receiver, base) == [("threshold", 0.5), ("threshold", 0.8), ("exhausted", None)]
    # both processes found the exhaustion; one sent it, the other found it claimed
    sent = [w.metric(i, "tollgate_alert_events_total", alert="all", event="exhausted", outcome="sent") for i in (0, 1)]
    dup = [w.metric(i, "tollgate_alert_events_total", alert="all", event="exhausted", outcome="duplicate")
           for i in (0, 1)]
    assert sorted(sent) == [0.0, 1.0] and sorted(dup) == [0.0, 1.0], (sent, dup)
    p = receiver.got(f"/{base}/all")[-1]
    assert p["budget"] == "mon-cap" and p["scope"] == {"run": run} and p["period"] == "2026-11-28"
    assert p["spent_usd"] == "0.86" and p["limit_usd"] == "1" and p["resets_at"] == "2026-11-29T00:00:00Z"
    assert p["text"].startswith(f"Budget mon-cap for run={run} is exhausted: a request for m was refused")
    # the alert scoped to runs b-* heard nothing of run a-...
    assert receiver.got(f"/{base}/b") == []
    lines = w.log_lines()
    assert [ln["outcome"] for ln in lines] == ["delivered"] * 3
    assert all(ln["url"] == f"http://127.0.0.1:{receiver.port}" for ln in lines)  # never the path


async def test_crossing_two_thresholds_at_once_sends_the_highest(world, receiver):
    base = uuid.uuid4().hex
    w = world(base)
    run = uuid.uuid4().hex
    await w.request(run, "0.9")
    await w.tick()
    assert events(receiver, base) == [("threshold", 0.8)]
    await w.request(run, "0.01")
    await w.tick()
    assert events(receiver, base) == [("threshold", 0.8)]  # 50% was marked sent with it


async def test_downgrade_is_sent_once_and_a_scoped_alert_hears_its_runs(world, receiver):
    base = uuid.uuid4().hex
    w = world(base)
    run = "b-" + uuid.uuid4().hex
    adm = [await w.request(run, "0.2", model="big", on=i % 2) for i in range(5)]
    assert [a.decision for a in adm] == ["allowed", "allowed", "downgraded", "downgraded", "downgraded"]
    await w.tick()
    await w.tick()
    got = [p for p in receiver.got(f"/{base}/all") if p["event"] == "downgrade"]
    assert len(got) == 1
    assert got[0]["model_requested"] == "big" and got[0]["model_served"] == "small"
    assert got[0]["budget"] == "mon-down" and "downgraded to small" in got[0]["text"]
    # mon-cap: $1 of which 0.2 x 5 = $1.0 spent, the last one at exactly the limit: it was allowed;
    # the next is blocked, and run-b-only (exhausted only, runs b-*) hears about it
    assert (await w.request(run, "0.01")).decision == "blocked"
    await w.tick()
    [b] = receiver.got(f"/{base}/b")
    assert b["event"] == "exhausted" and b["budget"] == "mon-cap" and b["alert"] == "run-b-only"


async def test_a_failing_receiver_is_retried_with_backoff(world, receiver):
    base = uuid.uuid4().hex
    receiver.fail(f"/{base}/all", 500, 503)
    w = world(base, n=1)
    run = uuid.uuid4().hex
    await w.request(run, "0.6")
    await w.tick()
    assert events(receiver, base) == [("threshold", 0.5)]
    assert receiver.attempts(f"/{base}/all") == 3
    lines = w.log_lines()
    assert [(ln["attempt"], ln["outcome"], ln["status"]) for ln in lines] == [
        (1, "retrying", 500), (2, "retrying", 503), (3, "delivered", 200)]
    assert [ln["retry_in_s"] for ln in lines[:2]] == [0.05, 0.1]  # doubling
    assert w.metric(0, "tollgate_alert_delivery_attempt_failures_total", alert="all") == 2
    assert w.metric(0, "tollgate_alert_deliveries_total", alert="all", event="threshold", outcome="delivered") == 1


async def test_a_client_error_is_not_retried_and_is_counted_as_failed(world, receiver):
    base = uuid.uuid4().hex
    receiver.fail(f"/{base}/all", 404)
    w = world(base, n=1)
    await w.request(uuid.uuid4().hex, "0.6")
    await w.tick()
    assert receiver.attempts(f"/{base}/all") == 1
    [line] = w.log_lines()
    assert (line["outcome"], line["status"]) == ("failed", 404)
    assert w.metric(0, "tollgate_alert_deliveries_total", alert="all", event="threshold", outcome="failed") == 1


async def test_an_unreachable_receiver_fails_after_its_retries(tmp_path, rds, prefix, receiver):
    text = POLICY.replace("backoff_seconds: 0.05", "backoff_seconds: 0.01\n    retries: 2")
    config = write_policies(tmp_path, receiver, "x", text.replace("{url}/all", "http://127.0.0.1:9/all"))
    w = World(config, rds, prefix, tmp_path, n=1)
    await w.request(uuid.uuid4().hex, "0.6")
    await w.tick()
    await w.monitors[0].close()
    lines = w.log_lines()
    assert [ln["outcome"] for ln in lines] == ["retrying", "retrying", "failed"]
    assert lines[-1]["status"] is None and lines[-1]["error"]


async def test_a_forecast_to_run_out_is_sent_once(world, receiver):
    base = uuid.uuid4().hex
    calls = []

    def forecaster(budget, per, *, spent_nusd, limit_nusd, now, rollups):
        calls.append((budget.name, dict(per), spent_nusd, limit_nusd, now, rollups))
        return Forecast(rate_nusd_per_day=usd_to_nusd(10), projected_nusd=usd_to_nusd(120), low_nusd=usd_to_nusd(100),
                        high_nusd=usd_to_nusd(140), exhausts_on=dt.date(2026, 11, 29), method="stub",
                        spent_nusd=spent_nusd, limit_nusd=limit_nusd)

    async def rollups(now):
        return ["the rollups"]

    w = world(base, n=1, forecaster=forecaster, rollups=rollups)
    run = uuid.uuid4().hex
    await w.request(run, "5", suite="mon-month")
    await w.tick()
    got = receiver.got(f"/{base}/trend")
    assert [p["event"] for p in got] == ["forecast"]
    assert got[0]["exhausts_on"] == "2026-11-29" and got[0]["projected_usd"] == "120" and got[0]["method"] == "stub"
    assert got[0]["period"] == "2026-11" and got[0]["text"].startswith(
        f"Budget mon-month for run={run} is forecast to run out: run {run} exhausts its month on Nov 29 (about $10.00")
    assert calls == [("mon-month", {"run": run}, usd_to_nusd(5), usd_to_nusd(100), T0, ["the rollups"])]
    # checked again only after SLOW_CHECK_SECONDS, and then not sent again
    await w.request(run, "1", suite="mon-month")
    await w.tick()
    assert len(calls) == 1
    w.clock.t += SLOW_CHECK_SECONDS
    await w.request(run, "1", suite="mon-month")
    await w.tick()
    assert len(calls) == 2 and len(receiver.got(f"/{base}/trend")) == 1


async def test_a_spike_over_the_usual_hourly_spend(world, receiver, rds, prefix):
    base = uuid.uuid4().hex
    w = world(base, n=2)
    run = uuid.uuid4().hex
    hour = int(T0 // 3600)
    counter = f"{prefix}b:mon-month:2026-11:run={run}"
    # six quiet hours of history: $0.01 an hour
    await AlertStore(rds, prefix=prefix).add_spend(
        {(history_base(prefix, counter), h): usd_to_nusd("0.01") for h in range(hour - 6, hour)})
    await w.request(run, "0.03", suite="mon-month")  # 3x: not a spike (factor 4)
    await w.tick()
    assert receiver.got(f"/{base}/trend") == []
    w.clock.t += SLOW_CHECK_SECONDS
    await w.request(run, "0.02", suite="mon-month", on=1)  # $0.05 this hour: 5x
    await w.tick()
    [p] = receiver.got(f"/{base}/trend")
    assert p["event"] == "spike" and p["hour_usd"] == "0.05" and p["usual_hourly_usd"] == "0.01"
    assert p["factor"] == "4" and p["baseline"] == "6h" and "5.0x its usual $0.01 an hour" in p["text"]
    # the history the monitors wrote holds this hour's spend, from both processes
    hist = await AlertStore(rds, prefix=prefix).history([history_base(prefix, counter)], hour, 6)
    assert hist[history_base(prefix, counter)][0][hour] == usd_to_nusd("0.05")


async def test_a_reload_changes_where_alerts_go(world, receiver, tmp_path):
    base = uuid.uuid4().hex
    w = world(base, n=1)
    run = uuid.uuid4().hex
    await w.request(run, "0.6")
    await w.tick()
    assert events(receiver, base) == [("threshold", 0.5)]
    new_base = uuid.uuid4().hex
    w.config = write_policies(tmp_path, receiver, new_base)  # what Gateway.reload swaps in
    await w.request(run, "0.3")
    await w.tick()
    assert events(receiver, base) == [("threshold", 0.5)] and events(receiver, new_base) == [("threshold", 0.8)]
    # and without an alerts section, nothing is even taken
    text = POLICY.split("alerts:")[0]
    w.config = write_policies(tmp_path, receiver, new_base, text)
    await w.request(run, "0.05")
    assert w.monitors[0]._items == [] and await w.tick() == 0


async def test_events_found_while_redis_is_down_are_sent_when_it_answers(world, receiver, rds, prefix):
    from extproc.procs import free_port

    base = uuid.uuid4().hex
    w = world(base, n=1)
    m = w.monitors[0]
    live = m.store
    dead = aredis.Redis(host="127.0.0.1", port=free_port(), socket_connect_timeout=0.5, socket_timeout=0.5)
    try:
        m.store = AlertStore(dead, prefix=prefix)
        run = uuid.uuid4().hex
        await w.request(run, "0.6")  # counted by the engine (its Redis is up)
        assert (await w.request(run, "0.5")).decision == "blocked"
        with pytest.raises(Exception):
            await m.tick()
        assert receiver.got(f"/{base}/all") == []
        m.store = live
        await w.tick()
        assert sorted(events(receiver, base), key=str) == [("exhausted", None), ("threshold", 0.5)]
    finally:
        await dead.aclose()
