"""A rolling restart of two ext_procs under load fails no request and loses no settle (issue 11).

Each ext_proc, on SIGTERM, reports NOT_SERVING and keeps serving until Envoy's health check has
taken it out of the cluster, then stops taking streams, finishes the ones it has (settling their
costs) and exits. Restarted one after the other, the other process carries the traffic meanwhile.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from extproc.procs import Proc
from extproc.stack import Stack
from tests.conftest import running_stack
from tests.test_e2e_lifecycle import Load, Run


@pytest.fixture(scope="module")
def two(policy_dir: Path, idp, tmp_path_factory) -> Iterator[Stack]:
    with running_stack(policy_dir, idp, tmp_path_factory.mktemp("rolling"), extproc_count=2) as s:
        yield s


def _extprocs(stack: Stack) -> list[Proc]:
    return [p for p in stack.procs if p.name.startswith("extproc")]


def test_a_rolling_restart_under_load_fails_no_request(two: Stack) -> None:
    run = Run(two)

    def make(i: int) -> tuple[bytes, dict[str, str]]:
        stream = i % 3 == 0
        body = {"model": "gpt-4o-mini", "max_tokens": 24, "stream": stream,
                "messages": [{"role": "user", "content": "roll " * (i % 20)}]}
        return json.dumps(body).encode(), run.headers(token_latency_ms=30)

    load = Load(two, 12, make, timeout=30)
    load.start()
    took = []
    try:
        time.sleep(1.0)
        for p in _extprocs(two):
            old_pid = p.pid
            t0 = time.monotonic()
            os.kill(old_pid, signal.SIGTERM)
            p.popen.wait(timeout=60)
            took.append(time.monotonic() - t0)
            assert p.popen.returncode == 0, f"{p.name} exited {p.popen.returncode}"
            two.restart(p)
            assert p.pid != old_pid
            time.sleep(2.0)  # Envoy's health check takes the new process in
        time.sleep(1.0)
    finally:
        load.stop()
    tally = load.tally()
    print(f"rolling restart: {len(load.statuses)} requests, {tally}, errors {load.errors[:3]}; "
          f"drain+exit took {', '.join(f'{t:.1f}' for t in took)} s")
    assert not load.errors and set(tally) == {200}, (tally, sorted(set(load.codes))[:5], load.errors[:5])
    books, ledger = run.check(wait=15, outbox=two.run_dir / "state")
    recs = books.of(run.counter)
    assert len(recs) == len(load.statuses) == len(ledger), (len(recs), len(load.statuses), len(ledger))
