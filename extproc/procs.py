"""Child processes of the local stack: start in their own session, wait until ready, stop by PID.

Used by `tollgate run` (the `make run` stack) and by the test fixtures, so both start and stop
Redis, the fake provider, the ext_proc server and Envoy the same way.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path


_handed_out: set[int] = set()


def _ephemeral_low() -> int:
    try:
        return int(open("/proc/sys/net/ipv4/ip_local_port_range").read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now.

    Picked below the kernel's ephemeral range, so the outgoing connections a busy test opens
    cannot take it between now and the moment a server binds it, and never the same port twice
    in one process.
    """
    low, high = 20000, min(_ephemeral_low(), 60000)
    for _ in range(200):
        port = random.randrange(low, high) if high - low > 1000 else 0
        if port in _handed_out:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            port = s.getsockname()[1]
        if port not in _handed_out:
            _handed_out.add(port)
            return port
    raise OSError("no free loopback port found")


class Interrupted(Exception):
    """A stop was asked for (a signal) while we were waiting for a child to come up."""


def wait_for_port(port: int, timeout: float = 20.0, proc: "Proc | None" = None,
                  cancelled: Callable[[], bool] | None = None) -> None:
    """Block until something accepts connections on 127.0.0.1:port.

    Raises RuntimeError if `proc` exits first, and `Interrupted` as soon as `cancelled()` is true,
    so a signal during a slow start is answered in a tenth of a second, not after the timeout.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cancelled is not None and cancelled():
            raise Interrupted(f"stopped while waiting for 127.0.0.1:{port}")
        if proc is not None and proc.popen.poll() is not None:
            raise RuntimeError(f"{proc.name} exited with {proc.popen.returncode}; see {proc.log_path}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout}s")


def describe_exit(returncode: int) -> str:
    """`code 1` or `signal SIGKILL`, for the line that says a child died."""
    if returncode < 0:
        try:
            return f"signal {signal.Signals(-returncode).name}"
        except ValueError:
            return f"signal {-returncode}"
    return f"code {returncode}"


@dataclass
class Proc:
    """One child process, started in its own session so a signal to us does not reach it twice."""

    name: str
    argv: list[str]
    log_path: Path | None = None
    env: dict[str, str] | None = None
    ports: list[int] = field(default_factory=list)  # loopback ports it listens on once ready
    popen: subprocess.Popen = field(init=False)
    inherit_output: bool = field(init=False, default=False)

    def start(self, inherit_output: bool = False) -> "Proc":
        self.inherit_output = inherit_output
        out = None
        if not inherit_output and self.log_path is not None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            out = open(self.log_path, "ab")
        self.popen = subprocess.Popen(
            self.argv,
            stdout=out,
            stderr=subprocess.STDOUT if out else None,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **(self.env or {})},
            start_new_session=True,
        )
        if out is not None:
            out.close()
        return self

    def restart(self) -> "Proc":
        """Start it again after it exited: same argv, env and output (the log is appended to)."""
        if self.alive():
            raise RuntimeError(f"{self.name} (pid {self.pid}) is still running")
        return self.start(inherit_output=self.inherit_output)

    def wait_ready(self, timeout: float = 20.0, cancelled: Callable[[], bool] | None = None) -> None:
        """Block until every one of its ports accepts connections (RuntimeError if it exits first)."""
        deadline = time.monotonic() + timeout
        for port in self.ports:
            wait_for_port(port, timeout=max(0.1, deadline - time.monotonic()), proc=self, cancelled=cancelled)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM the process group, then SIGKILL if it lingers."""
        if self.popen.poll() is not None:
            return
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(self.popen.pid, sig)
            except ProcessLookupError:
                return
            try:
                self.popen.wait(timeout=timeout)
                return
            except subprocess.TimeoutExpired:
                continue


