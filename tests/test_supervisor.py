"""`tollgate run` keeps its ext_proc up and always stops its children.

Unit tests drive the Supervisor with cheap child processes and a fake clock; the integration
tests SIGKILL a real stack's ext_proc, and signal a real `python -m extproc.cli run`. Every
process a test starts is stopped by PID in a `finally`, even when the test fails.
"""

from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from extproc.procs import PidFile, Proc, free_port, start_time
from extproc.supervisor import Backoff, Death, StopSignals, Supervisor, supervise
from tests.conftest import FAKE_GATEWAY_KEY, REPO, running_stack

CHAT = b'{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}]}'
HEADERS = {"authorization": "Bearer demo", "content-type": "application/json"}


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _until(cond: Callable[[], object], timeout: float, what: str, step: float = 0.02) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s: {what}")
        time.sleep(step)


def _dead(proc: Proc) -> None:
    """Wait (real time) until the child has exited, so the next poll sees it."""
    proc.popen.wait(timeout=10)


@contextmanager
def _procs(*procs: Proc) -> Iterator[list[Proc]]:
    started: list[Proc] = []
    try:
        for p in procs:
            started.append(p.start())
        yield started
    finally:
        for p in started:
            p.stop()


def _sleeper(name: str = "extproc-0", tmp: Path | None = None) -> Proc:
    return Proc(name, ["sleep", "60"], log_path=tmp / f"{name}.log" if tmp else None)


# --- backoff ----------------------------------------------------------------------------------


def test_backoff_doubles_to_the_cap_and_resets_after_a_long_run() -> None:
    b = Backoff(initial=0.2, maximum=5.0, reset_after=30.0)
    delays, d = [], 0.0
    for _ in range(8):
        d = b.next(d, uptime=1.0)
        delays.append(d)
    assert delays == [0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0, 5.0]
    assert b.next(5.0, uptime=29.9) == 5.0
    assert b.next(5.0, uptime=30.0) == 0.2


# --- the Supervisor with fake processes --------------------------------------------------------


def test_sigkilled_process_is_restarted_after_the_backoff(tmp_path: Path) -> None:
    clock, out = FakeClock(), io.StringIO()
    with _procs(_sleeper(tmp=tmp_path), _sleeper("redis")) as (ext, redis):
        sup = Supervisor([ext, redis], clock=clock, out=out)
        assert sup.poll() is None and sup.restarts("extproc-0") == 0
        old = ext.pid
        os.kill(old, signal.SIGKILL)
        _dead(ext)
        assert sup.poll() is None  # noticed, restart scheduled 0.2 s later
        assert sup.restarts("extproc-0") == 0 and not ext.alive()
        due = sup.watched["extproc-0"].due
        assert due == pytest.approx(clock.now + 0.2)
        clock.now = due - 0.01
        assert sup.poll() is None and sup.restarts("extproc-0") == 0
        clock.now = due
        assert sup.poll() is None
        assert sup.restarts("extproc-0") == 1
        assert ext.alive() and ext.pid != old
        assert ext.argv == ["sleep", "60"] and ext.log_path == tmp_path / "extproc-0.log"
        assert out.getvalue() == (f"tollgate: extproc-0 exited (signal SIGKILL); restarted it "
                                  f"(restart 1, pid {ext.pid})\n")
        assert redis.alive() and sup.restarts("redis") == 0


def test_quick_crashes_back_off_exponentially_and_a_long_run_resets_it(tmp_path: Path) -> None:
    clock, out = FakeClock(), io.StringIO()
    crasher = Proc("extproc-0", [sys.executable, "-c", "import sys; sys.exit(3)"])
    with _procs(crasher) as (p,):
        sup = Supervisor([p], clock=clock, out=out)
        delays = []
        for n in range(1, 8):
            _dead(p)
            assert sup.poll() is None  # schedules the restart
            w = sup.watched["extproc-0"]
            delays.append(w.delay)
            assert w.due == pytest.approx(clock.now + w.delay)
            due = w.due
            clock.now = due - 0.001
            assert sup.poll() is None and sup.restarts("extproc-0") == n - 1, "restarted before its backoff"
            clock.now = due
            sup.poll()
            assert sup.restarts("extproc-0") == n
        assert delays == [0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0]
        assert "extproc-0 exited (code 3); restarted it (restart 7, pid" in out.getvalue()
        clock.now += 31  # this run lasted long enough: the next restart is quick again
        _dead(p)
        sup.poll()
        assert sup.watched["extproc-0"].delay == 0.2


