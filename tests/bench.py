"""`make bench`: Tollgate's throughput and latency, as ratios against plain Envoy in the same run.

    python -m tests.bench [--duration 8] [--warmup 2] [--streams 50] [--json .run/bench.json]

What runs (loopback only, every process on a free port, stopped by PID at the end whatever
happens, Ctrl-C included):

* the Tollgate stack (`extproc.stack.Stack` with `policies/`: Redis, fake provider, ext_proc,
  Envoy), with a fresh Redis under `.run/bench/` so budgets start at zero on every run;
* a second Envoy, "plain": the same bootstrap Tollgate renders, minus the ext_proc filter and
  its cluster, with the fake provider's route matched unconditionally. Same listener, HCM,
  access log, local-reply mappers and router, same `--concurrency`, same upstream process.

Measurements:

1. Non-streamed `POST /v1/chat/completions` (small body, `authorization: Bearer demo`) with
   `wrk -t1 --latency` at 32 and 1 connections, a short warm-up before each run, against the
   fake provider directly, plain Envoy and Tollgate. Exact p50/p90/p99 and error counts come
   from a Lua `done()` hook; any non-2xx/3xx response or socket error is reported and makes
   the run fail the sanity checks. Tollgate's side is cross-checked with Envoy's stats (ext_proc
   streams, upstream 2xx) and the ext_proc's attribution records (decision `allowed`).
2. Streaming time to first `data:` event and to the end of the stream, sequential requests
   (`x-fake-token-latency-ms: 20`), alternating direct / plain / Tollgate so drift hits all
   alike.
3. The ext_proc's RSS (and high-water mark) before, between and after the loads.

Prints a table and writes everything to `.run/bench.json`. Exit status 1 when a sanity check
failed (errors, blocked requests, missing attribution), so a broken gateway cannot post a
flattering number.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from extproc.envoy_config import inline_xds
from extproc.procs import Proc, free_port, wait_for_port
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

WRK_LUA = """
wrk.method = "POST"
wrk.body = [[%BODY%]]
wrk.headers["content-type"] = "application/json"
wrk.headers["authorization"] = "Bearer %KEY%"

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
# processes
# --------------------------------------------------------------------------------------------


def plain_bootstrap(tollgate: dict[str, Any], listen: int, admin: int, access_log: str) -> dict[str, Any]:
    """Tollgate's rendered bootstrap without ext_proc: same listener, HCM, access log and router;
    the fake provider's route (prefix rewrite, host rewrite, timeout) matches every `/v1/` request."""
    boot = copy.deepcopy(tollgate)
    if "dynamic_resources" in boot:  # the providers' clusters and routes, read back from their xDS files
        boot = inline_xds(boot)
    boot["admin"]["address"]["socket_address"]["port_value"] = admin
    res = boot["static_resources"]
    listener = res["listeners"][0]
    listener["address"]["socket_address"]["port_value"] = listen
    hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
    hcm["http_filters"] = [f for f in hcm["http_filters"] if f["name"] != "envoy.filters.http.ext_proc"]
    for log in hcm.get("access_log", []):
        log["typed_config"]["path"] = access_log
    vhost = hcm["route_config"]["virtual_hosts"][0]
    fake = next(r for r in vhost["routes"] if r.get("name") == "fake")
    fake["match"].pop("headers", None)
    fake.pop("request_headers_to_remove", None)
    vhost["routes"] = [fake]
    res["clusters"] = [c for c in res["clusters"] if c["name"] != "tollgate_extproc"]
    return boot


