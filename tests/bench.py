"""`make bench`: Tollgate's throughput, latency, CPU and memory, as ratios against plain Envoy and
against "the floor" measured in the same run.

    python -m tests.bench [--duration 5] [--warmup 1] [--conns 32,8,1] [--rounds 3] [--streams 30]
                          [--targets direct,plain,floor,floorredis,floormeter,tollgate,heavy,workers2,cachehit]
                          [--long [--long-requests 100000] [--long-targets tollgate]] [--quick]
                          [--json .run/bench.json]

What runs (loopback only, every process on a free port, all of them up for the whole run, stopped
by PID at the end whatever happens, Ctrl-C included; PID files under the run directory let the
next run stop what a SIGKILLed one left):

* `direct`: the fake provider alone (the default stack's `extproc.fakeprovider`).
* `plain`: an Envoy from the bootstrap Tollgate renders, minus the ext_proc filter, its cluster
  and the admin API listener, with the fake provider's route matched unconditionally. Same
  listener, HCM, access log, local-reply mappers and router, same `--concurrency`, same fake.
* `floor`: another Envoy from that bootstrap with the ext_proc filter, processing modes,
  cluster and health checks untouched, pointed at tests/bench_floor.py: a no-op ext_proc on
  Tollgate's own server code and gRPC options that answers every message with an empty
  CONTINUE. Routed like `plain` (the no-op sets no x-tollgate-upstream). What the ext_proc
  design costs before Tollgate does any work.
* `floorredis`: the floor plus the two Redis calls a hard cap costs each request (the reserve
  script awaited on the request body, the settle script after the last response message), through
  Tollgate's own budget store and script pipe with inputs built once, on a Redis of its own
  (tests/bench_floor.py `--redis-url`). The best any Python ext_proc holding Tollgate's Redis
  protocol could do here: Tollgate minus this is the rest of Tollgate's Python.
* `floormeter`: floorredis plus the least any gateway that meters in dollars does per request
  (tests/bench_floor.py `--meter`: the key's hash looked up, both bodies parsed and priced,
  answers with header mutations and metadata, a short record to a file and into the settle's
  rollup, two counters), on a Redis of its own. What Tollgate could reach here if all its other
  features (policy matching, windows, downgrades, access rules, rate limits, cache, the full
  record, histograms) cost nothing: Tollgate minus this is what they cost.
* `tollgate`: the Tollgate stack (`extproc.stack.Stack`) with `policies/`: API key identity,
  two matching budgets (one shadow), attribution on. Own Redis, fake provider, ext_proc, Envoy.
* `heavy`: a second stack with a heavier policy: `policies/` plus tests/bench_policies/heavy/
  (a verified RS256 JWT, key pair generated into the run directory at start; five matching
  enforced budgets, one rolling; model-access rules).
* `workers2`: a third stack with `policies/` and two ext_proc processes (Envoy balances
  requests over both endpoints), as `tollgate serve --workers 2` would run.
* `cachehit`: a fourth stack with `policies/`, driven with the `cache-demo` key, whose answers
  policies/cache.yaml caches (docs/cache.md): after the first request every one is a response-cache
  hit, answered by the ext_proc (identity, budget reservation, lookup, $0 settle) without the
  provider. Its goal: a streamed answer (the same `x-fake-token-latency-ms` as the others') done
  sooner than through plain Envoy to the fake provider; its wrk rows show what a hit costs the
  ext_proc against `tollgate`'s forwarded requests.

Every stack starts with a fresh Redis under the run directory, so budgets start at zero.

Measurements:

1. Non-streamed `POST /v1/chat/completions` (small body, the target's credential) with
   `wrk -t1` at each of `--conns` (32, 8 and 1 connections), a warm-up before each run, targets
   interleaved so drift hits all alike, all of it `--rounds` times (3): each number in the tables
   is the median of the rounds' measurements, each ratio (and each target wrk measures) the
   median of the rounds' own ratios, and the targets table also prints every round's value (on
   this VM one run of the same code gave x0.46, the next x0.55 of the floor's requests/s; a
   median of interleaved rounds is what a target can be judged on). Requests/s, exact
   p50/p90/p99 and error counts from a Lua `done()` hook; any non-2xx/3xx response or socket
   error is reported and fails the run. CPU per request of each of the target's processes
   (ext_proc, Envoy, Redis, fake provider) from /proc/<pid>/stat over the measured run, plus
   three noise gauges: CPU used by processes not ours, by our processes serving other targets
   (idle stacks, health checks: a few %), and the hypervisor's steal time.
2. Streaming time to the first `data:` event and to the end of the stream, sequential requests
   (`x-fake-token-latency-ms: 20`), alternating direct / plain / floor / tollgate / heavy /
   cachehit. The floor switches an SSE response to STREAMED as Tollgate does, so "tollgate -
   floor" is what Tollgate's own work adds to a stream, and "floor - plain" what the ext_proc
   design costs one (four gRPC round trips before the first token reaches the client).
3. The ext_procs' RSS (and high-water mark) at start, after each run and at the end. The default
   run's check compares the RSS after the first (warm-up) run with the end, over however many
   requests the run made (thousands, not 100,000; it says so). `--long` adds a run of
   `--long-requests` (100,000) against `tollgate` (or each of `--long-targets`, e.g.
   `floor,tollgate` to tell grpc's own growth from Tollgate's) at 32 connections, RSS before and
   after;   minutes on 2 cores.
4. Correctness cross-checks for every Tollgate stack: Envoy's stats (ext_proc streams, upstream
   2xx, no 4xx/5xx), the ext_procs' attribution records (one per request, all `allowed`), and
   after the runs no lease left in Redis (tests/accounting.py). The floor's Envoy stats prove
   every request went through its ext_proc.

How to read it: "x plain" and "x floor" are ratios of requests/s (higher is better, 1.0 is
as fast); "+ms vs floor" is the latency Tollgate's own work adds over the no-op ext_proc. The
targets table prints the goals of issue 14 next to the measured values, met or not met; they
never fail the run. Numbers from a shared machine are noisy: the "others' CPU" and "steal"
columns say how much other work ran during each measurement.

Prints the tables and writes everything to `.run/bench.json`. Exit status 1 when a sanity check
failed (errors, refused requests, missing attribution, a dead process), so a broken gateway
cannot post a flattering number. `--quick` (1 s runs, no warm-up, 32 and 1 connections, 5
streams) is what tests/test_bench_quick.py runs to keep this working; its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import itertools
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from extproc.envoy_config import inline_xds
from extproc.procs import PidFile, Proc, free_port, local_redis, wait_for_port
from extproc.stack import Stack, StackPorts, envoy_binary

REPO = Path(__file__).resolve().parent.parent
GATEWAY_KEY = "sk-bench-gateway-key"  # what Tollgate injects for the fake provider
CLIENT_KEY = "demo"  # policies/identity.yaml: user demo, team demo-team, $500/month
MODEL = "gpt-4o"
BODY = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "Say hello in five words."}]},
                  separators=(",", ":"))
STREAM_BODY = json.dumps({"model": MODEL, "stream": True, "stream_options": {"include_usage": True},
                          "messages": [{"role": "user", "content": "Say hello in five words."}]},
                         separators=(",", ":"))
TOKEN_LATENCY_MS = 20
STREAM_OUTPUT_TOKENS = 8
ENVOY_CONCURRENCY = "2"  # as extproc.stack starts Tollgate's Envoy
HEAVY_POLICIES = REPO / "tests" / "bench_policies" / "heavy"
JWT_ISSUER = "https://idp.bench.tollgate.test"  # tests/bench_policies/heavy/bench-identity.yaml
JWT_AUDIENCE = "tollgate-bench"
JWT_HEADER = "cf-access-jwt-assertion"
ALL_TARGETS = ("direct", "plain", "floor", "floorredis", "floormeter", "tollgate", "heavy", "workers2", "cachehit")
CACHE_KEY = "cache-demo"  # policies/identity.yaml; policies/cache.yaml caches its answers
STREAM_TARGETS = ("direct", "plain", "floor", "tollgate", "heavy", "cachehit")
LONG_CONNS = 32

WRK_LUA = """
wrk.method = "POST"
wrk.body = [[%BODY%]]
wrk.headers["content-type"] = "application/json"
%HEADERS%

