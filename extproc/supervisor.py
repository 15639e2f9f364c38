"""Keep `tollgate run`'s ext_proc up: restart it when it dies, and stop the stack on a signal.

The ext_proc is the Python process in the request path, so it is the one that can crash (a bug,
the OOM killer, someone's `kill -9`). Envoy health-checks it and reconnects by itself, so
starting the same command again on the same ports is all a restart takes; until then Envoy answers
500 (`failure_mode_allow: false`: no budget check, no request). Redis, the fake provider and
Envoy dying are not retried: in the local stack that means something is wrong with the machine or
the config, and a restart loop would hide it. In production the service manager supervises every
process (docs/operations.md); this is the same idea for `make run`.
"""

from __future__ import annotations

import signal
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, TextIO

from .procs import Interrupted, Proc, describe_exit

if TYPE_CHECKING:
    from .stack import Stack


@dataclass(frozen=True)
class Backoff:
    """Delay before a restart: `initial`, doubling on each quick crash up to `maximum`.

    A process that crashes as soon as it starts (a bad policy, a port taken) must not spin a
    core; one that ran for `reset_after` seconds before dying was healthy, so its next restart
    is quick again.
    """

    initial: float = 0.2
    maximum: float = 5.0
    reset_after: float = 30.0

    def next(self, previous: float, uptime: float) -> float:
        if previous <= 0 or uptime >= self.reset_after:
            return self.initial
        return min(previous * 2, self.maximum)


@dataclass
class Watched:
    """One supervised process and its restart bookkeeping."""

    proc: Proc
    started: float  # clock() at its last (re)start
    restarts: int = 0
    delay: float = 0.0  # the backoff used for the last restart
    due: float | None = None  # clock() at which a scheduled restart runs; None = none scheduled
    last_exit: str = ""  # how it last died, e.g. "signal SIGKILL"


@dataclass(frozen=True)
class Death:
    """A process that is not restarted died: the stack has to stop."""

    name: str
    how: str
    log_path: Path | None

    def __str__(self) -> str:
        where = f" (see {self.log_path})" if self.log_path else ""
        return f"{self.name} exited ({self.how}){where}"


def is_extproc(proc: Proc) -> bool:
    return proc.name.startswith("extproc-")


def _restart_and_wait(proc: Proc) -> None:
    proc.restart()
    proc.wait_ready()


class Supervisor:
    """Polled by `tollgate run`'s main loop; restarts what `restartable` accepts, with backoff.

    Nothing here runs in the background: `poll()` looks at every process once, restarts the
    ones whose backoff has elapsed (blocking until the restarted one listens on its ports), and
    returns the first `Death` of a process it does not restart. The clock is injectable so the
    backoff can be tested without sleeping.
    """

    def __init__(self, procs: Iterable[Proc], *, restartable: Callable[[Proc], bool] = is_extproc,
                 restart: Callable[[Proc], None] = _restart_and_wait, backoff: Backoff = Backoff(),
                 clock: Callable[[], float] = time.monotonic, out: TextIO | None = None) -> None:
        self._restartable = restartable
        self._restart = restart
        self.backoff = backoff
        self._clock = clock
        self._out = out  # None: sys.stderr as it is when we write (pytest swaps it)
        now = clock()
        self.watched = {p.name: Watched(p, started=now) for p in procs}

    def restarts(self, name: str) -> int:
        return self.watched[name].restarts

    def poll(self) -> Death | None:
        now = self._clock()
        for w in self.watched.values():
            if w.due is None:
                if w.proc.alive():
                    continue
                how = describe_exit(w.proc.popen.returncode)
                if not self._restartable(w.proc):
                    return Death(w.proc.name, how, w.proc.log_path)
                w.delay = self.backoff.next(w.delay, now - w.started)
                w.due = now + w.delay
                w.last_exit = how
            if now >= w.due:
                self._restart_one(w)
        return None

    def _restart_one(self, w: Watched) -> None:
        w.due = None
        w.restarts += 1
        w.started = self._clock()
        try:
            self._restart(w.proc)
        except Interrupted:
            raise
        except Exception as e:  # died again while starting, or never listened: back off further
            if hasattr(w.proc, "popen") and w.proc.alive():
                w.proc.stop()  # up but not listening is no restart; the next poll schedules another
            self._say(f"tollgate: {w.proc.name} exited ({w.last_exit}); restart {w.restarts} failed: {e}")
            return
        self._say(f"tollgate: {w.proc.name} exited ({w.last_exit}); restarted it "
                  f"(restart {w.restarts}, pid {w.proc.pid})")

    def _say(self, line: str) -> None:
        try:
            print(line, file=self._out or sys.stderr, flush=True)
        except (OSError, ValueError):  # the terminal is gone (SIGHUP); supervision goes on
            pass


def supervise(stack: "Stack", **kwargs: object) -> Supervisor:
    """The supervisor `tollgate run` uses: ext_procs are restarted through `Stack.restart`."""
    return Supervisor(stack.procs, restartable=is_extproc, restart=stack.restart, **kwargs)  # type: ignore[arg-type]


class StopSignals:
    """SIGTERM, SIGINT and SIGHUP ask `tollgate run` to stop, whenever they arrive, once.

    The handler only records the signal. Raising from it (KeyboardInterrupt, as before) can land
    between the fork of a child and the line that records its PID, leaking the child, or inside
    the cleanup when a second signal follows the first: make forwards SIGTERM to us after the
    process group already got it. The start-up waits and the main loop poll `requested()`
    instead, so a signal is answered within a tenth of a second and the cleanup always finishes.
    Installed explicitly, since a shell that starts us in the background leaves SIGINT ignored.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)

    def __init__(self) -> None:
        self.received: signal.Signals | None = None
        self.count = 0

    def install(self) -> "StopSignals":
        for sig in self.SIGNALS:
            signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.count += 1
        if self.received is None:
            self.received = signal.Signals(signum)

    def requested(self) -> bool:
        return self.received is not None
