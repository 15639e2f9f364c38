"""Providers change without an Envoy restart (issue 11): Envoy's provider clusters and routes are
file-based xDS (extproc/envoy_config.py write_xds) that Envoy watches, through the real stack.

Two tests, from the least coupled up:

* The Envoy side alone: under load, `write_xds` moves the `fake` provider's cluster to a second
  fake provider on another port. The ext_proc is untouched (it keeps tagging requests for `fake`),
  so this proves that Envoy applies a rewrite by itself: traffic moves within a couple of
  seconds (milliseconds, measured), requests in flight (streams) finish on the old cluster, no
  request fails, and Envoy's PID does not change.
* The whole path: a new provider and a route to it in `providers.yaml`. Its xDS is written first
  (`write_xds`, as the ext_proc does on a reload before it routes by the new policy), then the
  policy file is replaced; the ext_proc's policy watch picks the file up and routes the model to
  the new provider, whose requests Envoy's access log shows on the new cluster. Needs the
  ext_proc's live reload (extproc/app.py); Envoy is never restarted.

This module runs its own stack: it rewrites the policy and the xDS files.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from extproc.config import Config, load_config
from extproc.envoy_config import cluster_name, write_xds
from extproc.procs import Proc, free_port
from extproc.stack import Stack
from tests.conftest import JsonLog, running_stack
from tests.test_e2e_lifecycle import Load

CHAT = "/v1/chat/completions"
HEADERS = {"authorization": "Bearer key-budget", "content-type": "application/json"}
WITHIN_S = 2.0  # Envoy applies a rewrite in milliseconds; a couple of seconds on a loaded machine
RELOAD_WITHIN_S = 8.0  # plus the ext_proc's policy watch (0.5 s) and its wait for Envoy (0.5 s)


@dataclasses.dataclass
class Xds:
    stack: Stack
    policies: Path
    fake_b: int  # a second fake provider, which no policy names


@pytest.fixture(scope="module")
def xs(policy_dir: Path, idp, tmp_path_factory) -> Iterator[Xds]:
    pol = tmp_path_factory.mktemp("xds-policies")
    for f in policy_dir.glob("*.yaml"):
        shutil.copy(f, pol / f.name)
    run = tmp_path_factory.mktemp("xds")
    with running_stack(pol, idp, run) as s:
        port = free_port()
        fake_b = Proc("fake-provider-b", [sys.executable, "-m", "extproc.fakeprovider", "--port", str(port)],
                      log_path=run / "fake-b.log", env=s.env(), ports=[port])
        try:
            fake_b.start()
            fake_b.wait_ready()
            yield Xds(s, pol, port)
        finally:
            fake_b.stop()


# ---- helpers ----------------------------------------------------------------------------------

def chat(model: str = "gpt-4o", stream: bool = False, max_tokens: int = 16) -> bytes:
    return json.dumps({"model": model, "max_tokens": max_tokens, "stream": stream,
                       "messages": [{"role": "user", "content": "hello"}]}).encode()


def envoy_pid(stack: Stack) -> int:
    envoy = next(p for p in stack.procs if p.name == "envoy")
    assert envoy.alive()
    return envoy.pid


def ledger(port: int) -> int:
    """Requests a fake provider has answered."""
    return len(httpx.get(f"http://127.0.0.1:{port}/_fake/ledger", timeout=5).json())


def envoy_clusters(stack: Stack) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{stack.ports.admin}/clusters", timeout=5) as r:
        return r.read().decode()


def until(check: Callable[[], bool], timeout: float, what: str) -> float:
    """Seconds until `check()` held; fails after `timeout`."""
    t0 = time.monotonic()
    while not check():
        assert time.monotonic() - t0 < timeout, f"{what}: not within {timeout} s"
        time.sleep(0.005)
    return time.monotonic() - t0


def with_provider_url(config: Config, name: str, url: str) -> Config:
    providers = {**config.providers, name: config.providers[name].model_copy(update={"url": url})}
    return dataclasses.replace(config, doc=config.doc.model_copy(update={"providers": providers}))


class Streams:
    """Slow streamed requests (30 tokens, 150 ms apart: about 4.5 s each) held open across a change."""

    def __init__(self, stack: Stack, n: int) -> None:
        self.results: list[tuple[int, bytes] | str] = []
        self.ended: list[float] = []  # time.monotonic() when each finished
        self.threads = [threading.Thread(target=self._one, args=(stack,), daemon=True) for _ in range(n)]
        for t in self.threads:
            t.start()

    def _one(self, stack: Stack) -> None:
        try:
            with httpx.stream("POST", stack.base_url + CHAT, content=chat(stream=True, max_tokens=64), timeout=30,
                              headers={**HEADERS, "x-fake-output-tokens": "30", "x-fake-token-latency-ms": "150"}) as r:
                self.results.append((r.status_code, b"".join(r.iter_bytes())))
        except httpx.HTTPError as e:
            self.results.append(f"{type(e).__name__}: {e}")
        self.ended.append(time.monotonic())

    def join(self, changed_at: float) -> None:
        """Each stream was still open at `changed_at`, and arrived whole."""
        for t in self.threads:
            t.join(30)
        assert min(self.ended) > changed_at, "a stream ended before the change: nothing was in flight"
        assert len(self.results) == len(self.threads)
        for res in self.results:
            assert not isinstance(res, str), res
            status, data = res
            assert status == 200, data[:300]
            assert data.rstrip().endswith(b"data: [DONE]"), data[-300:]  # the whole stream arrived


def assert_no_failure(load: Load) -> None:
    assert load.statuses, "the load sent nothing"
    assert not load.errors, f"connection errors under load: {load.errors[:5]}"
    assert load.tally() == {200: len(load.statuses)}, f"{load.tally()} {load.codes[:5]}"


# ---- the Envoy side alone ---------------------------------------------------------------------

def test_a_provider_moved_in_xds_takes_traffic_without_envoy_restart_or_a_failed_request(xs):
    stack, config = xs.stack, load_config(xs.policies)
    pid = envoy_pid(stack)
    moved = with_provider_url(config, "fake", f"http://127.0.0.1:{xs.fake_b}/v1")
    load = Load(stack, 4, lambda i: (chat(), HEADERS))
    load.start()
    try:
        until(lambda: len(load.statuses) >= 20, 20, "load under way")
        streams = Streams(stack, 3)  # in flight on the old cluster while it is replaced
        time.sleep(0.5)
        before_b = ledger(xs.fake_b)
        t0 = time.monotonic()
        assert write_xds(moved, stack.xds_dir) is True
        written = time.monotonic()
        seen = until(lambda: f"{cluster_name('fake')}::127.0.0.1:{xs.fake_b}::" in envoy_clusters(stack),
                     WITHIN_S, "Envoy's /clusters shows the new address")
        served = until(lambda: ledger(xs.fake_b) > before_b, WITHIN_S, "the second fake provider serves")
        print(f"\nxds move: built+written in {written - t0:.3f} s; Envoy shows it {seen * 1000:.1f} ms "
              f"after, serves there {served * 1000:.1f} ms after that")
        time.sleep(0.5)  # load on the new address
        streams.join(changed_at=written)
        # And back: the same bytes as at start, so the stack is as it was for the next test.
        before_a = ledger(stack.ports.fake)
        assert write_xds(config, stack.xds_dir) is True
        until(lambda: ledger(stack.ports.fake) > before_a, WITHIN_S, "back on the first fake provider")
        time.sleep(0.3)
    finally:
        load.stop()
    assert_no_failure(load)
    assert ledger(xs.fake_b) > before_b
    assert envoy_pid(stack) == pid


def test_a_provider_removed_from_xds_lets_its_streams_finish_and_refuses_new_requests(xs):
    """What a request still tagged for a removed provider gets: the catch-all 502 (the ext_proc
    stops tagging requests for a provider before its cluster is removed; see extproc/app.py)."""
    stack, config = xs.stack, load_config(xs.policies)
    pid = envoy_pid(stack)
    without = dataclasses.replace(config, doc=config.doc.model_copy(update={"providers": {
        k: v for k, v in config.providers.items() if k != "fake"}}))
    streams = Streams(stack, 2)
    time.sleep(0.5)
    try:
        assert write_xds(without, stack.xds_dir) is True
        written = time.monotonic()
        until(lambda: f"{cluster_name('fake')}::" not in envoy_clusters(stack), WITHIN_S, "the cluster goes")
        r = httpx.post(stack.base_url + CHAT, content=chat(), headers=HEADERS, timeout=20)
        assert r.status_code == 502 and "not_routed" in r.text, r.text
        streams.join(changed_at=written)
    finally:
        assert write_xds(config, stack.xds_dir) is True
    until(lambda: httpx.post(stack.base_url + CHAT, content=chat(), headers=HEADERS, timeout=20).status_code == 200,
          WITHIN_S, "the provider is back")
    assert envoy_pid(stack) == pid


# ---- the whole path: providers.yaml gains a provider and a route -------------------------------

def test_a_new_provider_and_route_in_providers_yaml_serve_without_envoy_restart_or_a_failed_request(xs, tmp_path):
    stack = xs.stack
    pid = envoy_pid(stack)
    access = JsonLog(stack.access_log)
    original = (xs.policies / "providers.yaml").read_text()
    doc = yaml.safe_load(original)
    # Another instance name for the same fake provider, and gpt-4o-mini routed to it (first match wins).
    doc["providers"]["fake2"] = dict(doc["providers"]["fake"])
    doc["routes"].insert(0, {"models": ["gpt-4o-mini"], "provider": "fake2"})
    assert cluster_name("fake2") not in envoy_clusters(stack)
    staged = tmp_path / "policies"
    shutil.copytree(xs.policies, staged)
    (staged / "providers.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    new_config = load_config(staged)
    assert "fake2" in new_config.providers

    probes: list[tuple[int, str]] = []  # (status, request id) of the gpt-4o-mini requests

    def probe(c: httpx.Client) -> str | None:
        r = c.post(CHAT, content=chat("gpt-4o-mini"), headers=HEADERS)
        probes.append((r.status_code, r.headers.get("x-tollgate-request-id", "")))
        return access.get(probes[-1][1])["upstream_cluster"] if r.status_code == 200 else None

    load = Load(stack, 4, lambda i: (chat(), HEADERS))  # gpt-4o, on the `fake` provider throughout
    load.start()
    try:
        with httpx.Client(base_url=stack.base_url, timeout=20) as c:
            until(lambda: len(load.statuses) >= 20, 20, "load under way")
            assert probe(c) == cluster_name("fake")
            # Envoy first (what the ext_proc's reload does before it routes by the new policy) ...
            t0 = time.monotonic()
            assert write_xds(new_config, stack.xds_dir) is True
            seen = until(lambda: f"{cluster_name('fake2')}::" in envoy_clusters(stack), WITHIN_S,
                         "Envoy's /clusters shows the new provider")
            # ... then the policy file, as a deploy replaces it; the ext_proc's watch reloads it.
            tmp = xs.policies / "providers.yaml.new"
            tmp.write_text(yaml.safe_dump(doc, sort_keys=False))
            os.replace(tmp, xs.policies / "providers.yaml")
            routed = until(lambda: probe(c) == cluster_name("fake2"), RELOAD_WITHIN_S,
                           "gpt-4o-mini served by the new provider")
            print(f"\nnew provider: Envoy has its cluster {seen * 1000:.1f} ms after write_xds returned "
                  f"({time.monotonic() - t0:.2f} s in all); the ext_proc routes there {routed:.2f} s after "
                  f"the policy file was replaced")
            for _ in range(5):
                assert probe(c) == cluster_name("fake2")
    finally:
        load.stop()
        restore = xs.policies / f"providers.yaml.{uuid.uuid4().hex}"
        restore.write_text(original)
        os.replace(restore, xs.policies / "providers.yaml")
    assert_no_failure(load)
    assert {s for s, _ in probes} == {200}, probes
    assert envoy_pid(stack) == pid
    # The load's requests never left the `fake` provider's cluster (the 502 of the removal test
    # has none).
    clusters = {r["upstream_cluster"] for r in access.records()
                if r.get("model_served") == "gpt-4o" and str(r.get("status")) == "200"}
    assert clusters == {cluster_name("fake")}