done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH_JSON {"requests":%.0f,"duration_us":%.0f,"bytes":%.0f,"connect_errors":%.0f,' ..
    '"read_errors":%.0f,"write_errors":%.0f,"non_2xx_3xx":%.0f,"timeouts":%.0f,' ..
    '"p50_us":%.0f,"p90_us":%.0f,"p99_us":%.0f,"mean_us":%.1f,"max_us":%.0f}\\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status,
    e.timeout, latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency.mean, latency.max))
end
"""


def _on_sigterm(*_: object) -> None:
    raise KeyboardInterrupt


# --------------------------------------------------------------------------------------------
# targets
# --------------------------------------------------------------------------------------------


@dataclass
class Target:
    """One thing wrk and the streaming client measure, and the processes that serve it."""

    name: str
    url: str  # the non-streamed endpoint (the streamed one is the same)
    headers: dict[str, str]  # the client's credential
    expect_auth: str  # the authorization the fake provider must see
    gateway: bool  # a Tollgate stack: x-tollgate-* headers, attribution, leases checked
    roles: dict[str, list[Proc]]  # extproc / envoy / redis / fake -> processes
    admin: int | None = None  # the Envoy's admin port (stats), if there is an Envoy
    stack: Stack | None = None
    attribution_logs: list[Path] = field(default_factory=list)
    script: Path | None = None  # its wrk Lua script
    wrk_requests: int = 0  # requests wrk completed (warm-ups included)
    cut_off: int = 0  # requests wrk may have left unanswered when it stopped: one per connection per run
    streams: int = 0  # streamed requests (warm-up included)
    cache: bool = False  # answered from the response cache after its first request (cachehit)

    @property
    def procs(self) -> list[Proc]:
        return [p for ps in self.roles.values() for p in ps]


def tollgate_target(name: str, stack: Stack, headers: dict[str, str]) -> Target:
    by_name = {p.name: p for p in stack.procs}
    extprocs = [p for p in stack.procs if p.name.startswith("extproc-")]
    logs = [stack.attribution_log] + [stack.run_dir / f"extproc-{i}.log" for i in range(1, len(extprocs))]
    return Target(name, f"{stack.base_url}/v1/chat/completions", headers, f"Bearer {GATEWAY_KEY}", True,
                  {"extproc": extprocs, "envoy": [by_name["envoy"]], "redis": [by_name["redis"]],
                   "fake": [by_name["fake-provider"]]},
                  admin=stack.ports.admin, stack=stack, attribution_logs=logs)


def cache_hit_target(policies: Path, run_dir: Path) -> tuple[Stack, Target]:
    """`cachehit`: a stack of its own (so its records and Envoy counters are its own), driven with
    the key whose answers policies/cache.yaml caches."""
    stack = start_stack(policies, run_dir)
    t = tollgate_target("cachehit", stack, {"authorization": f"Bearer {CACHE_KEY}"})
    t.cache = True
    return stack, t


def start_stack(policies: Path, run_dir: Path, extprocs: int = 1, env: dict[str, str] | None = None) -> Stack:
    stack = Stack(policies, run_dir, StackPorts.free(extprocs), extra_env={"TOLLGATE_FAKE_KEY": GATEWAY_KEY, **(env or {})})
    try:
        return stack.start()
    except BaseException:
        stack.stop()
        raise


def heavy_policy(base: Path, run_dir: Path, ttl_seconds: int) -> tuple[Path, Path, str]:
    """The heavier policy: `base` with tests/bench_policies/heavy/ laid over it, in the run dir, and
    a JWKS file from an RSA key pair generated now. Returns the policy dir, the JWKS file and a
    token for the bench's identity, signed with that key."""
    from tests.e2e_idp import TestIdP  # real keys and PyJWT; the key never leaves this process

    out = run_dir / "heavy-policies"
    out.mkdir(parents=True)
    for src in (base, HEAVY_POLICIES):
        for f in sorted(src.glob("*.yaml")):
            shutil.copy(f, out / f.name)
    idp = TestIdP()
    jwks = run_dir / "heavy-jwks.json"
    jwks.write_text(json.dumps(idp.jwks()))
    token = idp.token({"custom": {"groups": ["bench-engineers"], "team": "bench-team"}}, kid="rsa-1",
                      ttl=ttl_seconds, iss=JWT_ISSUER, aud=JWT_AUDIENCE, sub="bench-user", email="bench@example.com")
    return out, jwks, token


# --------------------------------------------------------------------------------------------
# processes
# --------------------------------------------------------------------------------------------


def _bootstrap_base(tollgate: dict[str, Any], listen: int, admin: int, access_log: str) -> dict[str, Any]:
    """Tollgate's rendered bootstrap with its xDS files inlined, on other ports, without the admin
    API (listener and cluster: not on the request path), and the fake provider's route (prefix
    rewrite, host rewrite, timeout) matching every `/v1/` request."""
    boot = copy.deepcopy(tollgate)
    if "dynamic_resources" in boot:  # the providers' clusters and routes, read back from their xDS files
        boot = inline_xds(boot)
    boot["admin"]["address"]["socket_address"]["port_value"] = admin
    res = boot["static_resources"]
    listener = res["listeners"][0]
    res["listeners"] = [listener]
    listener["address"]["socket_address"]["port_value"] = listen
    hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
    for log in hcm.get("access_log", []):
        log["typed_config"]["path"] = access_log
    vhost = hcm["route_config"]["virtual_hosts"][0]
    fake = next(r for r in vhost["routes"] if r.get("name") == "fake")
    fake["match"].pop("headers", None)
    fake.pop("request_headers_to_remove", None)
    vhost["routes"] = [fake]
    res["clusters"] = [c for c in res["clusters"] if c["name"] != "tollgate_admin"]
    return boot


def plain_bootstrap(tollgate: dict[str, Any], listen: int, admin: int, access_log: str) -> dict[str, Any]:
    """Plain Envoy: the base without the ext_proc filter and its cluster."""
    boot = _bootstrap_base(tollgate, listen, admin, access_log)
    res = boot["static_resources"]
    hcm = res["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    hcm["http_filters"] = [f for f in hcm["http_filters"] if f["name"] != "envoy.filters.http.ext_proc"]
    res["clusters"] = [c for c in res["clusters"] if c["name"] != "tollgate_extproc"]
    return boot


def floor_bootstrap(tollgate: dict[str, Any], listen: int, admin: int, access_log: str,
                    extproc_port: int) -> dict[str, Any]:
    """The floor's Envoy: the base with Tollgate's ext_proc filter (processing modes, timeouts,
    metadata options) and cluster (HTTP/2 options, circuit breakers, health checks) untouched,
    its one endpoint the no-op ext_proc's port."""
    boot = _bootstrap_base(tollgate, listen, admin, access_log)
    cluster = next(c for c in boot["static_resources"]["clusters"] if c["name"] == "tollgate_extproc")
    lb = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]
    first = copy.deepcopy(lb[0])
    first["endpoint"]["address"]["socket_address"]["port_value"] = extproc_port
    cluster["load_assignment"]["endpoints"][0]["lb_endpoints"] = [first]
    return boot


def start_envoy(name: str, boot: dict[str, Any], run_dir: Path) -> Proc:
    path = run_dir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(boot, sort_keys=False))
    return Proc(name, [envoy_binary(), "-c", str(path), "--disable-hot-restart", "--log-level", "warn",
                       "--concurrency", ENVOY_CONCURRENCY, "--file-flush-interval-msec", "100"],
                log_path=run_dir / f"{name}.log").start()


