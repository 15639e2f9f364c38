"""`tollgate serve --workers N`: N ext_proc processes, one port each, kept up by one parent.

Why processes: the ext_proc is Python, so one process uses at most one core (the GIL), and Envoy
keeps one HTTP/2 connection per Envoy worker to each endpoint of the `tollgate_extproc` cluster,
so streams are spread across processes only if each process is its own endpoint. Worker i
listens on `--port + i` (its admin API on `--admin-port + i`, its /metrics on
`--metrics-port + i`); `tollgate envoy-config --workers N` lists the same ports.

The parent only supervises: it starts the N `tollgate serve` children (each in its own session,
so a terminal's Ctrl-C reaches the parent alone), restarts one that dies (extproc/supervisor.py's
backoff; Envoy's health check takes the dead one out meanwhile and puts it back once it answers),
forwards SIGTERM/SIGINT (they drain in parallel; a second one makes them skip the drain) and
SIGHUP (policy reload), and exits once every child has. A child whose parent dies (SIGKILL)
gets SIGTERM from the kernel and drains like any other stop.

State shared through `--state-dir`: attribution files and the outbox are named per port
(`attribution/extproc-<port>*`, `outbox-<port>.sqlite`), so no two processes write one SQLite
file; see `claim_outbox` for how settles left by a worker that no longer runs are replayed.
"""

from __future__ import annotations

import argparse
import ctypes
import fcntl
import logging
import os
import signal
import socket
import sqlite3
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from .procs import Interrupted, Proc, describe_exit
from .supervisor import Backoff, Supervisor

log = logging.getLogger("tollgate.workers")

DEFAULT_ADMIN_PORT = 50052  # `serve --admin-port` with one worker


def cpu_count() -> int:
    """The cores this process may run on (taskset / cpuset aware), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def parse_workers(text: str) -> int:
    """argparse type for `--workers`: a count, or `0` / `auto` for one per core."""
    if text.strip().lower() in ("0", "auto"):
        return cpu_count()
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"want a number of processes or 'auto', got {text!r}") from None
    if n < 0:
        raise argparse.ArgumentTypeError(f"want a number of processes or 'auto', got {text!r}")
    return n


@dataclass(frozen=True)
class WorkerPorts:
    index: int
    port: int  # the ext_proc gRPC port (an endpoint of Envoy's tollgate_extproc cluster)
    admin: int  # the admin API's gRPC port (tollgate_admin cluster); 0 = off
    metrics: int  # Prometheus /metrics; 0 = off


def worker_ports(n: int, port: int, admin_port: int | None, metrics_port: int = 0) -> list[WorkerPorts]:
    """Worker i gets `port + i`, `admin_port + i`, `metrics_port + i` (0 stays 0: off).

    `admin_port` None is the default: 50052 with one worker (as before), else the first port after
    the ext_proc ports (`port + n`), so the default ranges never overlap. Ranges that do overlap,
    or leave 1-65535, raise ValueError."""
    if n < 1:
        raise ValueError("at least one worker")
    if admin_port is None:
        admin_port = DEFAULT_ADMIN_PORT if n == 1 else port + n
    ranges = {"--port": port, "--admin-port": admin_port, "--metrics-port": metrics_port}
    used: dict[int, str] = {}
    for flag, base in ranges.items():
        if not base:
            continue
        if base < 1 or base + n - 1 > 65535:
            raise ValueError(f"{flag} {base}: {n} consecutive ports from there leave 1-65535")
        for p in range(base, base + n):
            if p in used:
                raise ValueError(f"{flag} {base} and {used[p]} overlap with {n} workers (both need port {p}); "
                                 f"give them ranges {n} ports apart")
            used[p] = f"{flag} {ranges[flag]}"
    return [WorkerPorts(i, port + i, admin_port + i if admin_port else 0, metrics_port + i if metrics_port else 0)
            for i in range(n)]


# ---- the outbox, one file per port ----------------------------------------------------------------

def outbox_path(state_dir: Path, port: int) -> Path:
    return state_dir / f"outbox-{port}.sqlite"


LEGACY_OUTBOX = "outbox.sqlite"  # before workers, every ext_proc of a state dir shared this one


class OutboxClaim:
    """This process's outbox, `<state dir>/outbox-<port>.sqlite`, held for its lifetime.

    Per-port files, not one shared file: SQLite would serialise every process's fsync'd insert
    through one write lock (inside the event loop, while Redis is down, exactly when the outbox is
    busy), every process would replay every entry, and each would report all of them in its
    outbox gauge. A worker restarted on its port replays its own file. For a file whose port no
    longer runs (fewer workers than before, another port, or the shared `outbox.sqlite` of an
    earlier version), each starting process adopts the files nobody holds: their entries are moved
    into its own file (inserted, committed, then deleted there), so they are replayed too.

    Who holds a file: the process holding an exclusive flock on `outbox-<port>.lock`, which the
    kernel releases when it dies, SIGKILL included. A crash in the middle of a move leaves an
    entry in both files; replaying a settle twice is harmless (extproc/budgets/outbox.py).
    """

    def __init__(self, state_dir: Path, port: int, wait: float = 10.0) -> None:
        state_dir.mkdir(parents=True, exist_ok=True)
        self.state_dir = state_dir
        self.port = port
        self.path = outbox_path(state_dir, port)
        self._fd = _lock(state_dir / f"outbox-{port}.lock", wait=wait)
        if self._fd is None:  # another process on this port and state dir (a restart's predecessor)
            log.warning("%s is held by another process; sharing it (SQLite allows that)", self.path.name)

    def adopt_orphans(self) -> int:
        """Move the entries of every outbox file nobody holds into ours; returns how many."""
        moved = 0
        for src in sorted(self.state_dir.glob("outbox*.sqlite")):
            if src == self.path:
                continue
            lock_name = "outbox.lock" if src.name == LEGACY_OUTBOX else src.with_suffix(".lock").name
            fd = _lock(self.state_dir / lock_name, wait=0)
            if fd is None:  # its worker is alive: it replays its own entries
                continue
            try:
                n = _move_entries(src, self.path)
            except sqlite3.Error as e:
                log.error("could not adopt the settles in %s (left there): %s", src, e)
                continue
            finally:
                os.close(fd)
            if n:
                log.warning("adopted %d settles from %s (no process holds it) into %s", n, src.name, self.path.name)
            moved += n
        return moved

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _lock(path: Path, wait: float) -> int | None:
    """An fd holding an exclusive flock on `path`, or None if someone else holds it for `wait` s."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o640)
    deadline = time.monotonic() + wait
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            if time.monotonic() >= deadline:
                os.close(fd)
                return None
            time.sleep(0.05)