def test_a_process_that_is_not_restarted_stops_the_stack(tmp_path: Path) -> None:
    clock = FakeClock()
    with _procs(_sleeper(), Proc("envoy", ["sleep", "60"], log_path=tmp_path / "envoy.log")) as (ext, envoy):
        sup = Supervisor([ext, envoy], clock=clock, out=io.StringIO())
        os.kill(envoy.pid, signal.SIGKILL)
        _dead(envoy)
        death = sup.poll()
        assert death == Death("envoy", "signal SIGKILL", tmp_path / "envoy.log")
        assert str(death) == f"envoy exited (signal SIGKILL) (see {tmp_path / 'envoy.log'})"
        assert not envoy.alive() and sup.restarts("envoy") == 0


def _listen_later(port: int, delay: float) -> list[str]:
    return [sys.executable, "-c",
            f"import socket, time; time.sleep({delay}); s = socket.socket(); "
            f"s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(('127.0.0.1', {port})); "
            f"s.listen(); time.sleep(60)"]


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def test_restart_is_reported_only_once_the_port_listens(tmp_path: Path) -> None:
    port, out = free_port(), io.StringIO()
    slow = Proc("extproc-0", _listen_later(port, 0.5), ports=[port], log_path=tmp_path / "x.log")
    with _procs(slow) as (p,):
        _until(lambda: _accepts(port), 10, "first start listens")
        sup = Supervisor([p], backoff=Backoff(initial=0.0), out=out)
        os.kill(p.pid, signal.SIGKILL)
        _dead(p)
        started = time.monotonic()
        assert sup.poll() is None
        assert sup.restarts("extproc-0") == 1
        assert time.monotonic() - started >= 0.4, "returned before the restarted process could listen"
        assert _accepts(port)
        assert out.getvalue().endswith(f"restarted it (restart 1, pid {p.pid})\n")


def test_a_restart_that_fails_is_said_and_retried_with_a_longer_backoff(tmp_path: Path) -> None:
    port, clock, out = free_port(), FakeClock(), io.StringIO()
    p = Proc("extproc-0", [sys.executable, "-c", "import sys; sys.exit(4)"], ports=[port])
    with _procs(p):
        sup = Supervisor([p], clock=clock, out=out)
        _dead(p)
        sup.poll()
        clock.now = sup.watched["extproc-0"].due
        sup.poll()  # starts it again, waits for the port, sees it exit
        assert sup.restarts("extproc-0") == 1
        assert "extproc-0 exited (code 4); restart 1 failed: extproc-0 exited with 4" in out.getvalue()
        assert "restarted it" not in out.getvalue()
        sup.poll()
        assert sup.watched["extproc-0"].delay == 0.4


def test_supervise_restarts_extprocs_through_the_stack_and_nothing_else() -> None:
    class FakeStack:
        def __init__(self, procs: list[Proc]) -> None:
            self.procs = procs
            self.restarted: list[str] = []

        def restart(self, proc: Proc) -> None:
            self.restarted.append(proc.name)
            proc.restart()

    with _procs(_sleeper("fake-provider"), _sleeper("extproc-0"), _sleeper("extproc-1")) as procs:
        stack = FakeStack(procs)
        sup = supervise(stack, backoff=Backoff(initial=0.0), out=io.StringIO())  # type: ignore[arg-type]
        os.kill(procs[2].pid, signal.SIGKILL)
        _dead(procs[2])
        assert sup.poll() is None and stack.restarted == ["extproc-1"] and procs[2].alive()
        os.kill(procs[0].pid, signal.SIGKILL)
        _dead(procs[0])
        death = sup.poll()
        assert death is not None and death.name == "fake-provider" and stack.restarted == ["extproc-1"]


# --- the PID file and the signal handler --------------------------------------------------------