def wait_envoy_ready(admin: int, listen: int, proc: Proc, timeout: float = 30.0, extproc: bool = False) -> None:
    """Ready when live, listening, and (with `extproc`) its ext_proc endpoint passes health checks."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.alive():
            raise RuntimeError(f"{proc.name} exited; see {proc.log_path}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{admin}/ready", timeout=2) as r:
                ready = r.status == 200
            if ready and extproc:
                with urllib.request.urlopen(f"http://127.0.0.1:{admin}/clusters", timeout=2) as r:
                    ready = any(line.startswith("tollgate_extproc::") and line.endswith("::health_flags::healthy")
                                for line in r.read().decode().splitlines())
            if ready:
                wait_for_port(listen, timeout=max(0.1, deadline - time.monotonic()), proc=proc)
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"{proc.name} not ready")


def envoy_stats(admin: int) -> dict[str, int]:
    with urllib.request.urlopen(f"http://127.0.0.1:{admin}/stats", timeout=5) as r:
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        name, _, value = line.partition(": ")
        if value.strip().isdigit():
            out[name] = int(value)
    return out


def proc_mem(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM in kB from /proc/<pid>/status."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(rest.split()[0])
    return out


def mem_sample(t: Target, at: str) -> dict[str, Any]:
    """The target's ext_proc(s) RSS and high-water mark, summed over its processes, in kB."""
    per = [proc_mem(p.pid) for p in t.roles["extproc"]]
    return {"at": at, "requests": t.wrk_requests + t.streams, "VmRSS": sum(m["VmRSS"] for m in per),
            "VmHWM": sum(m["VmHWM"] for m in per), "per_process": per}


def cpu_seconds(pid: int, tid: int | None = None) -> float:
    """utime + stime of a process (or of its thread `tid`), in seconds."""
    with open(f"/proc/{pid}/stat" if tid is None else f"/proc/{pid}/task/{tid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_by_role(t: Target) -> dict[str, float]:
    return {role: sum(cpu_seconds(p.pid) for p in ps) for role, ps in t.roles.items()}


def main_thread_seconds(t: Target) -> float:
    """CPU of the ext_procs' main threads alone (the thread whose id is the process's): the event
    loop, with all of Tollgate's Python and grpc.aio's Cython around it. The rest of an ext_proc's
    CPU is grpc core's own threads (its poller, the EventEngine's workers)."""
    total = 0.0
    for p in t.roles.get("extproc", []):
        try:
            total += cpu_seconds(p.pid, p.pid)
        except OSError:
            continue
    return total


def other_cpu_sample(ours: set[int]) -> dict[tuple[int, int], int]:
    """CPU ticks so far of every process on the machine that is not ours, keyed by (pid, start
    time). The difference of two samples is a noise gauge: other jobs on a shared 2-core machine
    skew every number here."""
    out = {}
    for d in os.listdir("/proc"):
        if not d.isdigit() or int(d) in ours:
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                fields = f.read().rpartition(")")[2].split()
            out[(int(d), int(fields[19]))] = int(fields[11]) + int(fields[12])
        except (OSError, IndexError, ValueError):
            continue
    return out


def other_cpu_pct(before: dict[tuple[int, int], int], after: dict[tuple[int, int], int], wall: float) -> float:
    """% of one core used by other processes between two samples (those that exited in between
    are not counted, so this is a lower bound)."""
    ticks = sum(t - before.get(k, 0) for k, t in after.items())
    return round(100 * ticks / os.sysconf("SC_CLK_TCK") / wall, 1)


def steal_ticks() -> int:
    """CPU time the hypervisor gave other guests while this VM wanted it (/proc/stat `steal`),
    all CPUs, in clock ticks: on a VM the third noise gauge, invisible to `other_cpu_sample`."""
    with open("/proc/stat") as f:
        fields = f.readline().split()
    return int(fields[8]) if len(fields) > 8 else 0


def stop_leftovers(run_dir: Path) -> None:
    """Processes a SIGKILLed earlier run left (its PID files), before the run dir is wiped.
    Raises RuntimeError if that run is still going."""
    for pids in [run_dir / "pids", *run_dir.glob("*/pids")]:
        for left in PidFile(pids).stop_leftovers():
            log(f"stopped {left.name} (pid {left.pid}), left running by an earlier run")


# --------------------------------------------------------------------------------------------
# wrk
# --------------------------------------------------------------------------------------------


def wrk_script(path: Path, headers: dict[str, str]) -> Path:
    lines = "\n".join(f'wrk.headers["{k}"] = "{v}"' for k, v in headers.items())
    path.write_text(WRK_LUA.replace("%BODY%", BODY).replace("%HEADERS%", lines))
    return path


@dataclass
class Wrk:
    binary: str
    running: list[subprocess.Popen] = field(default_factory=list)

    def run(self, url: str, conns: int, seconds: float, script: Path) -> dict[str, Any]:
        seconds = max(1, round(seconds))  # wrk takes whole seconds
        argv = [self.binary, "-t1", f"-c{conns}", f"-d{seconds}s", "--latency", "--timeout", "5s",
                "-s", str(script), url]
        p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                             start_new_session=True, text=True)
        self.running.append(p)
        try:
            out, _ = p.communicate(timeout=seconds + 30)
        finally:
            self.stop(p)
            self.running.remove(p)
        if p.returncode != 0:
            raise RuntimeError(f"wrk failed ({p.returncode}):\n{out}")
        line = next((ln for ln in out.splitlines() if ln.startswith("BENCH_JSON ")), None)
        if line is None:
            raise RuntimeError(f"wrk printed no summary:\n{out}")
        r = json.loads(line[len("BENCH_JSON "):])
        secs = r["duration_us"] / 1e6
        errors = r["connect_errors"] + r["read_errors"] + r["write_errors"] + r["timeouts"]
        return {
            "conns": conns,
            "seconds": round(secs, 2),
            "requests": int(r["requests"]),
            "rps": round(r["requests"] / secs, 1) if secs else 0.0,
            "p50_ms": r["p50_us"] / 1000,
            "p90_ms": r["p90_us"] / 1000,
            "p99_ms": r["p99_us"] / 1000,
            "mean_ms": round(r["mean_us"] / 1000, 3),
            "max_ms": r["max_us"] / 1000,
            "non_2xx_3xx": int(r["non_2xx_3xx"]),
            "socket_errors": int(errors),
        }

    @staticmethod
    def stop(p: subprocess.Popen) -> None:
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait()

    def stop_all(self) -> None:
        for p in list(self.running):
            self.stop(p)


# --------------------------------------------------------------------------------------------
# streaming client
# --------------------------------------------------------------------------------------------


async def one_stream(client: Any, t: Target) -> dict[str, float]:
    headers = {**t.headers, "content-type": "application/json",
               "x-fake-token-latency-ms": str(TOKEN_LATENCY_MS), "x-fake-output-tokens": str(STREAM_OUTPUT_TOKENS)}
    t0 = time.perf_counter()
    first = None
    buf = b""
    async with client.stream("POST", t.url, content=STREAM_BODY, headers=headers) as r:
        if r.status_code != 200:
            body = await r.aread()
            raise RuntimeError(f"stream to {t.name}: HTTP {r.status_code}: {body[:300]!r}")
        if t.gateway and "x-tollgate-request-id" not in r.headers:
            raise RuntimeError(f"stream through {t.name} without x-tollgate-request-id")
        async for chunk in r.aiter_raw():
            buf += chunk
            if first is None and b"data:" in buf:
                first = time.perf_counter()
    last = time.perf_counter()
    t.streams += 1
    text = buf.decode()
    words = text.count('"content":"')
    if b"data: [DONE]" not in buf or words < STREAM_OUTPUT_TOKENS:
        raise RuntimeError(f"incomplete stream from {t.name}: {text[-300:]!r}")
    assert first is not None
    return {"ttft_ms": (first - t0) * 1000, "total_ms": (last - t0) * 1000}


async def stream_bench(targets: list[Target], n: int, warmup: int) -> dict[str, Any]:
    import httpx

    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    clients = {t.name: httpx.AsyncClient(timeout=30, limits=limits) for t in targets}
    samples: dict[str, list[dict[str, float]]] = {t.name: [] for t in targets}
    try:
        for i in range(warmup + n):
            for t in targets:
                s = await one_stream(clients[t.name], t)
                if i >= warmup:
                    samples[t.name].append(s)
    finally:
        for c in clients.values():
            await c.aclose()
    out: dict[str, Any] = {}
    for name, ss in samples.items():
        ttft = [s["ttft_ms"] for s in ss]
        total = [s["total_ms"] for s in ss]
        out[name] = {"n": len(ss), "ttft_p50_ms": round(statistics.median(ttft), 2),
                     "ttft_p95_ms": round(pct(ttft, 95), 2), "total_p50_ms": round(statistics.median(total), 2),
                     "total_p95_ms": round(pct(total, 95), 2)}
    return out


