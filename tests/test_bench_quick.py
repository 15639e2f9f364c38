"""`make bench` keeps working: tests/bench.py --quick runs every target and code path once (a few
seconds of load, about 30 s with start-up on 2 cores). No timing assertions: the numbers of a
1-second run on a shared machine mean nothing; only their presence and sanity are checked."""

from __future__ import annotations

import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from tests.bench import ALL_TARGETS, STREAM_TARGETS

REPO = Path(__file__).resolve().parent.parent


# `make test` installs wrk, so in CI a missing wrk is a failure, never a silent skip.
@pytest.mark.skipif(shutil.which("wrk") is None and not os.environ.get("CI"),
                    reason="wrk is not installed (apt-get install wrk; `make test` installs it): "
                           "tests/bench.py --quick not run")
def test_bench_quick(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    argv = [sys.executable, "-m", "tests.bench", "--quick", "--long", "--long-requests", "500",
            "--json", str(out), "--run-dir", str(tmp_path / "run")]
    p = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    try:
        stdout, stderr = p.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        # SIGTERM, not SIGKILL: the bench then stops every process it started (they run in their
        # own sessions, so nothing else would).
        os.kill(p.pid, signal.SIGTERM)
        try:
            stdout, stderr = p.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            p.kill()
            stdout, stderr = p.communicate()
        pytest.fail(f"bench --quick took more than 240 s\n--- stderr\n{stderr[-6000:]}")
    assert p.returncode == 0, f"bench --quick exited {p.returncode}\n--- stdout\n{stdout[-4000:]}\n--- stderr\n{stderr[-6000:]}"
    r = json.loads(out.read_text())
    assert r["problems"] == []
    conns = r["config"]["conns"]
    assert sorted(conns) == [1, 32]

    assert r["config"]["rounds"] == 2  # --quick keeps the medians' code path working
    for target in ALL_TARGETS:
        for c in conns:
            w = r["wrk"][f"{target}@{c}"]
            assert w["requests"] > 0 and w["rps"] > 0, (target, c, w)
            # the table's row: each figure the median of the rounds' (of two, their mean), counts summed
            rounds = w["rounds"]
            assert len(rounds) == 2 and all(x["requests"] > 0 for x in rounds), (target, c, w)
            assert w["requests"] == sum(x["requests"] for x in rounds), (target, c, w)
            assert w["rps"] == round((rounds[0]["rps"] + rounds[1]["rps"]) / 2, 3), (target, c, w)
            assert w["cpu_us_per_req"].keys() == rounds[0]["cpu_us_per_req"].keys(), (target, c, w)
            assert w["non_2xx_3xx"] == 0 and w["socket_errors"] == 0, (target, c, w)
            assert 0 < w["p50_ms"] <= w["p90_ms"] <= w["p99_ms"], (target, c, w)
            cpu = w["cpu_us_per_req"]
            if target != "cachehit":  # cache hits never reach the provider
                assert cpu["fake"] > 0, (target, c, cpu)
            if target != "direct":
                assert cpu["envoy"] > 0, (target, c, cpu)
            if target not in ("direct", "plain"):
                assert cpu["extproc"] > 0, (target, c, cpu)
                # the main thread's share: part of the ext_procs' CPU, never all of it (grpc's own threads work too)
                assert 0 < w["extproc_main_thread_us_per_req"] < cpu["extproc"], (target, c, w)
            else:
                assert "extproc_main_thread_us_per_req" not in w
            if target in ("floorredis", "floormeter", "tollgate", "heavy", "workers2"):
                assert cpu["redis"] > 0, (target, c, cpu)
        if target != "direct" and target != "plain":
            assert r["ratios"][target]["32"]["vs_plain"]["rps"] > 0
        if target not in ("plain", "floor"):
            assert r["ratios"][target]["1"]["vs_floor"]["rps"] > 0

    for target in STREAM_TARGETS:
        s = r["stream"][target]
        assert s["n"] == r["config"]["streams"] and 0 < s["ttft_p50_ms"] <= s["total_p50_ms"], (target, s)

    # Every request through a Tollgate stack was attributed and allowed, with the policy's budgets.
    budgets = {"tollgate": "2", "heavy": "5", "workers2": "2"}
    for target, n in budgets.items():
        att = r["checks"][target]["attribution"]
        assert set(att["decisions"]) == {"allowed"}, att
        assert set(att["records_by_budget_count"]) == {n}, att
        assert r["leases_left"][target] == [], r["leases_left"]
    hits = r["checks"]["cachehit"]["attribution"]  # cache: every request after the first probe was a hit
    assert 1 <= hits["cache"].get("miss", 0) <= 2 and hits["cache"]["hit"] > 0 and set(hits["cache"]) == {"hit", "miss"}, hits
    assert r["leases_left"]["cachehit"] == [], r["leases_left"]
    for name in ("floorredis", "floormeter"):  # their reserve and settle ran for (nearly) every request
        fr = r["checks"][name]
        assert fr["redis"]["leases_left"] == 0 and fr["redis"]["settles_rolled_up"] > fr["wrk_requests"], (name, fr)
    assert r["checks"]["floormeter"]["redis"]["records"] == r["checks"]["floormeter"]["redis"]["settles_rolled_up"]
    floor = r["checks"]["floor"]["envoy_stats_delta"]
    assert floor["http.tollgate.ext_proc.streams_started"] >= r["checks"]["floor"]["wrk_requests"]

    # Memory: sampled for every ext_proc; the --long path ran (with a few hundred requests).
    for target in ("floor", "tollgate", "heavy", "workers2"):
        assert all(s["VmRSS"] > 0 for s in r["memory_kb"][target]), target
    assert r["long"]["tollgate"]["requests"] >= 500
    assert r["rss_check"]["long"] and r["rss_check"]["before_kb"] > 0

    goals = r["goals"]
    assert len(goals) == 9 and all(g["measured"] is not None for g in goals), goals
    # the five goals wrk measures also carry each round's value; the others are the run's
    assert [len(g.get("rounds", [])) for g in goals] == [2] * 5 + [0] * 4, goals
    for g in goals[:5]:  # ...and the median of those is the measured one
        assert g["measured"] == round(statistics.median(g["rounds"]), 3), g
    assert next(g for g in goals if g["goal"].startswith("No lease"))["met"] is True