def wait_envoy_ready(admin: int, listen: int, proc: Proc, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.alive():
            raise RuntimeError(f"plain envoy exited; see {proc.log_path}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{admin}/ready", timeout=2) as r:
                if r.status == 200:
                    wait_for_port(listen, timeout=max(0.1, deadline - time.monotonic()), proc=proc)
                    return
        except Exception:
            pass
        time.sleep(0.1)
    raise TimeoutError("plain envoy not ready")


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


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


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


# --------------------------------------------------------------------------------------------
# wrk
# --------------------------------------------------------------------------------------------


@dataclass
class Wrk:
    binary: str
    script: Path
    running: list[subprocess.Popen] = field(default_factory=list)

    def run(self, url: str, conns: int, seconds: float) -> dict[str, Any]:
        seconds = max(1, round(seconds))  # wrk takes whole seconds
        argv = [self.binary, "-t1", f"-c{conns}", f"-d{seconds}s", "--latency", "--timeout", "5s",
                "-s", str(self.script), url]
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


async def one_stream(client: Any, url: str, check_gateway: bool) -> dict[str, float]:
    headers = {"authorization": f"Bearer {CLIENT_KEY}", "content-type": "application/json",
               "x-fake-token-latency-ms": str(TOKEN_LATENCY_MS), "x-fake-output-tokens": str(STREAM_OUTPUT_TOKENS)}
    t0 = time.perf_counter()
    first = None
    buf = b""
    async with client.stream("POST", url, content=STREAM_BODY, headers=headers) as r:
        if r.status_code != 200:
            body = await r.aread()
            raise RuntimeError(f"stream to {url}: HTTP {r.status_code}: {body[:300]!r}")
        if check_gateway and "x-tollgate-request-id" not in r.headers:
            raise RuntimeError("stream through Tollgate without x-tollgate-request-id")
        async for chunk in r.aiter_raw():
            if first is None:
                buf += chunk
                if b"data:" in buf:
                    first = time.perf_counter()
            else:
                buf += chunk
    last = time.perf_counter()
    text = buf.decode()
    words = text.count('"content":"')
    if b"data: [DONE]" not in buf or words < STREAM_OUTPUT_TOKENS:
        raise RuntimeError(f"incomplete stream from {url}: {text[-300:]!r}")
    assert first is not None
    return {"ttft_ms": (first - t0) * 1000, "total_ms": (last - t0) * 1000}


async def stream_bench(urls: dict[str, str], n: int, warmup: int) -> dict[str, Any]:
    import httpx

    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    clients = {name: httpx.AsyncClient(timeout=30, limits=limits) for name in urls}
    samples: dict[str, list[dict[str, float]]] = {name: [] for name in urls}
    try:
        for i in range(warmup + n):
            for name, url in urls.items():
                s = await one_stream(clients[name], url, check_gateway=(name == "tollgate"))
                if i >= warmup:
                    samples[name].append(s)
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


def probe(url: str, expect_auth: str, gateway: bool) -> dict[str, str]:
    """One non-streamed request; proves which path it took (what authorization reached the fake)."""
    req = urllib.request.Request(url, data=BODY.encode(), method="POST",
                                 headers={"content-type": "application/json", "authorization": f"Bearer {CLIENT_KEY}"})
    with urllib.request.urlopen(req, timeout=10) as r:
        h = {k.lower(): v for k, v in r.headers.items()}
        body = json.loads(r.read())
    problems = []
    if h.get("x-fake-authorization") != expect_auth:
        problems.append(f"provider saw authorization {h.get('x-fake-authorization')!r}, expected {expect_auth!r}")
    if gateway:
        for name in ("x-tollgate-request-id", "x-tollgate-cost-usd"):
            if name not in h:
                problems.append(f"missing {name}")
    if not body.get("usage"):
        problems.append("no usage in the response")
    if problems:
        raise RuntimeError(f"probe {url}: " + "; ".join(problems))
    return {k: v for k, v in h.items() if k.startswith("x-tollgate-")}


def attribution_summary(path: Path) -> dict[str, Any]:
    decisions: dict[str, int] = {}
    shadow = 0
    cut_off = 0
    statuses: dict[str, int] = {}
    n = 0
    cost = 0.0
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
    return {"records": n, "decisions": decisions, "statuses": statuses, "shadow_blocked": shadow,
            "cut_off": cut_off, "cost_usd": round(cost, 4)}


# --------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------


def ratio(a: float, b: float) -> float | None:
    return round(a / b, 3) if b else None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.bench", description=__doc__.splitlines()[0])
    ap.add_argument("--duration", type=int, default=8, help="seconds per measured wrk run")
    ap.add_argument("--warmup", type=int, default=2, help="seconds of wrk warm-up before each run")
    ap.add_argument("--conns", default="32,1", help="wrk connection counts")
    ap.add_argument("--streams", type=int, default=50, help="streamed requests per target")
    ap.add_argument("--policies", default=str(REPO / "policies"))
    ap.add_argument("--run-dir", default=str(REPO / ".run" / "bench"))
    ap.add_argument("--json", default=str(REPO / ".run" / "bench.json"))
    args = ap.parse_args(argv)

    wrk_bin = shutil.which("wrk")
    if wrk_bin is None:
        print("bench: wrk not found (apt-get install wrk, or `make bench` installs it)", file=sys.stderr)
        return 2
    run_dir = Path(args.run_dir).resolve()
    shutil.rmtree(run_dir, ignore_errors=True)  # fresh Redis: budgets start at zero
    run_dir.mkdir(parents=True)
    # Explicitly: a shell that starts us in the background leaves SIGINT ignored.
    signal.signal(signal.SIGTERM, _on_sigterm)
    signal.signal(signal.SIGINT, signal.default_int_handler)

    script = run_dir / "post.lua"
    script.write_text(WRK_LUA.replace("%BODY%", BODY).replace("%KEY%", CLIENT_KEY))
    wrk = Wrk(wrk_bin, script)
    stack = Stack(Path(args.policies), run_dir / "tollgate", StackPorts.free(),
                  extra_env={"TOLLGATE_FAKE_KEY": GATEWAY_KEY})
    plain: Proc | None = None
    results: dict[str, Any] = {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "cpus": os.cpu_count(),
                               "config": {"duration_s": args.duration, "warmup_s": args.warmup,
                                          "streams": args.streams, "token_latency_ms": TOKEN_LATENCY_MS,
                                          "stream_output_tokens": STREAM_OUTPUT_TOKENS, "body": json.loads(BODY),
                                          "envoy_concurrency": int(ENVOY_CONCURRENCY)},
                               "problems": []}
    problems: list[str] = results["problems"]
    t_start = time.monotonic()
    try:
        log("starting the Tollgate stack (Redis, fake provider, ext_proc, Envoy) ...")
        stack.start()
        extproc = next(p for p in stack.procs if p.name == "extproc-0")
        fake_proc = next(p for p in stack.procs if p.name == "fake-provider")
        envoy_proc = next(p for p in stack.procs if p.name == "envoy")

        plain_listen, plain_admin = free_port(), free_port()
        boot = plain_bootstrap(yaml.safe_load((stack.run_dir / "envoy.yaml").read_text()), plain_listen, plain_admin,
                               str(run_dir / "plain-access.log"))
        plain_yaml = run_dir / "plain-envoy.yaml"
        plain_yaml.write_text(yaml.safe_dump(boot, sort_keys=False))
        plain = Proc("plain-envoy", [envoy_binary(), "-c", str(plain_yaml), "--disable-hot-restart",
                                     "--log-level", "warn", "--concurrency", ENVOY_CONCURRENCY,
                                     "--file-flush-interval-msec", "100"],
                     log_path=run_dir / "plain-envoy.log").start()
        wait_envoy_ready(plain_admin, plain_listen, plain)

        path = "/v1/chat/completions"
        urls = {"direct": f"http://127.0.0.1:{stack.ports.fake}{path}",
                "plain": f"http://127.0.0.1:{plain_listen}{path}",
                "tollgate": f"{stack.base_url}{path}"}
        probe(urls["direct"], f"Bearer {CLIENT_KEY}", gateway=False)
        probe(urls["plain"], f"Bearer {CLIENT_KEY}", gateway=False)
        results["probe_headers"] = probe(urls["tollgate"], f"Bearer {GATEWAY_KEY}", gateway=True)
        log(f"ready in {time.monotonic() - t_start:.1f}s: direct {urls['direct']}, plain {urls['plain']}, "
            f"tollgate {urls['tollgate']}")

        ours = {os.getpid(), plain.pid, *(p.pid for p in stack.procs)}
        results["loadavg_before"] = os.getloadavg()
        mem: dict[str, Any] = {"pid": extproc.pid, "before": proc_mem(extproc.pid)}
        stats0 = envoy_stats(stack.ports.admin)
        cpu0 = {n: cpu_seconds(p.pid) for n, p in (("extproc", extproc), ("fake", fake_proc), ("envoy", envoy_proc))}

        # ---- 1. non-streamed throughput and latency -------------------------------------------
        wrk_results: dict[str, dict[str, Any]] = {}
        tollgate_reqs = 0
        inflight = 0  # requests wrk may leave unanswered when it stops: one per connection per run
        for conns in [int(c) for c in args.conns.split(",")]:
            for target in ("direct", "plain", "tollgate"):
                key = f"{target}@{conns}"
                if args.warmup > 0:
                    w = wrk.run(urls[target], conns, args.warmup)
                    if target == "tollgate":
                        tollgate_reqs += w["requests"]
                        inflight += conns
                    if w["non_2xx_3xx"] or w["socket_errors"]:
                        problems.append(f"warm-up {key}: {w['non_2xx_3xx']} non-2xx, {w['socket_errors']} socket errors")
                cpu_a = cpu_seconds(extproc.pid) if target == "tollgate" else None
                other_a, wall_a = other_cpu_sample(ours), time.monotonic()
                r = wrk.run(urls[target], conns, args.duration)
                r["other_procs_cpu_pct"] = other_cpu_pct(other_a, other_cpu_sample(ours), time.monotonic() - wall_a)
                if target == "tollgate":
                    tollgate_reqs += r["requests"]
                    inflight += conns
                    assert cpu_a is not None
                    r["extproc_cpu_us_per_req"] = round((cpu_seconds(extproc.pid) - cpu_a) / max(1, r["requests"]) * 1e6, 1)
                wrk_results[key] = r
                if target == "tollgate":
                    mem[f"after_{key}"] = {**proc_mem(extproc.pid), "requests": tollgate_reqs}
                if r["non_2xx_3xx"] or r["socket_errors"]:
                    problems.append(f"{key}: {r['non_2xx_3xx']} non-2xx/3xx, {r['socket_errors']} socket errors")
                log(f"wrk {key:12s} {r['rps']:>9,.0f} rps  p50 {r['p50_ms']:7.3f} ms  p99 {r['p99_ms']:7.3f} ms  "
                    f"non-2xx {r['non_2xx_3xx']}  errors {r['socket_errors']}  "
                    f"other processes {r['other_procs_cpu_pct']}% CPU")
        results["wrk"] = wrk_results

        # Did Tollgate really process them? Envoy's counters and the attribution records. wrk
        # drops the requests in flight when it stops (up to one per connection per run): Envoy
        # sees them as client resets, the ext_proc records them as status 0, incomplete.
        time.sleep(0.5)
        stats1 = envoy_stats(stack.ports.admin)
        delta = {k: stats1.get(k, 0) - stats0.get(k, 0) for k in stats1
                 if k.startswith("cluster.provider_fake.upstream_rq_") or ".ext_proc." in k
                 or k.startswith("http.tollgate.downstream_rq_")}
        delta = {k: v for k, v in delta.items() if v}
        streams = delta.get("http.tollgate.ext_proc.streams_started", 0)
        up_2xx = delta.get("cluster.provider_fake.upstream_rq_2xx", 0)
        refused = delta.get("http.tollgate.downstream_rq_4xx", 0) + delta.get("http.tollgate.downstream_rq_5xx", 0)
        results["tollgate_check"] = {"wrk_requests": tollgate_reqs, "cut_off_allowance": inflight,
                                     "envoy_stats_delta": delta}
        if refused:
            problems.append(f"Tollgate's Envoy answered {refused} requests with 4xx/5xx")
        if tollgate_reqs == 0 or not 0 <= streams - tollgate_reqs <= inflight + 4:
            problems.append(f"ext_proc streams {streams} vs wrk requests {tollgate_reqs} (+ up to {inflight} cut off)")
        if not 0 <= up_2xx - tollgate_reqs <= inflight + 4:
            problems.append(f"upstream 2xx {up_2xx} vs wrk requests {tollgate_reqs} (+ up to {inflight} cut off)")

        # ---- 2. streaming time to first token ------------------------------------------------
        log(f"streaming: {args.streams} sequential requests per target, {STREAM_OUTPUT_TOKENS} tokens "
            f"{TOKEN_LATENCY_MS} ms apart ...")
        results["stream"] = asyncio.run(stream_bench(urls, args.streams, warmup=5))
        mem["after_stream"] = {**proc_mem(extproc.pid), "requests": tollgate_reqs + 5 + args.streams}
        results["extproc_memory_kb"] = mem
        results["cpu_seconds"] = {n: round(cpu_seconds(p.pid) - cpu0[n], 2)
                                  for n, p in (("extproc", extproc), ("fake", fake_proc), ("envoy", envoy_proc))}

        # Attribution: every request accounted for, nothing refused.
        time.sleep(0.3)
        att = attribution_summary(stack.attribution_log)
        results["tollgate_check"]["attribution"] = att
        expected = tollgate_reqs + 1 + 5 + args.streams  # + the probe + streamed (warm-up included)
        if not 0 <= att["records"] - expected <= inflight + 4:
            problems.append(f"attribution records {att['records']}, expected {expected} (+ up to {inflight} cut off)")
        not_allowed = {d: c for d, c in att["decisions"].items() if d != "allowed"}
        if not_allowed:
            problems.append(f"decisions other than allowed: {not_allowed}")
        if att["cut_off"] > inflight:
            problems.append(f"{att['cut_off']} requests aborted by the client, more than wrk's {inflight} in flight")
        bad_status = {s: c for s, c in att["statuses"].items() if not s.startswith("2") and s != "0"}
        if bad_status:
            problems.append(f"non-2xx statuses in attribution: {bad_status}")
        results["probe_after"] = probe(urls["tollgate"], f"Bearer {GATEWAY_KEY}", gateway=True)

        for name, p in (("tollgate envoy", envoy_proc), ("ext_proc", extproc), ("fake provider", fake_proc),
                        ("plain envoy", plain)):
            if not p.alive():
                problems.append(f"{name} died during the run")
    except KeyboardInterrupt:
        log("interrupted: stopping everything")
        results["problems"].append("interrupted")
        return 130
    finally:
        wrk.stop_all()
        if plain is not None:
            plain.stop()
        stack.stop()
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


def summarize(results: dict[str, Any]) -> None:
    """Tollgate / plain ratios and differences, added to the results."""
    w = results.get("wrk", {})
    ratios = {}
    for key, t in w.items():
        target, _, conns = key.partition("@")
        if target != "tollgate" or f"plain@{conns}" not in w:
            continue
        p = w[f"plain@{conns}"]
        ratios[conns] = {"rps": ratio(t["rps"], p["rps"]), "p50": ratio(t["p50_ms"], p["p50_ms"]),
                         "p99": ratio(t["p99_ms"], p["p99_ms"]),
                         "added_p50_ms": round(t["p50_ms"] - p["p50_ms"], 3),
                         "added_p99_ms": round(t["p99_ms"] - p["p99_ms"], 3)}
    results["tollgate_vs_plain"] = ratios
    s = results.get("stream")
    if s and "plain" in s and "tollgate" in s:
        results["stream_tollgate_minus_plain_ms"] = {
            k: round(s["tollgate"][k] - s["plain"][k], 2)
            for k in ("ttft_p50_ms", "ttft_p95_ms", "total_p50_ms", "total_p95_ms")}


def print_report(results: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    con = Console(width=max(110, shutil.get_terminal_size((120, 24)).columns))
    w = results.get("wrk", {})
    t = Table(title="Non-streamed POST /v1/chat/completions (wrk -t1, %gs)" % results["config"]["duration_s"])
    for col in ("target", "conns", "RPS", "p50 ms", "p99 ms", "non-2xx", "RPS / plain", "p50 / plain",
                "p99 / plain", "others' CPU"):
        t.add_column(col, justify="left" if col == "target" else "right")
    for key, r in w.items():
        target, _, conns = key.partition("@")
        p = w.get(f"plain@{conns}")
        rr = [f"{ratio(r['rps'], p['rps']):.3f}", f"{ratio(r['p50_ms'], p['p50_ms']):.2f}",
              f"{ratio(r['p99_ms'], p['p99_ms']):.2f}"] if p and target != "plain" else ["", "", ""]
        t.add_row(target, conns, f"{r['rps']:,.0f}", f"{r['p50_ms']:.3f}", f"{r['p99_ms']:.3f}",
                  str(r["non_2xx_3xx"] + r["socket_errors"]), *rr, f"{r.get('other_procs_cpu_pct', 0):.0f}%")
    con.print(t)

    s = results.get("stream")
    if s:
        t = Table(title=f"Streaming: sequential, {results['config']['stream_output_tokens']} tokens "
                        f"{results['config']['token_latency_ms']} ms apart (ms from request)")
        for col in ("target", "n", "TTFT p50", "TTFT p95", "last p50", "last p95"):
            t.add_column(col, justify="left" if col == "target" else "right")
        for name, r in s.items():
            t.add_row(name, str(r["n"]), f"{r['ttft_p50_ms']:.2f}", f"{r['ttft_p95_ms']:.2f}",
                      f"{r['total_p50_ms']:.2f}", f"{r['total_p95_ms']:.2f}")
        d = results.get("stream_tollgate_minus_plain_ms")
        if d:
            t.add_row("tollgate - plain", "", f"{d['ttft_p50_ms']:+.2f}", f"{d['ttft_p95_ms']:+.2f}",
                      f"{d['total_p50_ms']:+.2f}", f"{d['total_p95_ms']:+.2f}")
        con.print(t)

    m = results.get("extproc_memory_kb")
    if m:
        parts = [f"{k} {v['VmRSS'] / 1024:.1f}" for k, v in m.items() if isinstance(v, dict)]
        last = [v for v in m.values() if isinstance(v, dict)][-1]
        reqs = results.get("tollgate_check", {}).get("attribution", {}).get("records") or 0
        growth = (last["VmRSS"] - m["before"]["VmRSS"]) / 1024
        con.print(f"ext_proc RSS MB: {', '.join(parts)} (peak {last['VmHWM'] / 1024:.1f} MB; "
                  f"{growth:+.1f} MB over {reqs:,} requests)")
    tc = results.get("tollgate_check", {})
    att = tc.get("attribution")
    if att:
        con.print(f"Tollgate check: {tc['wrk_requests']:,} wrk requests; {att['records']:,} attribution records, "
                  f"decisions {att['decisions']}, shadow-blocked {att['shadow_blocked']}, "
                  f"{att['cut_off']} cut off by wrk's stop, attributed ${att['cost_usd']:.2f}")
        pa = results.get("probe_after", {})
        if pa:
            con.print(f"Budget after the run ({pa.get('x-tollgate-budget-name')}): spent "
                      f"${pa.get('x-tollgate-budget-spent-usd')} of ${pa.get('x-tollgate-budget-limit-usd')}, "
                      f"decision {pa.get('x-tollgate-decision')}")
    for conns, r in results.get("tollgate_vs_plain", {}).items():
        ext_cpu = w.get(f"tollgate@{conns}", {}).get("extproc_cpu_us_per_req")
        con.print(f"Tollgate / plain at {conns} conn(s): RPS x{r['rps']}, p50 x{r['p50']} ({r['added_p50_ms']:+.3f} ms), "
                  f"p99 x{r['p99']} ({r['added_p99_ms']:+.3f} ms); ext_proc CPU {ext_cpu} us/request")
    noisy = {k: r["other_procs_cpu_pct"] for k, r in w.items() if r.get("other_procs_cpu_pct", 0) > 10}
    if noisy:
        con.print(f"[yellow]Other processes on this machine used CPU during: {noisy} (% of one core); "
                  f"those numbers are skewed. Rerun on a quiet machine to compare.[/yellow]")
    if results.get("problems"):
        con.print(f"[red]problems: {results['problems']}[/red]")


def log(msg: str) -> None:
    print(f"bench: {msg}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