def pct(values: list[float], p: float) -> float:
    """Nearest-rank percentile."""
    s = sorted(values)
    k = max(0, min(len(s) - 1, int(round(p / 100 * len(s) + 0.5)) - 1))
    return s[k]


# --------------------------------------------------------------------------------------------
# checks
# --------------------------------------------------------------------------------------------


def probe(t: Target) -> dict[str, str]:
    """One non-streamed request; proves which path it took (what authorization reached the fake)."""
    req = urllib.request.Request(t.url, data=BODY.encode(), method="POST",
                                 headers={"content-type": "application/json", **t.headers})
    with urllib.request.urlopen(req, timeout=10) as r:
        h = {k.lower(): v for k, v in r.headers.items()}
        body = json.loads(r.read())
    problems = []
    if t.cache and h.get("x-tollgate-cache") == "hit":
        pass  # answered from the cache: the provider never saw it
    elif h.get("x-fake-authorization") != t.expect_auth:
        problems.append(f"provider saw authorization {h.get('x-fake-authorization')!r}, expected {t.expect_auth!r}")
    if t.gateway:
        for name in ("x-tollgate-request-id", "x-tollgate-cost-usd"):
            if name not in h:
                problems.append(f"missing {name}")
    elif any(k.startswith("x-tollgate-") for k in h):
        problems.append("x-tollgate-* headers from a target without Tollgate")
    if not body.get("usage"):
        problems.append("no usage in the response")
    if problems:
        raise RuntimeError(f"probe {t.name} ({t.url}): " + "; ".join(problems))
    return {k: v for k, v in h.items() if k.startswith("x-tollgate-")}


def attribution_summary(paths: list[Path]) -> dict[str, Any]:
    decisions: dict[str, int] = {}
    shadow = 0
    cut_off = 0
    statuses: dict[str, int] = {}
    n = 0
    cost = 0.0
    budgets: dict[str, int] = {}
    cache: dict[str, int] = {}  # hit / miss / skip / off
    for path in paths:
        with open(path, "rb") as f:
            for line in f:
                if not line.startswith(b"{"):
                    continue
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue
                if "decision" not in rec:
                    continue
                n += 1
                d = str(rec.get("decision"))
                decisions[d] = decisions.get(d, 0) + 1
                statuses[str(rec.get("status"))] = statuses.get(str(rec.get("status")), 0) + 1
                if rec.get("status") == 0 and rec.get("complete") is False:
                    cut_off += 1
                if rec.get("shadow_blocked"):
                    shadow += 1
                if isinstance(rec.get("cost_usd"), (int, float)):
                    cost += rec["cost_usd"]
                k = str(len(rec.get("budgets") or []))
                budgets[k] = budgets.get(k, 0) + 1
                c = str(rec.get("cache"))
                cache[c] = cache.get(c, 0) + 1
    return {"records": n, "decisions": decisions, "statuses": statuses, "shadow_blocked": shadow,
            "cut_off": cut_off, "cost_usd": round(cost, 4), "records_by_budget_count": budgets, "cache": cache}


def check_target(t: Target, stats0: dict[str, int], stats1: dict[str, int], problems: list[str]) -> dict[str, Any]:
    """Did the requests go where they should? Envoy's counters for anything with an ext_proc, the
    attribution records for Tollgate. wrk drops the requests in flight when it stops (up to one
    per connection per run): Envoy sees them as client resets, the ext_proc records them as
    status 0, incomplete."""
    expected = t.wrk_requests + t.streams
    slack = t.cut_off + 4
    out: dict[str, Any] = {"wrk_requests": t.wrk_requests, "streams": t.streams, "cut_off_allowance": t.cut_off}
    delta = {k: stats1.get(k, 0) - stats0.get(k, 0) for k in stats1
             if k.startswith("cluster.provider_fake.upstream_rq_") or ".ext_proc." in k
             or k.startswith("http.tollgate.downstream_rq_")}
    delta = {k: v for k, v in delta.items() if v}
    out["envoy_stats_delta"] = delta
    streams = delta.get("http.tollgate.ext_proc.streams_started", 0)
    up_2xx = delta.get("cluster.provider_fake.upstream_rq_2xx", 0)
    refused = delta.get("http.tollgate.downstream_rq_4xx", 0) + delta.get("http.tollgate.downstream_rq_5xx", 0)
    if refused:
        problems.append(f"{t.name}: Envoy answered {refused} requests with 4xx/5xx")
    if expected == 0 or not 0 <= streams - expected <= slack:
        problems.append(f"{t.name}: ext_proc streams {streams} vs {expected} requests (+ up to {t.cut_off} cut off)")
    up_want = 0 if t.cache else expected  # cache hits never reach the provider
    if not 0 <= up_2xx - up_want <= slack:
        problems.append(f"{t.name}: upstream 2xx {up_2xx} vs {up_want} expected (+ up to {t.cut_off} cut off)")
    if not t.gateway:
        return out
    att = attribution_summary(t.attribution_logs)
    out["attribution"] = att
    want = expected + (2 if t.cache else 1)  # + the probe(s) before the loads (cachehit: its miss, then a hit)
    if not 0 <= att["records"] - want <= slack:
        problems.append(f"{t.name}: attribution records {att['records']}, expected {want} (+ up to {t.cut_off} cut off)")
    not_allowed = {d: c for d, c in att["decisions"].items() if d != "allowed"}
    if not_allowed:
        problems.append(f"{t.name}: decisions other than allowed: {not_allowed}")
    if att["cut_off"] > t.cut_off:
        problems.append(f"{t.name}: {att['cut_off']} requests aborted by the client, more than wrk's {t.cut_off} in flight")
    misses = 1 + (1 if t.streams else 0)  # the first probe, and the first stream (a streamed request is its own entry)
    if t.cache and att["cache"].get("miss", 0) > misses:
        problems.append(f"{t.name}: {att['cache']['miss']} cache misses, expected {misses} at most")
    bad_status = {s: c for s, c in att["statuses"].items() if not s.startswith("2") and s != "0"}
    if bad_status:
        problems.append(f"{t.name}: non-2xx statuses in attribution: {bad_status}")
    return out


def floorredis_check(t: Target, problems: list[str], timeout: float = 10.0) -> dict[str, int]:
    """floorredis (or floormeter) did its Redis work: one settle rolled up per request Envoy sent
    it, no lease left."""
    import redis as sync_redis

    r = sync_redis.Redis(port=t.roles["redis"][0].ports[0])
    deadline = time.monotonic() + timeout
    while True:  # the last settles finish after their responses
        rolled = sum(int(v) for key in r.scan_iter(match="floor:usage:*")  # a day's rollup (floormeter's: today's)
                     for k, v in r.hgetall(key).items() if k.startswith(b"requests|"))
        leases = sum(r.zcard(k) for k in r.scan_iter(match="floor:b:*:leases"))
        if (rolled > t.wrk_requests and not leases) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    r.close()
    expected = t.wrk_requests + 1  # + the probe; wrk does not count the ones it cut off, which may have settled
    if not 0 <= rolled - expected <= t.cut_off + 4 or leases:
        problems.append(f"{t.name}: {rolled} settles rolled up for {expected} requests, {leases} leases left")
    out = {"settles_rolled_up": rolled, "leases_left": leases}
    if t.attribution_logs:  # floormeter: a record filed for every request it settled
        out["records"] = records = sum(p.read_bytes().count(b"\n") for p in t.attribution_logs if p.exists())
        if records != rolled:
            problems.append(f"{t.name}: {records} records filed for {rolled} settles")
    return out


def leases_left(t: Target, timeout: float = 10.0) -> list[str]:
    """What still pins money in the stack's Redis once nothing is in flight ([] = books closed)."""
    from tests.accounting import wait_closed

    assert t.stack is not None and t.stack.redis_url is not None
    return wait_closed(t.stack.redis_url, timeout=timeout, outbox=t.stack.run_dir / "state")


# --------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------


def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


_SUMMED = ("seconds", "requests", "non_2xx_3xx", "socket_errors")  # counts over all rounds