def _move_entries(src: Path, dest: Path) -> int:
    """Move src's settles into dest (extproc/budgets/outbox.py owns the file's schema)."""
    from .budgets.outbox import Outbox

    d = Outbox(dest)
    try:
        return d.absorb(src)
    finally:
        d.close()


# ---- the parent -----------------------------------------------------------------------------------

def exit_with_parent(parent_pid: int) -> None:
    """In a worker: get SIGTERM (and drain) when the parent dies, SIGKILL included (Linux)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGTERM), 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent_pid:  # it died before we asked
        os.kill(os.getpid(), signal.SIGTERM)


class _Signals:
    """Recorded, not raised (as supervisor.StopSignals): stops counted, reloads counted."""

    def __init__(self) -> None:
        self.stops = 0
        self.first: signal.Signals | None = None
        self.hups = 0

    def install(self) -> "_Signals":
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._stop)
        signal.signal(signal.SIGHUP, self._hup)
        return self

    def _stop(self, signum: int, frame: FrameType | None) -> None:
        self.stops += 1
        self.first = self.first or signal.Signals(signum)

    def _hup(self, signum: int, frame: FrameType | None) -> None:
        self.hups += 1

    def requested(self) -> bool:
        return self.stops > 0


def child_argv(args: argparse.Namespace, w: WorkerPorts) -> list[str]:
    """`tollgate serve` for one worker: the parent's options, this worker's ports."""
    argv = [sys.executable, "-m", "extproc.cli", "serve", "--policies", str(args.policies), "--host", args.host,
            "--port", str(w.port), "--admin-port", str(w.admin), "--metrics-port", str(w.metrics),
            "--redis-url", args.redis_url, "--state-dir", str(args.state_dir),
            "--drain-seconds", str(args.drain_seconds), "--shutdown-grace-seconds", str(args.shutdown_grace_seconds),
            "--parent-pid", str(os.getpid())]
    if args.xds_dir:
        argv += ["--xds-dir", str(args.xds_dir)]
    return argv


def _say(text: str) -> None:
    try:
        print(text, file=sys.stderr, flush=True)
    except (OSError, ValueError):
        pass


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


def _signal(p: Proc, sig: signal.Signals) -> None:
    if hasattr(p, "popen") and p.alive():
        try:
            os.killpg(p.pid, sig)  # each worker leads its own process group
        except ProcessLookupError:
            pass


def serve_workers(args: argparse.Namespace, n: int, *, poll: float = 0.05,
                  backoff: Backoff = Backoff()) -> int:
    """The parent of `serve --workers N`; returns the exit status (0: stopped by a signal and every
    worker exited cleanly)."""
    sigs = _Signals().install()
    try:
        layout = worker_ports(n, args.port, args.admin_port, args.metrics_port)
    except ValueError as e:
        _say(f"tollgate: {e}")
        return 2
    procs = [Proc(f"worker-{w.index}", child_argv(args, w), ports=[p for p in (w.port, w.admin, w.metrics) if p])
             for w in layout]
    try:
        for w, p in zip(layout, procs):
            if sigs.requested():
                raise Interrupted("stopped while starting")
            p.start(inherit_output=True)  # records on stdout, logs on stderr, as one `serve`
            admin = f"admin gRPC {args.host}:{w.admin}" if w.admin else "admin off"
            metrics = f"metrics http://{args.host}:{w.metrics}/metrics" if w.metrics else "metrics off"
            _say(f"tollgate: worker {w.index} (pid {p.pid}): ext_proc {args.host}:{w.port}, {admin}, {metrics}")
        for p in procs:
            p.wait_ready(timeout=60, cancelled=sigs.requested)
        _say(f"tollgate: {n} workers serving; Envoy's tollgate_extproc cluster must list ports "
             f"{layout[0].port}-{layout[-1].port} (tollgate envoy-config --workers {n})")
        sup = Supervisor(procs, restartable=lambda p: True, restart=lambda p: p.restart(), backoff=backoff)
        hups = 0
        while not sigs.requested():
            if sigs.hups != hups:
                hups = sigs.hups
                # Only to workers that listen: before that, SIGHUP's default action would kill one
                # that is still starting (it reads the policy files as they are now anyway).
                for w, p in zip(layout, procs):
                    if p.alive() and _accepts(w.port):
                        _signal(p, signal.SIGHUP)
            sup.poll()  # restarts without waiting for the port; a quick death backs off further
            time.sleep(poll)
    except Interrupted:
        pass
    except (RuntimeError, TimeoutError, OSError) as e:  # a worker that exited or never listened at start-up
        _say(f"tollgate: a worker did not start: {str(e).replace('; see None', ' (its output is above)')}")
        return _stop_all(procs, sigs, args, 1, hurry=True)
    return _stop_all(procs, sigs, args, 0)


def _stop_all(procs: list[Proc], sigs: _Signals, args: argparse.Namespace, status: int,
              hurry: bool = False) -> int:
    """Forward each stop signal to every live worker (two SIGTERMs, which skip the drain, with
    `hurry`); wait until all have exited, SIGKILL after drain + grace + 5 s."""
    if sigs.first is not None:
        _say(f"tollgate: {sigs.first.name}; stopping {sum(1 for p in procs if hasattr(p, 'popen') and p.alive())} "
             f"workers (drain {args.drain_seconds:g} s, then up to {args.shutdown_grace_seconds:g} s)")
    sent, last = 0, 0.0
    deadline = time.monotonic() + args.drain_seconds + args.shutdown_grace_seconds + 5.0
    killed = False
    while any(hasattr(p, "popen") and p.alive() for p in procs):
        want = max(sigs.stops, 2 if hurry else 1)
        # Spaced out: two SIGTERMs that arrive before the first is handled count as one.
        if want > sent and time.monotonic() - last >= 0.2:
            for p in procs:
                _signal(p, signal.SIGTERM)
            sent, last = sent + 1, time.monotonic()
        if not killed and time.monotonic() > deadline:
            _say("tollgate: workers still running after drain + grace; SIGKILL")
            for p in procs:
                _signal(p, signal.SIGKILL)
            killed = True
        time.sleep(0.05)
    for p in procs:
        if not hasattr(p, "popen"):
            continue
        rc = p.popen.returncode
        if rc not in (0, -signal.SIGTERM, -signal.SIGINT):  # a signal before its handler was in: fine
            _say(f"tollgate: {p.name} exited ({describe_exit(rc)})")
            status = status or 1
    if killed:
        status = status or 1
    return status