def test_pid_file_stops_what_a_dead_run_left_behind_and_never_a_live_runs(tmp_path: Path) -> None:
    with _procs(_sleeper("redis"), _sleeper("envoy"), _sleeper("stranger")) as (a, b, stranger):
        pf = PidFile(tmp_path / "pids")
        pf.write([a, b])
        assert [(e.pid, e.name) for e in pf.read()] == [(os.getpid(), "tollgate"), (a.pid, "redis"),
                                                        (b.pid, "envoy")]
        with pytest.raises(RuntimeError, match="in use by another `tollgate run`"):
            pf.stop_leftovers()  # its owner (us) is alive
        assert a.alive() and b.alive()
        # The owner died (its start time is not ours any more), and one PID was reused since: a
        # process with another start time is a stranger and must be left alone.
        lines = pf.path.read_text().splitlines()
        lines[0] = f"{os.getpid()} 1 tollgate"
        lines.append(f"{stranger.pid} 1 extproc-0")
        pf.path.write_text("\n".join(lines) + "\n")
        stopped = pf.stop_leftovers(timeout=5)
        assert sorted(e.name for e in stopped) == ["envoy", "redis"]
        assert a.popen.wait(timeout=5) == -signal.SIGTERM and b.popen.wait(timeout=5) == -signal.SIGTERM
        assert stranger.alive()
        assert not pf.path.exists()


def test_stop_signals_are_recorded_not_raised() -> None:
    previous = {s: signal.getsignal(s) for s in StopSignals.SIGNALS}
    try:
        stop = StopSignals().install()
        assert not stop.requested()
        os.kill(os.getpid(), signal.SIGHUP)
        os.kill(os.getpid(), signal.SIGTERM)
        _until(lambda: stop.count == 2, 2, "both signals handled")
        assert stop.requested() and stop.received == signal.SIGHUP  # the first one wins
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


# --- a real stack: SIGKILL the ext_proc ----------------------------------------------------------


def _post(base_url: str) -> int:
    try:
        return httpx.post(f"{base_url}/v1/chat/completions", content=CHAT, headers=HEADERS, timeout=5).status_code
    except httpx.TransportError:
        return 0


def test_sigkilled_extproc_is_restarted_and_requests_pass_again(policy_dir, idp, tmp_path: Path) -> None:
    out = io.StringIO()
    with running_stack(policy_dir, idp, tmp_path / "run") as stack:
        assert _post(stack.base_url) == 200
        sup = supervise(stack, out=out)
        ext = next(p for p in stack.procs if p.name == "extproc-0")
        old = ext.pid
        os.kill(old, signal.SIGKILL)
        _dead(ext)
        assert _post(stack.base_url) == 500  # Envoy refuses without its ext_proc (failure_mode_allow: false)

        deadline = time.monotonic() + 20
        while sup.restarts("extproc-0") == 0:
            assert time.monotonic() < deadline, "extproc-0 not restarted within 20 s"
            assert sup.poll() is None
            time.sleep(0.05)
        assert ext.alive() and ext.pid != old
        assert out.getvalue() == (f"tollgate: extproc-0 exited (signal SIGKILL); restarted it "
                                  f"(restart 1, pid {ext.pid})\n")
        assert {e.name: e.pid for e in stack.pid_file.read()[1:]}["extproc-0"] == ext.pid
        assert stack.attribution_log.read_text().count("ext_proc listening on") == 2  # appended, same file

        _until(lambda: _post(stack.base_url) == 200, 15, "a request through Envoy succeeds again", step=0.1)
        assert all(_post(stack.base_url) == 200 for _ in range(3))
        assert sup.poll() is None

        envoy = next(p for p in stack.procs if p.name == "envoy")
        os.kill(envoy.pid, signal.SIGKILL)
        _dead(envoy)
        death = sup.poll()
        assert death is not None and (death.name, death.how) == ("envoy", "signal SIGKILL")
    assert not ext.alive()


# --- `python -m extproc.cli run` under signals --------------------------------------------------


def _marked(marker: str) -> set[int]:
    """Every live process whose environment carries the marker: the run and its children.

    Except redis-server, which writes its process title over its environment; the PID file
    covers it.
    """
    out = set()
    needle = f"TOLLGATE_TEST_MARKER={marker}".encode()
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            if needle in (d / "environ").read_bytes().split(b"\0") and start_time(int(d.name)) is not None:
                out.add(int(d.name))
        except OSError:
            continue
    return out