def median_of_rounds(rs: list[dict[str, Any]]) -> dict[str, Any]:
    """One wrk measurement from a target's rounds: each rate, latency and CPU figure the median of
    the rounds' (each field on its own, so a p99 is not the p99 of the round with the median
    req/s), counts summed, the longest max; the rounds themselves kept under `rounds`."""
    if len(rs) == 1:
        return rs[0]
    out: dict[str, Any] = {}
    for k, v in rs[0].items():
        if k in _SUMMED:
            out[k] = sum(r[k] for r in rs)
        elif k == "max_ms":
            out[k] = max(r[k] for r in rs)
        elif isinstance(v, dict):
            out[k] = {role: round(statistics.median(r[k][role] for r in rs), 1) for role in v}
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[k] = round(statistics.median(r[k] for r in rs), 3)
        else:
            out[k] = v
    out["rounds"] = rs
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.bench", description=__doc__.splitlines()[0])
    ap.add_argument("--duration", type=int, default=5, help="seconds per measured wrk run")
    ap.add_argument("--warmup", type=int, default=1, help="seconds of wrk warm-up before each run (0: none)")
    ap.add_argument("--conns", default="32,8,1", help="wrk connection counts")
    ap.add_argument("--rounds", type=int, default=3,
                    help="measure every target at every connection count this many times, interleaved; "
                         "the tables show the medians")
    ap.add_argument("--streams", type=int, default=30, help="streamed requests per streaming target")
    ap.add_argument("--stream-warmup", type=int, default=5, help="unmeasured streamed requests per target first")
    ap.add_argument("--targets", default=",".join(ALL_TARGETS), help=f"a subset of {','.join(ALL_TARGETS)}")
    ap.add_argument("--long", action="store_true",
                    help="also run --long-requests requests against tollgate and compare its RSS before and after")
    ap.add_argument("--long-requests", type=int, default=100_000)
    ap.add_argument("--long-targets", default="tollgate",
                    help="the targets --long runs against, one after the other (those with an ext_proc)")
    ap.add_argument("--quick", action="store_true",
                    help="a few seconds of load, for the test suite: 1 s runs, no warm-up, 32 and 1 conns, 5 streams")
    ap.add_argument("--policies", default=str(REPO / "policies"))
    ap.add_argument("--run-dir", default=str(REPO / ".run" / "bench"))
    ap.add_argument("--json", default=str(REPO / ".run" / "bench.json"))
    args = ap.parse_args(argv)
    if args.quick:
        args.duration, args.warmup, args.conns, args.streams, args.stream_warmup = 1, 0, "32,1", 5, 1
        args.rounds = min(args.rounds, 2)  # the medians' code path, kept working
    if args.rounds < 1:
        ap.error("--rounds must be at least 1")
    names = [n.strip() for n in args.targets.split(",") if n.strip()]
    unknown = [n for n in names if n not in ALL_TARGETS]
    if unknown:
        ap.error(f"unknown targets {unknown}; choose from {','.join(ALL_TARGETS)}")
    names = [n for n in ALL_TARGETS if n in names]
    conn_list = [int(c) for c in args.conns.split(",")]

    wrk_bin = shutil.which("wrk")
    if wrk_bin is None:
        print("bench: wrk not found (apt-get install wrk, or `make bench` installs it)", file=sys.stderr)
        return 2
    run_dir = Path(args.run_dir).resolve()
    if run_dir.exists():
        stop_leftovers(run_dir)
    shutil.rmtree(run_dir, ignore_errors=True)  # fresh Redis: budgets start at zero
    run_dir.mkdir(parents=True)
    # Explicitly: a shell that starts us in the background leaves SIGINT ignored.
    signal.signal(signal.SIGTERM, _on_sigterm)
    signal.signal(signal.SIGINT, signal.default_int_handler)

    wrk = Wrk(wrk_bin)
    stacks: list[Stack] = []
    extra: list[Proc] = []  # plain and the floors: Envoys, the no-op ext_procs, the floors' Redis
    extra_pids = PidFile(run_dir / "pids")
    targets: dict[str, Target] = {}
    results: dict[str, Any] = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "cpus": os.cpu_count(),
        "config": {"duration_s": args.duration, "warmup_s": args.warmup, "conns": conn_list, "targets": names,
                   "rounds": args.rounds,
                   "streams": args.streams, "stream_warmup": args.stream_warmup, "quick": args.quick,
                   "long": args.long, "long_requests": args.long_requests if args.long else None,
                   "long_targets": args.long_targets.split(",") if args.long else None,
                   "token_latency_ms": TOKEN_LATENCY_MS, "stream_output_tokens": STREAM_OUTPUT_TOKENS,
                   "body": json.loads(BODY), "envoy_concurrency": int(ENVOY_CONCURRENCY)},
        "problems": []}
    problems: list[str] = results["problems"]
    t_start = time.monotonic()
    try:
        # ---- 0. start everything ---------------------------------------------------------
        py = sys.executable
        api_key = {"authorization": f"Bearer {CLIENT_KEY}"}
        log("starting the Tollgate stack (Redis, fake provider, ext_proc, Envoy) ...")
        stack = start_stack(Path(args.policies), run_dir / "tollgate")
        stacks.append(stack)
        tollgate = tollgate_target("tollgate", stack, api_key)
        fake_proc = tollgate.roles["fake"][0]
        rendered = yaml.safe_load((stack.run_dir / "envoy.yaml").read_text())
        if "direct" in names:
            targets["direct"] = Target("direct", f"http://127.0.0.1:{stack.ports.fake}/v1/chat/completions", api_key,
                                       f"Bearer {CLIENT_KEY}", False, {"fake": [fake_proc]})
        if "plain" in names:
            listen, admin = free_port(), free_port()
            plain = start_envoy("plain-envoy", plain_bootstrap(rendered, listen, admin, str(run_dir / "plain-access.log")),
                                run_dir)
            extra.append(plain)
            extra_pids.write(extra)
            wait_envoy_ready(admin, listen, plain)
            targets["plain"] = Target("plain", f"http://127.0.0.1:{listen}/v1/chat/completions", api_key,
                                      f"Bearer {CLIENT_KEY}", False, {"envoy": [plain], "fake": [fake_proc]}, admin=admin)
        def start_floor(name: str, extproc_args: list[str], roles: dict[str, list[Proc]]) -> None:
            """A no-op ext_proc (tests/bench_floor.py) and an Envoy with Tollgate's ext_proc filter in front."""
            port, listen, admin = free_port(), free_port(), free_port()
            pythonpath = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
            noop = Proc(f"{name}-extproc", [py, "-m", "tests.bench_floor", "--port", str(port), *extproc_args],
                        log_path=run_dir / f"{name}-extproc.log", env={"PYTHONPATH": pythonpath}, ports=[port]).start()
            extra.append(noop)
            extra_pids.write(extra)
            noop.wait_ready()
            envoy = start_envoy(f"{name}-envoy", floor_bootstrap(rendered, listen, admin, str(run_dir / f"{name}-access.log"),
                                                                 port), run_dir)
            extra.append(envoy)
            extra_pids.write(extra)
            wait_envoy_ready(admin, listen, envoy, extproc=True)
            targets[name] = Target(name, f"http://127.0.0.1:{listen}/v1/chat/completions", api_key, f"Bearer {CLIENT_KEY}",
                                   False, {"extproc": [noop], "envoy": [envoy], **roles, "fake": [fake_proc]}, admin=admin)

        if "floor" in names:
            log("starting the floor (no-op ext_proc, Envoy with Tollgate's ext_proc filter) ...")
            start_floor("floor", [], {})
        def start_redis_floor(name: str, extproc_args: list[str]) -> None:
            """A floor with a Redis of its own for the budget scripts, on a Unix socket as
            Tollgate's stack has it (extproc/stack.py)."""
            redis, url = local_redis(free_port(), run_dir / f"{name}-redis")
            redis.start()
            extra.append(redis)
            extra_pids.write(extra)
            redis.wait_ready()
            start_floor(name, ["--redis-url", url, *extproc_args], {"redis": [redis]})

        if "floorredis" in names:
            log("starting the floor with Redis (the no-op plus Tollgate's two budget scripts, its own Redis) ...")
            start_redis_floor("floorredis", [])
        if "floormeter" in names:
            log("starting the metering floor (floorredis plus the least of metering, its own Redis) ...")
            records = run_dir / "floormeter-records.jsonl"
            records.unlink(missing_ok=True)  # a run directory is reused: count this run's records only
            start_redis_floor("floormeter", ["--meter", str(records)])
            targets["floormeter"].attribution_logs = [records]
        if "tollgate" in names:
            targets["tollgate"] = tollgate
        if "heavy" in names:
            log("starting the heavy-policy stack (JWT, five budgets, access rules) ...")
            ttl = 6 * 3600 + (int(args.long_requests / 200) if args.long else 0)
            pol, jwks, token = heavy_policy(Path(args.policies), run_dir, ttl)
            s = start_stack(pol, run_dir / "heavy", env={"TOLLGATE_BENCH_JWKS": str(jwks)})
            stacks.append(s)
            targets["heavy"] = tollgate_target("heavy", s, {JWT_HEADER: token})
        if "workers2" in names:
            log("starting the two-ext_proc stack ...")
            s = start_stack(Path(args.policies), run_dir / "workers2", extprocs=2)
            stacks.append(s)
            targets["workers2"] = tollgate_target("workers2", s, api_key)
        if "cachehit" in names:
            log("starting the cache-hit stack ...")
            s, targets["cachehit"] = cache_hit_target(Path(args.policies), run_dir / "cachehit")
            stacks.append(s)
        order = [targets[n] for n in names]
        for t in order:
            t.script = wrk_script(run_dir / f"{t.name}.lua", t.headers)
            probe(t)
            if t.cache and probe(t).get("x-tollgate-cache") != "hit":  # the first wrote the entry
                raise RuntimeError(f"probe {t.name}: the repeated request was not a cache hit")
        log(f"ready in {time.monotonic() - t_start:.1f}s: " + ", ".join(f"{t.name} {t.url}" for t in order))

        all_procs = {p.pid: p for t in [*order, tollgate] for p in t.procs} | {p.pid: p for p in extra}
        for s in stacks:
            all_procs |= {p.pid: p for p in s.procs}
        ours = {os.getpid(), *all_procs}
        results["targets"] = {t.name: {"url": t.url, "gateway": t.gateway,
                                       "processes": {r: [{"name": p.name, "pid": p.pid} for p in ps]
                                                     for r, ps in t.roles.items()}} for t in order}
        results["loadavg_before"] = os.getloadavg()
        memory: dict[str, list[dict[str, Any]]] = {t.name: [mem_sample(t, "start")] for t in order if "extproc" in t.roles}
        stats0 = {t.name: envoy_stats(t.admin) for t in order if t.admin is not None}
        cpu0 = {t.name: cpu_by_role(t) for t in order}

        # ---- 1. non-streamed throughput and latency ----------------------------------------
        rounds: dict[str, list[dict[str, Any]]] = {}
        for rnd, conns, t in itertools.product(range(args.rounds), conn_list, order):
            key = f"{t.name}@{conns}"
            assert t.script is not None
            if args.warmup > 0:
                w = wrk.run(t.url, conns, args.warmup, t.script)
                t.wrk_requests += w["requests"]
                t.cut_off += conns
                if w["non_2xx_3xx"] or w["socket_errors"]:
                    problems.append(f"warm-up {key}: {w['non_2xx_3xx']} non-2xx, {w['socket_errors']} socket errors")
                if t.name in memory and len(memory[t.name]) == 1:
                    memory[t.name].append(mem_sample(t, f"after warm-up {key}"))
            others = set(all_procs) - {p.pid for p in t.procs}
            cpu_a, idle_a = cpu_by_role(t), sum(cpu_seconds(pid) for pid in others)
            main_a = main_thread_seconds(t)
            other_a, steal_a, wall_a = other_cpu_sample(ours), steal_ticks(), time.monotonic()
            r = wrk.run(t.url, conns, args.duration, t.script)
            wall = time.monotonic() - wall_a
            r["other_procs_cpu_pct"] = other_cpu_pct(other_a, other_cpu_sample(ours), wall)
            r["steal_cpu_pct"] = round(100 * (steal_ticks() - steal_a) / os.sysconf("SC_CLK_TCK") / wall, 1)
            r["idle_ours_cpu_pct"] = round(100 * (sum(cpu_seconds(pid) for pid in others) - idle_a) / wall, 1)
            cpu_b = cpu_by_role(t)
            r["cpu_us_per_req"] = {role: round((cpu_b[role] - cpu_a[role]) / max(1, r["requests"]) * 1e6, 1)
                                   for role in cpu_b}
            if "extproc" in cpu_b:
                r["extproc_main_thread_us_per_req"] = round(
                    (main_thread_seconds(t) - main_a) / max(1, r["requests"]) * 1e6, 1)
            t.wrk_requests += r["requests"]
            t.cut_off += conns
            rounds.setdefault(key, []).append(r)
            if t.name in memory:
                memory[t.name].append(mem_sample(t, f"after {key}"))
            if r["non_2xx_3xx"] or r["socket_errors"]:
                problems.append(f"{key}: {r['non_2xx_3xx']} non-2xx/3xx, {r['socket_errors']} socket errors")
            cpu = "  ".join(f"{role} {v:.0f}" for role, v in r["cpu_us_per_req"].items())
            log(f"wrk {key:12s} round {rnd + 1}/{args.rounds} {r['rps']:>9,.0f} rps  p50 {r['p50_ms']:7.3f}  "
                f"p90 {r['p90_ms']:7.3f}  p99 {r['p99_ms']:7.3f} ms  errors {r['non_2xx_3xx'] + r['socket_errors']}  "
                f"CPU us/req: {cpu}  others {r['other_procs_cpu_pct']}%  steal {r['steal_cpu_pct']}%")
        wrk_results = {key: median_of_rounds(rs) for key, rs in rounds.items()}
        results["wrk"] = wrk_results

        # ---- 2. streaming time to first token ------------------------------------------------
        streamed = [t for t in order if t.name in STREAM_TARGETS]
        if streamed and args.streams > 0:
            log(f"streaming: {args.streams} sequential requests per target ({', '.join(t.name for t in streamed)}), "
                f"{STREAM_OUTPUT_TOKENS} tokens {TOKEN_LATENCY_MS} ms apart ...")
            results["stream"] = asyncio.run(stream_bench(streamed, args.streams, warmup=args.stream_warmup))
        for name, samples in memory.items():
            samples.append(mem_sample(targets[name], "end"))

        # ---- 3. memory: the long run ---------------------------------------------------------
        if args.long:
            results["long"] = {}
            for name in [n.strip() for n in args.long_targets.split(",") if n.strip()]:
                if name not in targets or "extproc" not in targets[name].roles:
                    problems.append(f"--long-targets: {name!r} is not a running target with an ext_proc")
                    continue
                results["long"][name] = long_run(wrk, targets[name], args.long_requests,
                                                 wrk_results.get(f"{name}@{LONG_CONNS}", {}).get("rps"), problems)
        results["memory_kb"] = memory
        results["cpu_seconds"] = {t.name: {r: round(v - cpu0[t.name][r], 2) for r, v in cpu_by_role(t).items()}
                                  for t in order}

        # ---- 4. checks -----------------------------------------------------------------------
        time.sleep(0.5)  # attribution lines and Envoy's counters settle
        checks: dict[str, Any] = {}
        for t in order:
            if t.admin is not None and "extproc" in t.roles:
                checks[t.name] = check_target(t, stats0[t.name], envoy_stats(t.admin), problems)
        for name in ("floorredis", "floormeter"):
            if name in targets:
                checks[name]["redis"] = floorredis_check(targets[name], problems)
        results["checks"] = checks
        results["leases_left"] = {t.name: leases_left(t) for t in order if t.gateway}
        results["probe_after"] = {t.name: probe(t) for t in order if t.gateway}
        for t in order:
            for p in t.procs:
                if not p.alive():
                    problems.append(f"{t.name}: {p.name} died during the run")
        results["loadavg_after"] = os.getloadavg()
    except KeyboardInterrupt:
        log("interrupted: stopping everything")
        results["problems"].append("interrupted")
        return 130
    finally:
        wrk.stop_all()
        for p in reversed(extra):
            p.stop()
        extra_pids.remove()
        for s in reversed(stacks):
            s.stop()
        results["elapsed_s"] = round(time.monotonic() - t_start, 1)
        summarize(results)
        out = Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2) + "\n")
        log(f"wrote {out} ({results['elapsed_s']} s)")
    print_report(results)
    if problems:
        log("FAILED sanity checks:\n  " + "\n  ".join(problems))
        return 1
    return 0


