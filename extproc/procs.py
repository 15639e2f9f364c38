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


def wait_for_port(port: int, timeout: float = 20.0, proc: "Proc | None" = None) -> None:
    """Block until something accepts connections on 127.0.0.1:port."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.popen.poll() is not None:
            raise RuntimeError(f"{proc.name} exited with {proc.popen.returncode}; see {proc.log_path}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout}s")


@dataclass
class Proc:
    """One child process, started in its own session so a signal to us does not reach it twice."""

    name: str
    argv: list[str]
    log_path: Path | None = None
    env: dict[str, str] | None = None
    popen: subprocess.Popen = field(init=False)

    def start(self, inherit_output: bool = False) -> "Proc":
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


def redis_proc(port: int, data_dir: Path) -> Proc:
    """A loopback-only redis-server with AOF on, its data under data_dir."""
    data_dir.mkdir(parents=True, exist_ok=True)
    return Proc(
        "redis",
        [
            "redis-server",
            "--bind", "127.0.0.1",
            "--port", str(port),
            "--dir", str(data_dir),
            "--appendonly", "yes",
            "--save", "",
            "--protected-mode", "yes",
        ],
        log_path=data_dir / "redis.log",
    )