@dataclass
class TollgateRun:
    """A `python -m extproc.cli run` started by a test, and everything it was seen to start."""

    proc: subprocess.Popen
    run_dir: Path
    log: Path
    marker: str
    seen: dict[int, str] = field(default_factory=dict)  # every child PID its PID file listed -> start time

    def children(self) -> dict[str, tuple[int, str]]:
        """What the PID file lists now: name -> (pid, start time)."""
        now = {e.name: (e.pid, e.started) for e in PidFile(self.run_dir / "pids").read()[1:]}
        self.seen.update(dict(now.values()))
        return now

    def output(self) -> str:
        return self.log.read_text()

    def alive(self) -> set[int]:
        """The PIDs of everything it started that still runs (the run itself included)."""
        self.children()
        return _marked(self.marker) | {pid for pid, started in self.seen.items() if start_time(pid) == started}


@contextmanager
def _tollgate_run(policy_dir: Path, idp, tmp_path: Path) -> Iterator[TollgateRun]:
    """`python -m extproc.cli run` in its own session on free ports; after, SIGKILL what is left."""
    marker = uuid.uuid4().hex
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "TOLLGATE_POLICIES")}
    env.update({
        "TOLLGATE_PORT": str(free_port()), "TOLLGATE_ADMIN_PORT": str(free_port()),
        "TOLLGATE_EXTPROC_PORT": str(free_port()), "TOLLGATE_FAKE_PORT": str(free_port()),
        "TOLLGATE_REDIS_PORT": str(free_port()), "TOLLGATE_ADMIN_API_PORT": str(free_port()),
        "TOLLGATE_EXTPROC_ADMIN_PORT": str(free_port()), "TOLLGATE_METRICS_PORT": str(free_port()),
        "TOLLGATE_FAKE_KEY": FAKE_GATEWAY_KEY, "TEST_JWKS_PORT": str(idp.port),
        "TOLLGATE_TEST_MARKER": marker, "TOLLGATE_WORKERS": "1",
    })
    run_dir, log = tmp_path / "run", tmp_path / "tollgate.out"
    with open(log, "wb") as f:
        proc = subprocess.Popen([sys.executable, "-m", "extproc.cli", "run", "--policies", str(policy_dir),
                                 "--run-dir", str(run_dir)], stdout=f, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=env, cwd=REPO, start_new_session=True)
    run = TollgateRun(proc, run_dir, log, marker)
    try:
        yield run
    finally:
        for pid in {proc.pid} | run.alive():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait(timeout=10)


def test_sigterm_to_the_process_group_stops_every_child(policy_dir, idp, tmp_path: Path) -> None:
    with _tollgate_run(policy_dir, idp, tmp_path) as run:
        _until(lambda: "tollgate is up" in run.output() or run.proc.poll() is not None, 60, "the stack is up",
               step=0.1)
        assert run.proc.poll() is None, run.output()
        children = run.children()
        assert sorted(children) == ["envoy", "extproc-0", "fake-provider", "redis"]
        assert run.alive() == {run.proc.pid, *(pid for pid, _ in children.values())}
        os.killpg(run.proc.pid, signal.SIGTERM)  # what a terminal, systemd or `kill -- -PGID` does
        time.sleep(0.05)
        os.kill(run.proc.pid, signal.SIGTERM)  # ... and what make then forwards: a second signal mid-cleanup
        assert run.proc.wait(timeout=30) == 0, run.output()
        assert run.alive() == set(), f"left running: {run.alive()}"
        assert "tollgate: SIGTERM; stopping ..." in run.output()
        assert not (run.run_dir / "pids").exists()


def test_a_signal_while_the_stack_is_starting_stops_what_has_started(policy_dir, idp, tmp_path: Path) -> None:
    with _tollgate_run(policy_dir, idp, tmp_path) as run:
        _until(lambda: "redis" in run.children() or run.proc.poll() is not None, 60, "redis started", step=0.01)
        assert run.proc.poll() is None, run.output()
        assert "envoy" not in run.children()
        os.kill(run.proc.pid, signal.SIGINT)  # to the `tollgate run` process only
        assert run.proc.wait(timeout=30) == 0, run.output()
        assert "tollgate is up" not in run.output(), "the signal came too late to test a start-up interruption"
        assert "tollgate: SIGINT; stopping ..." in run.output()
        assert run.alive() == set(), f"left running: {run.alive()}"
        assert not (run.run_dir / "pids").exists()
