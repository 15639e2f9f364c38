"""Alerts through the real stack (Redis, fake provider, two ext_procs, Envoy) to a real webhook
receiver on a free loopback port in this process.

This module's own stack: its policy names the receiver's URL, and one test edits the policy.
Every budget here counts per `run` (x-tollgate-metadata), so tests never share a counter.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import re
import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis
import redis.asyncio as aredis

from extproc.alerts.store import AlertStore
from extproc.config import load_config
from extproc.stack import Stack
from extproc.usage import usage_key, usage_tuple
from tests.alert_receiver import Receiver  # the `receiver` fixture: tests/conftest.py
from tests.conftest import running_stack

CHAT = "/v1/chat/completions"

POLICY = """\
budgets:
  - name: al-cap
    match: {{where: {{suite: al-cap}}}}
    per: [run]
    limit_usd: 0.001
    window: {{calendar: day}}
    warn_at: [0.5]
  - name: al-down
    match: {{models: [gpt-4o], where: {{suite: al-down}}}}
    per: [run]
    limit_usd: 0.0005
    window: {{calendar: day}}
    action: downgrade
    fallbacks: [gpt-4o-mini]
  - name: al-flaky
    match: {{where: {{suite: al-flaky}}}}
    per: [run]
    limit_usd: 1
    window: {{calendar: day}}
    warn_at: [0.000001]
  - name: al-hang
    match: {{where: {{suite: al-hang}}}}
    per: [run]
    limit_usd: 0.001
    window: {{calendar: day}}
    warn_at: [0.1, 0.5]
  - name: al-reload
    match: {{where: {{suite: al-reload}}}}
    per: [run]
    limit_usd: 1
    window: {{calendar: day}}
    warn_at: [0.000001]
  - name: al-spike
    match: {{where: {{suite: al-spike}}}}
    per: [run]
    limit_usd: 1
    window: {{calendar: day}}
  - name: al-forecast
    match: {{models: [gpt-4.1-mini], where: {{user: budget-bot}}}}
    per: [user]
    limit_usd: 1
    window: {{calendar: month}}
alerts:
  - name: ops
    url: {url}/ops
    budgets: [al-cap, al-down]
    events: [threshold, exhausted, downgrade]
  - name: flaky
    url: {url}/flaky
    budgets: [al-flaky]
    events: [threshold]
    backoff_seconds: 0.2
  - name: hang
    url: {url}/hang
    budgets: [al-hang]
    timeout_seconds: 1
    retries: 1
    backoff_seconds: 0.1
  - name: trend
    url: {url}/trend
    budgets: [al-spike, al-forecast]
    events: [spike, forecast]
    spike: {{factor: 5, baseline: 24h, min_usd: 0}}
"""


@pytest.fixture(scope="module")
def als(policy_dir: Path, idp, receiver: Receiver, tmp_path_factory) -> Iterator[Stack]:
    pol = tmp_path_factory.mktemp("alerts-policies")
    for f in policy_dir.glob("*.yaml"):
        shutil.copy(f, pol / f.name)
    (pol / "alerts-e2e.yaml").write_text(POLICY.format(url=receiver.url("").rstrip("/")))
    with running_stack(pol, idp, tmp_path_factory.mktemp("alerts"), extproc_count=2) as s:
        yield s


def post(stack: Stack, suite: str, run: str, model: str = "gpt-4o", timeout: float = 30.0) -> httpx.Response:
    return httpx.post(stack.base_url + CHAT, timeout=timeout, headers={
        "authorization": "Bearer key-budget", "content-type": "application/json",
        "x-tollgate-metadata": json.dumps({"suite": suite, "run": run})},
        content=json.dumps({"model": model, "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]}))


def metric(stack: Stack, i: int, name: str, **labels: str) -> float:
    """One sample of ext_proc i's /metrics (0 when absent)."""
    text = httpx.get(f"http://127.0.0.1:{stack.ports.metrics[i]}/metrics", timeout=5).text
    for line in text.splitlines():
        m = re.fullmatch(rf"{name}\{{(.*)\}} (\S+)", line)
        if m and dict(re.findall(r'(\w+)="([^"]*)"', m[1])) == labels:
            return float(m[2])
    return 0.0


def delivery_log(stack: Stack) -> list[dict]:
    p = stack.run_dir / "state" / "alerts-delivery.jsonl"
    return [json.loads(line) for line in p.read_text().splitlines()] if p.exists() else []