def long_run(wrk: Wrk, t: Target, want: int, rps_guess: float | None, problems: list[str]) -> dict[str, Any]:
    """`want` requests at 32 connections in runs of at most a minute; the ext_proc's RSS before
    and after."""
    assert t.script is not None
    log(f"long run: {want:,} requests against {t.name} at {LONG_CONNS} connections ...")
    before = mem_sample(t, "before long run")
    done, runs, t0 = 0, [], time.monotonic()
    guess = rps_guess or 500.0
    while done < want:
        secs = min(60, max(1, math.ceil((want - done) / guess * 1.05)))
        r = wrk.run(t.url, LONG_CONNS, secs, t.script)
        runs.append({k: r[k] for k in ("seconds", "requests", "rps", "p50_ms", "p99_ms", "non_2xx_3xx", "socket_errors")})
        done += r["requests"]
        t.wrk_requests += r["requests"]
        t.cut_off += LONG_CONNS
        guess = r["rps"] or guess
        if r["non_2xx_3xx"] or r["socket_errors"]:
            problems.append(f"long run: {r['non_2xx_3xx']} non-2xx/3xx, {r['socket_errors']} socket errors")
        if r["requests"] == 0:
            problems.append("long run: wrk made no requests")
            break
    after = mem_sample(t, "after long run")
    log(f"long run: {done:,} requests in {time.monotonic() - t0:.0f}s; RSS {before['VmRSS'] / 1024:.1f} -> "
        f"{after['VmRSS'] / 1024:.1f} MB")
    return {"requests": done, "seconds": round(time.monotonic() - t0, 1), "runs": runs, "before": before, "after": after}


