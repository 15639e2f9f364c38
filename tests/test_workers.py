"""`tollgate serve --workers N` (extproc/workers.py): N ext_procs on consecutive ports under a parent
that restarts a dead one and forwards signals; and a Stack of two ext_procs behind one Envoy spreads
requests across both.

Every process a test starts is in its own session and stopped by PID in a `finally`.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from extproc.budgets.outbox import Outbox
from extproc.cli import main as cli_main
from extproc.procs import free_port, start_time
from extproc.workers import OutboxClaim, outbox_path, parse_workers, worker_ports
from tests.conftest import FAKE_GATEWAY_KEY, REPO, running_stack

DRAIN, GRACE = 1.0, 4.0  # short, so the stop test stays quick (the defaults are 2.5 s and 30 s)
CHAT = b'{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}]}'
HEADERS = {"authorization": "Bearer demo", "content-type": "application/json"}


def _until(cond: Callable[[], object], timeout: float, what: str, step: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s: {what}")
        time.sleep(step)


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def free_run(count: int) -> int:
    """The first of `count` consecutive loopback ports that are all free right now."""
    for _ in range(50):
        base = free_port()
        if base + count < 65536 and all(_bindable(base + i) for i in range(1, count)):
            return base
    raise OSError(f"no {count} consecutive free ports")


def serving(port: int, timeout: float = 1.0) -> bool:
    """The ext_proc's gRPC health service says SERVING."""
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            r = health_pb2_grpc.HealthStub(ch).Check(
                health_pb2.HealthCheckRequest(service="envoy.service.ext_proc.v3.ExternalProcessor"), timeout=timeout)
        return r.status == health_pb2.HealthCheckResponse.SERVING
    except grpc.RpcError:
        return False


# ---- the port layout and the outbox, in-process ------------------------------------------------------


def test_worker_ports_are_consecutive_and_never_overlap() -> None:
    assert [(w.port, w.admin, w.metrics) for w in worker_ports(1, 50051, None, 9464)] == [(50051, 50052, 9464)]
    assert [(w.port, w.admin, w.metrics) for w in worker_ports(3, 50051, None, 9464)] == [
        (50051, 50054, 9464), (50052, 50055, 9465), (50053, 50056, 9466)]  # admin after the ext_proc ports
    assert [w.admin for w in worker_ports(2, 6000, 7000, 0)] == [7000, 7001]
    assert [w.metrics for w in worker_ports(2, 6000, 0, 0)] == [0, 0]  # 0 stays off
    with pytest.raises(ValueError, match="overlap"):
        worker_ports(2, 50051, 50052, 9464)
    assert parse_workers("auto") == parse_workers("0") >= 1
    assert parse_workers("3") == 3