def until(check, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"not within {timeout} s"
        time.sleep(0.1)


def settle_time() -> None:
    """Long enough for both ext_procs' monitors to tick (1 s) and a delivery to land, several
    times over: what must not arrive has had its chance."""
    time.sleep(3.0)


def test_a_forecast_to_run_out(als: Stack, receiver: Receiver) -> None:
    # six days of $1,000 a day for budget-bot on gpt-4.1-mini in the usage rollups: at that rate
    # the $1 month is gone within minutes
    r = redis.Redis.from_url(als.redis_url)
    today = dt.datetime.now(dt.timezone.utc).date()
    tup = usage_tuple({"user": "budget-bot", "team": "budget-tests", "groups": [], "model_served": "gpt-4.1-mini",
                       "provider": "fake"})
    try:
        for k in range(1, 7):
            key = usage_key("tollgate:", today - dt.timedelta(days=k))
            r.hset(key, mapping={f"cost_nusd|{tup}": 1000 * 10**9, f"requests|{tup}": 1})
    finally:
        r.close()
    # First in this module, so no ext_proc has read (and cached for a minute) the rollups before
    # they were seeded; should one have, a request every few seconds gets it checked again.
    deadline = time.monotonic() + 100
    while not any(p["budget"] == "al-forecast" for p in receiver.got("/trend")):
        assert post(als, "forecast", uuid.uuid4().hex, model="gpt-4.1-mini").status_code == 200
        assert time.monotonic() < deadline, "no forecast alert"
        time.sleep(3)
    settle_time()
    [p] = [p for p in receiver.got("/trend") if p["budget"] == "al-forecast"]
    assert p["event"] == "forecast" and p["scope"] == {"user": "budget-bot"} and p["period"] == today.strftime("%Y-%m")
    assert dt.date.fromisoformat(p["exhausts_on"]) <= today + dt.timedelta(days=1)
    assert p["method"].startswith("weighted mean of the last 7 UTC days")
    assert p["text"].startswith("Budget al-forecast for user=budget-bot is forecast to run out: user budget-bot "
                                "exhausts its month on")


def test_threshold_and_exhausted_fire_once_across_two_ext_procs(als: Stack, receiver: Receiver) -> None:
    run = uuid.uuid4().hex
    statuses = []
    while 429 not in statuses:
        statuses.append(post(als, "al-cap", run).status_code)
        assert len(statuses) < 20, statuses
    assert set(statuses) == {200, 429}
    # more blocked requests until both ext_procs have found the exhaustion (sent or already claimed)
    def found(i: int) -> float:
        return sum(metric(als, i, "tollgate_alert_events_total", alert="ops", event="exhausted", outcome=o)
                   for o in ("sent", "duplicate"))
    deadline = time.monotonic() + 30
    while not (found(0) and found(1)):
        assert post(als, "al-cap", run).status_code == 429
        assert time.monotonic() < deadline, (found(0), found(1))
        time.sleep(0.2)
    settle_time()
    mine = [p for p in receiver.got("/ops") if p["scope"] == {"run": run}]
    # (the two may be found in one tick: in either order)
    assert sorted((p["event"], p.get("threshold") or 0) for p in mine) == [("exhausted", 0), ("threshold", 0.5)]
    t, x = sorted(mine, key=lambda p: p["event"] != "threshold")
    assert t["budget"] == "al-cap" and t["limit_usd"] == "0.001" and t["period"] == dt.datetime.now(
        dt.timezone.utc).date().isoformat()
    assert t["text"].startswith(f"Budget al-cap for run={run} has spent $0.000") and "past its 50% warning" in t["text"]
    assert x["text"].startswith(f"Budget al-cap for run={run} is exhausted: a request for gpt-4o was refused (429)")
    assert x["request"]["user"] == "budget-bot" and x["request"]["model_requested"] == "gpt-4o"
    logged = [e for e in delivery_log(als) if e["alert"] == "ops" and e["counter"] == f"run={run}"]
    assert sorted(e["event"] for e in logged) == ["exhausted", "threshold"]
    assert all(e["outcome"] == "delivered" and e["attempt"] == 1 for e in logged)


def test_downgrade_fires_once(als: Stack, receiver: Receiver) -> None:
    run = uuid.uuid4().hex
    served = []
    for _ in range(8):
        r = post(als, "al-down", run)
        assert r.status_code == 200
        served.append(r.headers["x-tollgate-decision"])
    assert served.count("downgraded") >= 3, served
    settle_time()
    [d] = [p for p in receiver.got("/ops") if p["scope"] == {"run": run}]
    assert d["event"] == "downgrade" and d["budget"] == "al-down"
    assert (d["model_requested"], d["model_served"]) == ("gpt-4o", "gpt-4o-mini")
    assert "requests are being downgraded to gpt-4o-mini" in d["text"]


def test_a_failing_receiver_is_retried(als: Stack, receiver: Receiver) -> None:
    receiver.fail("/flaky", 500)
    run = uuid.uuid4().hex
    before = receiver.attempts("/flaky")
    assert post(als, "al-flaky", run).status_code == 200
    receiver.wait_for(lambda: any(p["scope"] == {"run": run} for p in receiver.got("/flaky")))
    assert receiver.attempts("/flaky") - before == 2  # the 500, then the 200

    def flaky_log() -> list[dict]:
        return [e for e in delivery_log(als) if e["alert"] == "flaky" and e["counter"] == f"run={run}"]

    # The sender logs an attempt once its answer is back: the receiver can have the 200 first.
    receiver.wait_for(lambda: len(flaky_log()) >= 2)
    log = flaky_log()
    assert [(e["attempt"], e["outcome"], e["status"]) for e in log] == [(1, "retrying", 500), (2, "delivered", 200)]
    assert log[0]["retry_in_s"] == 0.2
    failures = sum(metric(als, i, "tollgate_alert_delivery_attempt_failures_total", alert="flaky") for i in (0, 1))
    assert failures >= 1


def test_a_hanging_receiver_never_holds_up_requests(als: Stack, receiver: Receiver) -> None:
    receiver.hang("/hang")
    run = uuid.uuid4().hex
    # every request is answered as the budget says, with the receiver holding every delivery
    statuses = [post(als, "al-hang", run, timeout=30).status_code for _ in range(8)]
    assert set(statuses) == {200, 429} and statuses[0] == 200, statuses
    assert post(als, "al-cap", uuid.uuid4().hex).status_code == 200  # other budgets' requests too
    # the deliveries did happen, and failed by their own timeout (1 s, one retry), not the requests'
    until(lambda: any(e["alert"] == "hang" and e["counter"] == f"run={run}" and e["outcome"] == "failed"
                      for e in delivery_log(als)))
    failed = [e for e in delivery_log(als) if e["alert"] == "hang" and e["outcome"] == "failed"]
    assert all(e["attempt"] == 2 and e["status"] is None and "Timeout" in e["error"] for e in failed), failed


def test_a_spike_over_the_usual_hourly_rate(als: Stack, receiver: Receiver) -> None:
    run = uuid.uuid4().hex
    hour = int(time.time() // 3600)
    counter = f"tollgate:b:al-spike:{dt.datetime.now(dt.timezone.utc).date()}:run={run}"

    async def seed() -> None:  # a quiet day before: 1 nano-dollar an hour
        r = aredis.Redis.from_url(als.redis_url)
        try:
            from extproc.alerts.store import history_base
            await AlertStore(r).add_spend({(history_base("tollgate:", counter), h): 1 for h in range(hour - 24, hour)})
        finally:
            await r.aclose()

    asyncio.run(seed())
    assert post(als, "al-spike", run).status_code == 200
    receiver.wait_for(lambda: any(p["scope"] == {"run": run} for p in receiver.got("/trend")))
    settle_time()
    [p] = [p for p in receiver.got("/trend") if p["scope"] == {"run": run}]
    assert p["event"] == "spike" and p["usual_hourly_nusd"] == 1 and p["hour_nusd"] > 5
    assert p["text"].startswith(f"Spend spike on budget al-spike for run={run}: $0.000")


def test_a_reload_changes_the_alerts(als: Stack, receiver: Receiver) -> None:
    f = als.policies / "alerts-reload.yaml"

    def write(path: str) -> None:
        tmp = f.with_suffix(".tmp")
        tmp.write_text(f"alerts:\n  - name: moving\n    url: {receiver.url(path)}\n    budgets: [al-reload]\n"
                       "    events: [threshold]\n")
        os.replace(tmp, f)
        digest = load_config(als.policies).digest
        until(lambda: all(metric(als, i, "tollgate_policy_info", digest=digest) == 1 for i in (0, 1)))

    try:
        write("/reload-a")
        run1, run2 = uuid.uuid4().hex, uuid.uuid4().hex
        assert post(als, "al-reload", run1).status_code == 200
        receiver.wait_for(lambda: len(receiver.got("/reload-a")) == 1)
        write("/reload-b")
        assert post(als, "al-reload", run2).status_code == 200
        receiver.wait_for(lambda: len(receiver.got("/reload-b")) == 1)
        settle_time()
        assert [p["scope"] for p in receiver.got("/reload-a")] == [{"run": run1}]
        assert [p["scope"] for p in receiver.got("/reload-b")] == [{"run": run2}]
    finally:
        f.unlink(missing_ok=True)