# --------------------------------------------------------------------------------------------
# summary
# --------------------------------------------------------------------------------------------


def summarize(results: dict[str, Any]) -> None:
    """Ratios against plain and the floor, the RSS check, and the goals, added to the results.

    With several rounds, each ratio and each goal wrk measures is the median of the rounds' own
    (a round's targets ran one after the other, under the same conditions), not a ratio of the
    medians, which can pair one round's floor with another round's Tollgate."""
    w = results.get("wrk", {})
    n = results["config"].get("rounds", 1)
    by_round = [{k: r["rounds"][i] for k, r in w.items()} for i in range(n)] if n > 1 else [w]
    results["ratios"] = _median_tree([_ratios(b) for b in by_round])
    s = results.get("stream")
    keys = ("ttft_p50_ms", "ttft_p95_ms", "total_p50_ms", "total_p95_ms")
    if s and "plain" in s:
        results["stream_minus_plain_ms"] = {
            name: {k: round(v[k] - s["plain"][k], 2) for k in keys} for name, v in s.items() if name != "plain"}
    if s and "floor" in s and "tollgate" in s:  # what Tollgate's own work adds to a stream
        results["stream_minus_floor_ms"] = {"tollgate": {k: round(s["tollgate"][k] - s["floor"][k], 2) for k in keys}}
    results["rss_check"] = rss_check(results)
    results["goals"] = goals(results, by_round)


def _median_tree(trees: list[Any]) -> Any:
    """The leaf-wise median of equally shaped dicts of numbers."""
    first = trees[0]
    if isinstance(first, dict):
        return {k: _median_tree([t[k] for t in trees if k in t]) for k in first}
    if isinstance(first, (int, float)) and not isinstance(first, bool):
        return round(statistics.median(trees), 3)
    return first


def _ratios(w: dict[str, Any]) -> dict[str, dict[str, Any]]:
    ratios: dict[str, dict[str, Any]] = {}
    for key, r in w.items():
        target, _, conns = key.partition("@")
        row: dict[str, Any] = {}
        for base in ("plain", "floor"):
            b = w.get(f"{base}@{conns}")
            if b is None or base == target:
                continue
            row[f"vs_{base}"] = {"rps": ratio(r["rps"], b["rps"]), "p50": ratio(r["p50_ms"], b["p50_ms"]),
                                 "p99": ratio(r["p99_ms"], b["p99_ms"]),
                                 "added_p50_ms": round(r["p50_ms"] - b["p50_ms"], 3),
                                 "added_p90_ms": round(r["p90_ms"] - b["p90_ms"], 3),
                                 "added_p99_ms": round(r["p99_ms"] - b["p99_ms"], 3)}
        if row:
            ratios.setdefault(target, {})[conns] = row
    return ratios


def rss_check(results: dict[str, Any]) -> dict[str, Any] | None:
    """Tollgate's ext_proc RSS growth: over the --long run, else from the first warm-up to the end."""
    long = (results.get("long") or {}).get("tollgate")
    if long:
        a, b, kind = long["before"], long["after"], f"{long['requests']:,}-request run (--long)"
        n = long["requests"]
    else:
        samples = results.get("memory_kb", {}).get("tollgate")
        if not samples or len(samples) < 3:
            return None
        a, b = samples[1], samples[-1]
        n = b["requests"] - a["requests"]
        kind = f"short check: {n:,} requests after the first run (--long runs 100,000)"
    return {"kind": kind, "long": bool(long), "requests": n, "before_kb": a["VmRSS"], "after_kb": b["VmRSS"],
            "peak_kb": b["VmHWM"], "growth_pct": round(100 * (b["VmRSS"] - a["VmRSS"]) / a["VmRSS"], 1)}


def goals(results: dict[str, Any], by_round: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Issue 14's targets next to what this run measured. Printed, never enforced. A target wrk
    measures is worked out in each round's results (`by_round`: the rounds' wrk results, one
    mapping each) and the median of those is the measured value; with several rounds, each
    round's value is kept under `rounds`."""
    out = []

    def add(goal: str, value: float | None, fmt: str, ok: bool | None, rounds: list[Any] | None = None) -> None:
        row = {"goal": goal, "measured": value, "shown": fmt.format(value) if value is not None else "n/a",
               "fmt": fmt, "met": ok if value is not None else None}
        if rounds is not None:
            row["rounds"] = rounds
        out.append(row)

    def from_wrk(goal: str, fmt: str, met: Callable[[float], bool],
                 value_in: Callable[[dict[str, Any]], float | None]) -> None:
        values = [value_in(w) for w in by_round]
        value = None if None in values else round(statistics.median(values), 3)  # type: ignore[type-var]
        add(goal, value, fmt, value is not None and met(value), values if len(by_round) > 1 else None)

    def get(w: dict[str, Any], target: str, conns: int, k: str) -> Any:
        return w.get(f"{target}@{conns}", {}).get(k)

    def extproc_cpu(w: dict[str, Any], target: str) -> float | None:
        return (get(w, target, 32, "cpu_us_per_req") or {}).get("extproc")

    def added(k: str) -> Callable[[dict[str, Any]], float | None]:
        def value(w: dict[str, Any]) -> float | None:
            a, b = get(w, "tollgate", 1, k), get(w, "floor", 1, k)
            return round(a - b, 3) if a is not None and b is not None else None
        return value

    from_wrk("Tollgate (default policy) req/s at 32 conns >= 0.6x the floor's", "x{:.3f}", lambda v: v >= 0.6,
             lambda w: ratio(get(w, "tollgate", 32, "rps"), get(w, "floor", 32, "rps")))
    from_wrk("Tollgate ext_proc CPU per request <= 1.6x the floor's (32 conns)", "x{:.2f}", lambda v: v <= 1.6,
             lambda w: ratio(extproc_cpu(w, "tollgate"), extproc_cpu(w, "floor")))
    from_wrk("Heavier policy req/s at 32 conns within 15% of the default's", "x{:.3f}", lambda v: v >= 0.85,
             lambda w: ratio(get(w, "heavy", 32, "rps"), get(w, "tollgate", 32, "rps")))
    from_wrk("Added p50 at 1 conn over the floor <= 0.5 ms", "{:+.3f} ms", lambda v: v <= 0.5, added("p50_ms"))
    from_wrk("Added p99 at 1 conn over the floor <= 1.5 ms", "{:+.3f} ms", lambda v: v <= 1.5, added("p99_ms"))
    d = (results.get("stream_minus_plain_ms") or {}).get("tollgate", {}).get("ttft_p50_ms")
    add("Streaming time to first token p50 within 2 ms of plain Envoy", d, "{:+.2f} ms", d is not None and d <= 2)
    rc = results.get("rss_check")
    g = rc["growth_pct"] if rc else None
    over = "" if rc and rc["long"] and rc["requests"] >= 100_000 else \
        f" (measured over {rc['requests']:,}{'' if rc['long'] else ', short check'})" if rc else ""
    add(f"ext_proc RSS within 10% after 100,000 requests{over}", g, "{:+.1f}%", g is not None and g <= 10)
    d = (results.get("stream_minus_plain_ms") or {}).get("cachehit", {}).get("total_p50_ms")
    add("Cache hits: a streamed answer done sooner than through plain Envoy to the fake provider (p50)", d,
        "{:+.2f} ms", d is not None and d < 0)
    leases = results.get("leases_left")
    n = sum(len(v) for v in leases.values()) if leases is not None else None
    add("No lease left in Redis after the runs", n, "{} left", n == 0)
    return out