def redis_proc(port: int, data_dir: Path, unix_socket: Path | None = None) -> Proc:
    """A loopback-only redis-server with AOF on, its data under data_dir; with `unix_socket`,
    also listening there (owner only), beside the port."""
    data_dir.mkdir(parents=True, exist_ok=True)
    unix = ["--unixsocket", str(unix_socket), "--unixsocketperm", "700"] if unix_socket is not None else []
    return Proc(
        "redis",
        [
            "redis-server",
            "--bind", "127.0.0.1",
            "--port", str(port),
            *unix,
            "--dir", str(data_dir),
            "--appendonly", "yes",
            "--save", "",
            "--protected-mode", "yes",
        ],
        log_path=data_dir / "redis.log",
        ports=[port],
    )


UNIX_PATH_MAX = 100
"""Longest Unix socket path used (the kernel's limit is 107 bytes); a longer one means TCP."""


def local_redis(port: int, data_dir: Path) -> tuple[Proc, str]:
    """`redis_proc` also listening on `data_dir/redis.sock`, and the URL to reach it by: that
    socket's (a round trip there costs about a third of loopback TCP's: docs/operations.md,
    "Redis over a Unix socket"), or the port's when the path is too long to bind."""
    sock = (data_dir / "redis.sock").resolve()
    if len(str(sock)) > UNIX_PATH_MAX:
        return redis_proc(port, data_dir), f"redis://127.0.0.1:{port}/0"
    return redis_proc(port, data_dir, sock), f"unix://{sock}?db=0"


def start_time(pid: int) -> str | None:
    """When `pid` started (clock ticks since boot, /proc/<pid>/stat field 22); None if it is gone.

    A PID plus its start time names one process even after the PID is reused, so a PID file
    written by an earlier run never makes us signal a stranger. A zombie counts as gone.
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (OSError, ValueError):
        return None
    fields = stat[stat.rindex(")") + 2:].split()
    if len(fields) < 20 or fields[0] in ("Z", "X"):
        return None
    return fields[19]


@dataclass(frozen=True)
class PidEntry:
    pid: int
    started: str  # start_time() when it was recorded
    name: str

    def alive(self) -> bool:
        return start_time(self.pid) == self.started


class PidFile:
    """`<run dir>/pids`: who a `tollgate run` started, for when it cannot clean up itself.

    A parent killed with SIGKILL cannot stop its children (they run in their own sessions, so
    nothing else does either); the next run reads this file and stops them before it binds the
    same ports. The first line is the owner (the parent), then one `pid start-time name` per child.
    """

    def __init__(self, path: Path) -> None:
        self.path = path

    def write(self, procs: Iterable[Proc]) -> None:
        me = os.getpid()
        lines = [f"{me} {start_time(me)} tollgate"]
        lines += [f"{p.pid} {start_time(p.pid)} {p.name}" for p in procs if hasattr(p, "popen")]
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("\n".join(lines) + "\n")
        tmp.replace(self.path)  # atomic: a reader never sees half a file

    def read(self) -> list[PidEntry]:
        """The owner first, then the children; [] if there is no file."""
        try:
            text = self.path.read_text()
        except OSError:
            return []
        out = []
        for line in text.splitlines():
            pid, started, name = (line.split(maxsplit=2) + ["", "", ""])[:3]
            if pid.isdigit() and started:
                out.append(PidEntry(int(pid), started, name))
        return out

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)

    def stop_leftovers(self, timeout: float = 5.0) -> list[PidEntry]:
        """Stop the children recorded by an earlier run that died without cleaning up.

        Raises RuntimeError if that run is still alive: two stacks in one run dir would share
        Redis's data directory and ports. Returns what it stopped.
        """
        entries = self.read()
        if not entries:
            return []
        owner, children = entries[0], entries[1:]
        if owner.alive():
            raise RuntimeError(f"{self.path.parent} is in use by another `tollgate run` (pid {owner.pid})")
        left = [c for c in children if c.alive()]
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for c in left:
                try:
                    os.killpg(c.pid, sig)  # each child leads its own session and process group
                except (ProcessLookupError, PermissionError):
                    pass
            deadline = time.monotonic() + timeout
            while any(c.alive() for c in left) and time.monotonic() < deadline:
                time.sleep(0.05)
            if not any(c.alive() for c in left):
                break
        self.remove()
        return left
