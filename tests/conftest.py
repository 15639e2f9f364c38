"""Shared fixtures. Every process a fixture starts is stopped by PID, even when a test fails."""

from __future__ import annotations

import json
import re
import shutil
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import redis.asyncio as aredis

from extproc.procs import free_port, redis_proc, wait_for_port
from extproc.stack import Stack, StackPorts
from tests.e2e_idp import TestIdP

REPO = Path(__file__).resolve().parent.parent
# The key the gateway holds for the fake provider in tests (policies: key: {env: TOLLGATE_FAKE_KEY}).
FAKE_GATEWAY_KEY = "sk-gateway-held-test-key"


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real redis-server on a free loopback port for the whole session."""
    port = free_port()
    proc = redis_proc(port, tmp_path_factory.mktemp("redis")).start()
    try:
        wait_for_port(port, proc=proc)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def receiver():  # type: ignore[no-untyped-def]
    """A webhook receiver on a free loopback port for one test module (tests/alert_receiver.py)."""
    from tests.alert_receiver import Receiver

    r = Receiver().start()
    try:
        yield r
    finally:
        r.stop()


@pytest.fixture
def pdir(tmp_path: Path) -> Path:
    """A copy of the shipped policies/ to edit."""
    for f in (REPO / "policies").glob("*.yaml"):
        shutil.copy(f, tmp_path / f.name)
    return tmp_path


@pytest.fixture
def prefix() -> str:
    """A fresh key prefix per test, so tests never see each other's counters."""
    return f"t{uuid.uuid4().hex[:12]}:"


@pytest.fixture
async def rds(redis_url: str) -> AsyncIterator[aredis.Redis]:
    client = aredis.Redis.from_url(redis_url, socket_timeout=2, socket_connect_timeout=2)
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture(scope="session")
def policy_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shipped policies/, with same-named files from tests/policies/ laid over them."""
    out = tmp_path_factory.mktemp("policies")
    for src in (REPO / "policies", REPO / "tests" / "policies"):
        for f in sorted(src.glob("*.yaml")):
            shutil.copy(f, out / f.name)
    return out


@pytest.fixture(scope="session")
def idp() -> Iterator[TestIdP]:
    """A JWKS-serving identity provider with real keys (the test policies trust it)."""
    server = TestIdP().start()
    try:
        yield server
    finally:
        server.stop()


@contextmanager
def running_stack(policy_dir: Path, idp: TestIdP, run_dir: Path, extproc_count: int = 1) -> Iterator[Stack]:
    """A real stack (Redis, fake provider, ext_proc(s), Envoy) on free ports, stopped by PID after."""
    s = Stack(policy_dir, run_dir, StackPorts.free(extproc_count),
              extra_env={"TOLLGATE_FAKE_KEY": FAKE_GATEWAY_KEY, "TEST_JWKS_PORT": str(idp.port)})
    try:
        s.start()
        yield s
    finally:
        s.stop()


@pytest.fixture(scope="session")
def stack(policy_dir: Path, idp: TestIdP, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """The stack shared by the end-to-end tests."""
    with running_stack(policy_dir, idp, tmp_path_factory.mktemp("stack")) as s:
        yield s


def envoy_extproc_stats(stack: Stack) -> dict[str, int]:
    """Envoy's counters and gauges for the ext_proc cluster and filter (admin /stats)."""
    text = httpx.get(f"http://127.0.0.1:{stack.ports.admin}/stats", timeout=5).text
    out = {}
    for line in text.splitlines():
        name, _, value = line.partition(": ")
        if re.search(r"^cluster\.tollgate_extproc\.|^http\.tollgate\.ext_proc\.", name) and value.strip().isdigit():
            out[name] = int(value)
    return out


class JsonLog:
    """A JSON-lines log read by request id: the ext_proc's attribution records, Envoy's access log."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def records(self) -> list[dict]:
        out = []
        if not self.path.exists():
            return out
        # The last piece is "" or a line still being written (a sink's buffer flushed part of it
        # at its turn's end): only lines ended by a newline are whole.
        for line in self.path.read_text().split("\n")[:-1]:
            if line.startswith("{"):
                out.append(json.loads(line))
        return out

    def get(self, request_id: str, timeout: float = 5.0) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            for r in self.records():
                if r.get("request_id") == request_id:
                    return r
            if time.monotonic() > deadline:
                raise AssertionError(f"no record for {request_id} in {self.path}")
            time.sleep(0.05)


@pytest.fixture(scope="session")
def attribution(stack: Stack) -> JsonLog:
    return JsonLog(stack.attribution_log)