def print_report(results: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    con = Console(width=max(150, shutil.get_terminal_size((150, 24)).columns))
    w = results.get("wrk", {})
    ratios = results.get("ratios", {})
    cfg = results["config"]

    def f(v: Any, fmt: str) -> str:
        return fmt.format(v) if v is not None else ""

    t = Table(title=f"Non-streamed POST /v1/chat/completions (wrk -t1, {cfg['duration_s']}s per run, "
                    f"{cfg['warmup_s']}s warm-up)")
    for col in ("target", "conns", "req/s", "p50 ms", "p90 ms", "p99 ms", "errors", "x plain", "x floor",
                "p50 +ms vs floor", "p99 +ms vs floor", "others' CPU", "steal"):
        t.add_column(col, justify="left" if col == "target" else "right", no_wrap=col == "target")
    keys = sorted(w, key=lambda k: (ALL_TARGETS.index(k.partition("@")[0]), int(k.partition("@")[2])))
    for key in keys:
        r = w[key]
        target, _, conns = key.partition("@")
        rr = ratios.get(target, {}).get(conns, {})
        vp, vf = rr.get("vs_plain", {}), rr.get("vs_floor", {})
        t.add_row(target, conns, f"{r['rps']:,.0f}", f"{r['p50_ms']:.3f}", f"{r['p90_ms']:.3f}", f"{r['p99_ms']:.3f}",
                  str(r["non_2xx_3xx"] + r["socket_errors"]), f(vp.get("rps"), "{:.3f}"), f(vf.get("rps"), "{:.3f}"),
                  f(vf.get("added_p50_ms"), "{:+.3f}"), f(vf.get("added_p99_ms"), "{:+.3f}"),
                  f"{r['other_procs_cpu_pct']:.0f}%", f"{r.get('steal_cpu_pct', 0):.0f}%")
    con.print(t)

    conns = max((int(k.partition("@")[2]) for k in w), default=None)
    if conns is not None:
        t = Table(title=f"CPU microseconds per request at {conns} conns, per process")
        for col in ("target", "ext_proc", "of which main thread", "Envoy", "Redis", "fake provider", "all",
                    "ext_proc x floor"):
            t.add_column(col, justify="left" if col == "target" else "right")
        floor_cpu = (w.get(f"floor@{conns}", {}).get("cpu_us_per_req") or {}).get("extproc")
        for key in keys:
            target, _, c = key.partition("@")
            if int(c) != conns:
                continue
            cpu = w[key]["cpu_us_per_req"]
            t.add_row(target, f(cpu.get("extproc"), "{:,.0f}"), f(w[key].get("extproc_main_thread_us_per_req"), "{:,.0f}"),
                      *(f(cpu.get(role), "{:,.0f}") for role in ("envoy", "redis", "fake")),
                      f"{sum(cpu.values()):,.0f}",
                      f(ratio(cpu.get("extproc"), floor_cpu), "{:.2f}") if target != "floor" else "")
        con.print(t)

    s = results.get("stream")
    if s:
        t = Table(title=f"Streaming: sequential, {cfg['stream_output_tokens']} tokens "
                        f"{cfg['token_latency_ms']} ms apart (ms from request)")
        for col in ("target", "n", "TTFT p50", "TTFT p95", "last p50", "last p95"):
            t.add_column(col, justify="left" if col == "target" else "right")
        for name, r in s.items():
            t.add_row(name, str(r["n"]), f"{r['ttft_p50_ms']:.2f}", f"{r['ttft_p95_ms']:.2f}",
                      f"{r['total_p50_ms']:.2f}", f"{r['total_p95_ms']:.2f}")
        for base in ("plain", "floor"):
            for name, d in (results.get(f"stream_minus_{base}_ms") or {}).items():
                if name == "direct":
                    continue
                t.add_row(f"{name} - {base}", "", f"{d['ttft_p50_ms']:+.2f}", f"{d['ttft_p95_ms']:+.2f}",
                          f"{d['total_p50_ms']:+.2f}", f"{d['total_p95_ms']:+.2f}")
        con.print(t)

    for name, samples in (results.get("memory_kb") or {}).items():
        first, last = samples[0], samples[-1]
        con.print(f"{name} ext_proc RSS: {first['VmRSS'] / 1024:.1f} MB at start, "
                  f"{samples[1]['VmRSS'] / 1024 if len(samples) > 1 else 0:.1f} MB after the first run, "
                  f"{last['VmRSS'] / 1024:.1f} MB at the end after {last['requests']:,} requests "
                  f"(peak {last['VmHWM'] / 1024:.1f} MB)")
    for name, lr in (results.get("long") or {}).items():
        a, b = lr["before"]["VmRSS"], lr["after"]["VmRSS"]
        con.print(f"long run against {name}: {lr['requests']:,} requests in {lr['seconds']:.0f} s, ext_proc RSS "
                  f"{a / 1024:.1f} -> {b / 1024:.1f} MB ({100 * (b - a) / a:+.1f}%)")
    rc = results.get("rss_check")
    if rc:
        con.print(f"RSS check ({rc['kind']}): {rc['before_kb'] / 1024:.1f} -> {rc['after_kb'] / 1024:.1f} MB, "
                  f"{rc['growth_pct']:+.1f}%")
    for name, c in (results.get("checks") or {}).items():
        att = c.get("attribution")
        line = (f"{name}: {c['wrk_requests']:,} wrk + {c['streams']} streamed requests, ext_proc streams "
                f"{c['envoy_stats_delta'].get('http.tollgate.ext_proc.streams_started', 0):,}")
        if att:
            line += (f"; {att['records']:,} attribution records, decisions {att['decisions']}, budgets per record "
                     f"{att['records_by_budget_count']}, {att['cut_off']} cut off by wrk's stop, "
                     f"attributed ${att['cost_usd']:.2f}")
        con.print(line)
    for name, left in (results.get("leases_left") or {}).items():
        if left:
            con.print(f"[red]{name}: leases left in Redis: {left[:5]}[/red]")

    g = results.get("goals")
    if g:
        n = cfg.get("rounds", 1)
        t = Table(title="Targets (issue 14; printed, not enforced)" + (f": medians of {n} rounds" if n > 1 else ""))
        for col in ("goal", "measured", "each round", ""):
            t.add_column(col, justify="left" if col == "goal" else "right")
        for row in g:
            met = {True: "[green]met[/green]", False: "[red]not met[/red]", None: "n/a"}[row["met"]]
            each = " ".join("n/a" if v is None else row["fmt"].format(v) for v in row.get("rounds", []))
            t.add_row(row["goal"], row["shown"], each, met)
        con.print(t)
    noisy = {k: round(r["other_procs_cpu_pct"] + r.get("steal_cpu_pct", 0)) for k, r in w.items()
             if r["other_procs_cpu_pct"] + r.get("steal_cpu_pct", 0) > 10}
    if noisy:
        con.print(f"[yellow]Other processes on this machine (or the hypervisor's steal) took CPU during: {noisy} "
                  f"(% of one core); those numbers are skewed. Rerun on a quiet machine to compare.[/yellow]")
    if cfg.get("quick"):
        con.print("[yellow]--quick: 1 s runs without warm-up; these numbers only show the bench works.[/yellow]")
    if results.get("problems"):
        con.print(f"[red]problems: {results['problems']}[/red]")


def log(msg: str) -> None:
    print(f"bench: {msg}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