def test_envoy_config_with_workers_lists_every_worker(policy_dir: Path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("TOLLGATE_FAKE_KEY", FAKE_GATEWAY_KEY)
    monkeypatch.setenv("TEST_JWKS_PORT", "1")
    cli_main(["envoy-config", "--policies", str(policy_dir), "--workers", "3", "--extproc-port", "6000"])
    clusters = {c["name"]: c for c in yaml.safe_load(capsys.readouterr().out)["static_resources"]["clusters"]}

    def ports(name: str) -> list[int]:
        eps = clusters[name]["load_assignment"]["endpoints"][0]["lb_endpoints"]
        return [e["endpoint"]["address"]["socket_address"]["port_value"] for e in eps]

    assert ports("tollgate_extproc") == [6000, 6001, 6002]
    assert ports("tollgate_admin") == [6003, 6004, 6005]  # where `serve --workers 3 --port 6000` puts them


def test_an_outbox_nobody_holds_is_adopted_and_a_held_one_is_left_alone(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    calls = {"orphan": [["k1"], ["a", 1]], "legacy": [["k2"], ["b", 2]], "held": [["k3"], ["c", 3]]}
    for path, (keys, args) in ((outbox_path(state, 7001), calls["orphan"]), (state / "outbox.sqlite", calls["legacy"]),
                               (outbox_path(state, 7002), calls["held"])):
        box = Outbox(path)
        box.put(keys, args)
        box.close()
    held = OutboxClaim(state, 7002)  # a live worker on port 7002 (flock: per open file, so this counts)
    mine = OutboxClaim(state, 7000)
    try:
        assert mine.adopt_orphans() == 2
        got = Outbox(mine.path)
        assert sorted(e.keys[0] for e in got.peek()) == ["k1", "k2"]
        got.close()
        assert len(Outbox(outbox_path(state, 7001))) == 0 and len(Outbox(state / "outbox.sqlite")) == 0
        assert len(Outbox(outbox_path(state, 7002))) == 1  # its worker replays it
        assert mine.adopt_orphans() == 0  # nothing left to move
    finally:
        mine.close()
        held.close()
    again = OutboxClaim(state, 7003)  # 7002's worker gone: the next start takes its entries
    try:
        assert again.adopt_orphans() == 3  # 7000's two (released too) and 7002's one
    finally:
        again.close()


# ---- `python -m extproc.cli serve --workers 2` ------------------------------------------------------


@dataclass
class Parent:
    proc: subprocess.Popen
    log: Path
    ports: list[int]
    state: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def pids(self) -> dict[int, int]:
        """worker index -> its latest pid, from the parent's lines."""
        out: dict[int, int] = {}
        for m in re.finditer(r"worker[ -](\d+)\b.*?pid (\d+)", self.output()):
            out[int(m.group(1))] = int(m.group(2))
        return out


@contextmanager
def serve_workers(redis_url: str, policy_dir: Path, tmp_path: Path, n: int = 2) -> Iterator[Parent]:
    base = free_run(3 * n)
    ports, admin, metrics = base, base + n, base + 2 * n
    env = {**os.environ, "TOLLGATE_FAKE_PORT": str(free_port()), "TOLLGATE_FAKE_KEY": FAKE_GATEWAY_KEY,
           "TEST_JWKS_PORT": "1"}
    log = tmp_path / "serve.out"
    with open(log, "wb") as f:
        proc = subprocess.Popen(
            [sys.executable, "-m", "extproc.cli", "serve", "--workers", str(n), "--policies", str(policy_dir),
             "--port", str(ports), "--admin-port", str(admin), "--metrics-port", str(metrics),
             "--redis-url", redis_url, "--state-dir", str(tmp_path / "state"),
             "--drain-seconds", str(DRAIN), "--shutdown-grace-seconds", str(GRACE)],
            stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, cwd=REPO, start_new_session=True)
    parent = Parent(proc, log, [ports + i for i in range(n)], tmp_path / "state")
    try:
        _until(lambda: "workers serving" in parent.output() or proc.poll() is not None, 60, "workers up", step=0.1)
        assert proc.poll() is None, parent.output()
        yield parent
    finally:
        seen = {(pid, start_time(pid)) for pid in parent.pids().values()}
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        for pid, started in seen:  # the workers get SIGTERM from the kernel when the parent dies
            if started is not None and start_time(pid) == started:
                os.kill(pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def parent(redis_url: str, policy_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Parent]:
    with serve_workers(redis_url, policy_dir, tmp_path_factory.mktemp("workers")) as p:
        yield p


def test_serve_workers_2_both_answer_serving_on_consecutive_ports(parent: Parent) -> None:
    assert len(parent.pids()) == 2, parent.output()
    for port in parent.ports:
        assert serving(port), f"worker on {port} not SERVING:\n{parent.output()}"
    out = parent.output()
    for i, port in enumerate(parent.ports):
        assert f"worker {i} (pid {parent.pids()[i]}): ext_proc 127.0.0.1:{port}," in out
    # each has its own outbox file, claimed
    assert sorted(p.name for p in parent.state.glob("outbox-*.sqlite")) == sorted(
        f"outbox-{port}.sqlite" for port in parent.ports)


def test_sighup_is_forwarded_and_kills_no_worker(parent: Parent) -> None:
    before = parent.pids()
    os.kill(parent.proc.pid, signal.SIGHUP)
    time.sleep(0.5)
    assert parent.proc.poll() is None and parent.pids() == before
    assert all(start_time(pid) is not None for pid in before.values())
    assert all(serving(port) for port in parent.ports)


def test_a_sigkilled_worker_is_restarted_and_serves_again(parent: Parent) -> None:
    old = parent.pids()[1]
    os.kill(old, signal.SIGKILL)
    _until(lambda: parent.pids()[1] != old, 10, "worker 1 restarted (a new pid in the parent's output)")
    assert "worker-1 exited (signal SIGKILL); restarted it (restart 1, pid" in parent.output()
    _until(lambda: serving(parent.ports[1]), 30, "the restarted worker SERVING")
    assert serving(parent.ports[0]) and parent.proc.poll() is None


def test_sigterm_to_the_parent_stops_every_worker_within_drain_and_grace(parent: Parent) -> None:
    pids = {pid: start_time(pid) for pid in parent.pids().values()}
    assert all(pids.values())
    t0 = time.monotonic()
    os.kill(parent.proc.pid, signal.SIGTERM)
    rc = parent.proc.wait(timeout=DRAIN + GRACE + 10)
    took = time.monotonic() - t0
    assert rc == 0, parent.output()
    assert all(start_time(pid) != started for pid, started in pids.items()), "a worker outlived the parent"
    assert DRAIN - 0.2 <= took <= DRAIN + GRACE + 2, took  # they drained (in parallel), then exited
    assert "SIGTERM; stopping 2 workers" in parent.output()


def test_workers_of_a_sigkilled_parent_drain_and_exit(redis_url: str, policy_dir: Path, tmp_path: Path) -> None:
    with serve_workers(redis_url, policy_dir, tmp_path) as p:
        pids = {pid: start_time(pid) for pid in p.pids().values()}
        os.kill(p.proc.pid, signal.SIGKILL)  # no forwarding: the kernel's PR_SET_PDEATHSIG does it
        p.proc.wait(timeout=5)
        _until(lambda: all(start_time(pid) != s for pid, s in pids.items()), DRAIN + GRACE + 5,
               "the orphaned workers exited")
        assert p.output().count("stopping: NOT_SERVING") == 2  # each drained like on a SIGTERM


# ---- two ext_procs behind one Envoy ------------------------------------------------------------------


def _requests_seen(metrics_port: int) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as r:
        text = r.read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("tollgate_requests_total{"))


def test_envoy_spreads_requests_across_two_extprocs(policy_dir: Path, idp, tmp_path: Path) -> None:
    with running_stack(policy_dir, idp, tmp_path / "run", extproc_count=2) as stack:
        before = [_requests_seen(p) for p in stack.ports.metrics]
        with httpx.Client(timeout=10) as client:
            codes = [client.post(f"{stack.base_url}/v1/chat/completions", content=CHAT, headers=HEADERS).status_code
                     for _ in range(20)]
        assert codes == [200] * 20, codes
        deltas: list[float] = []

        def counted() -> bool:
            deltas[:] = [_requests_seen(p) - b for p, b in zip(stack.ports.metrics, before)]
            return sum(deltas) >= 20

        _until(counted, 5, "every request counted by an ext_proc")
        print(f"requests per ext_proc: {deltas}")
        assert all(d >= 4 for d in deltas), deltas  # round robin per stream: both get a share
        assert sorted(p.name for p in (stack.run_dir / "state").glob("outbox-*.sqlite")) == sorted(
            f"outbox-{port}.sqlite" for port in stack.ports.extproc)
