"""extproc.metrics: records in, parseable exposition out, totals that match the records."""

from __future__ import annotations

from collections import defaultdict

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from extproc.metrics import Metrics


def rec(**kw):
    base = {
        "decision": "allowed", "api": "openai.chat", "provider": "openai", "model_requested": "gpt-4o",
        "model_served": "gpt-4o", "team": "alpha", "user": "ann", "input_tokens": 10, "cached_input_tokens": 0,
        "cache_write_tokens": 0, "output_tokens": 20, "cost_nusd": 0, "status": 200, "stream": False,
        "complete": True, "latency_ms": 12.5, "budget_store_error": False,
    }
    base.update(kw)
    base.setdefault("priced_as", base["model_served"])  # the price-table entry; a glob for glob-priced names
    return base


RECORDS = [
    rec(cost_nusd=210_000, input_tokens=4, output_tokens=20),
    rec(cost_nusd=123_456_789, user="bob", input_tokens=1000, cached_input_tokens=200, output_tokens=50),
    rec(team="beta", user="cy", model_requested="gpt-4o", model_served="gpt-4o-mini", decision="downgraded",
        cost_nusd=7_777, latency_ms=850.0),
    rec(team=None, user=None, api="anthropic.messages", provider="anthropic", model_requested="claude-sonnet-4-5",
        model_served="claude-sonnet-4-5", cost_nusd=3_000_001, cache_write_tokens=64, stream=True, complete=False,
        latency_ms=30_000.0),
    rec(decision="blocked", status=429, model_served=None, cost_nusd=0, input_tokens=0, output_tokens=0,
        latency_ms=1.2),
    rec(decision="refused", status=401, team=None, user=None, api=None, provider=None, model_requested=None,
        model_served=None, cost_nusd=0, input_tokens=0, output_tokens=0, latency_ms=0.4),
    rec(decision="error", status=502, cost_nusd=1, budget_store_error=True, output_tokens=0),
    rec(team="beta", user="dee", model_served="gpt-4o-mini", cost_nusd=999_999_999_999, status=0, complete=False),
]


def families(text: bytes | str) -> dict:
    if isinstance(text, bytes):
        text = text.decode()
    return {f.name: f for f in text_string_to_metric_families(text)}


def samples(fams, family: str, sample: str):
    return [s for s in fams[family].samples if s.name == sample]


def fed(per_user: bool = False) -> Metrics:
    m = Metrics(per_user=per_user)
    for r in RECORDS:
        m.observe(r)
    return m


def test_spend_matches_records_by_team_and_model():
    fams = families(fed().render())
    got = {(s.labels["team"], s.labels["model"], s.labels["provider"]): s.value
           for s in samples(fams, "tollgate_spend_usd", "tollgate_spend_usd_total")}
    want: dict = defaultdict(float)
    for r in RECORDS:
        if r["cost_nusd"]:
            want[(r["team"] or "none", r["priced_as"] or "unknown", r["provider"] or "unknown")] += r["cost_nusd"]
    assert set(got) == set(want)
    for k, nusd in want.items():
        assert got[k] == pytest.approx(nusd / 1e9, abs=1e-9), k
    # per team, summed over models
    by_team: dict = defaultdict(float)
    for (team, _, _), v in got.items():
        by_team[team] += v
    assert by_team["alpha"] == pytest.approx((210_000 + 123_456_789 + 1) / 1e9, abs=1e-9)
    assert by_team["beta"] == pytest.approx((7_777 + 999_999_999_999) / 1e9, abs=1e-9)
    assert by_team["none"] == pytest.approx(3_000_001 / 1e9, abs=1e-9)


def test_requests_by_decision_and_status_class():
    fams = families(fed().render())
    rs = samples(fams, "tollgate_requests", "tollgate_requests_total")
    by_decision: dict = defaultdict(float)
    for s in rs:
        assert set(s.labels) == {"decision", "api", "provider", "status_class"}
        by_decision[s.labels["decision"]] += s.value
    want: dict = defaultdict(float)
    for r in RECORDS:
        want[r["decision"]] += 1
    assert by_decision == want
    classes = {(s.labels["decision"], s.labels["status_class"]): s.value for s in rs}
    assert classes[("blocked", "4xx")] == 1
    assert classes[("error", "5xx")] == 1
    assert classes[("allowed", "none")] == 1  # status 0: no response at all
    refused = [s for s in rs if s.labels["decision"] == "refused"]
    assert refused[0].labels["api"] == "unknown" and refused[0].labels["provider"] == "unknown"


def test_tokens_by_kind():
    fams = families(fed().render())
    got = {(s.labels["kind"], s.labels["model"], s.labels["provider"]): s.value
           for s in samples(fams, "tollgate_tokens", "tollgate_tokens_total")}
    want: dict = defaultdict(float)
    for r in RECORDS:
        for kind in ("input", "cached_input", "cache_write", "output"):
            if r[f"{kind}_tokens"]:
                want[(kind, r["priced_as"] or "unknown", r["provider"] or "unknown")] += r[f"{kind}_tokens"]
    assert got == want
    assert got[("cache_write", "claude-sonnet-4-5", "anthropic")] == 64
    assert got[("cached_input", "gpt-4o", "openai")] == 200


def test_histograms_incomplete_and_store_errors():
    m = fed()
    m.phase_latency("request_headers", 0.0003)
    m.phase_latency("request_headers", 0.002)
    m.phase_latency("response_body", 0.04)
    m.redis_error("reserve")
    m.redis_error("reserve")
    m.redis_error("settle")
    m.set_budget_utilisation("team-daily", 0.25)
    m.set_budget_utilisation("team-daily", 0.5)
    fams = families(m.render())

    dur = fams["tollgate_request_duration_seconds"]
    assert dur.type == "histogram"
    count = samples(fams, "tollgate_request_duration_seconds", "tollgate_request_duration_seconds_count")[0].value
    total = samples(fams, "tollgate_request_duration_seconds", "tollgate_request_duration_seconds_sum")[0].value
    assert count == len(RECORDS)
    assert total == pytest.approx(sum(r["latency_ms"] for r in RECORDS) / 1000)
    inf = [s for s in samples(fams, "tollgate_request_duration_seconds", "tollgate_request_duration_seconds_bucket")
           if s.labels["le"] == "+Inf"][0]
    assert inf.value == len(RECORDS)

    phase = fams["tollgate_extproc_phase_seconds"]
    assert phase.type == "histogram"
    counts = {s.labels["phase"]: s.value for s in phase.samples if s.name.endswith("_count")}
    assert counts == {"request_headers": 2, "response_body": 1}
    buckets = {float(s.labels["le"]) for s in phase.samples if s.name.endswith("_bucket")}
    assert min(buckets) < 0.001 and 0.1 in buckets  # sub-millisecond to 100 ms resolution
    le_1ms = [s.value for s in phase.samples if s.name.endswith("_bucket")
              and s.labels["phase"] == "request_headers" and s.labels["le"] == "0.001"]
    assert le_1ms == [1]

    incomplete = {s.labels["provider"]: s.value
                  for s in samples(fams, "tollgate_incomplete_responses", "tollgate_incomplete_responses_total")}
    assert incomplete == {"anthropic": 1, "openai": 1}
    assert samples(fams, "tollgate_budget_store_errors", "tollgate_budget_store_errors_total")[0].value == 1
    redis = {s.labels["op"]: s.value for s in samples(fams, "tollgate_redis_errors", "tollgate_redis_errors_total")}
    assert redis == {"reserve": 2, "settle": 1}
    util = fams["tollgate_budget_utilisation_ratio"]
    assert util.type == "gauge"
    assert [(s.labels, s.value) for s in util.samples] == [({"budget": "team-daily"}, 0.5)]


def test_no_user_label_by_default():
    fams = families(fed().render())
    for fam in fams.values():
        for s in fam.samples:
            assert "user" not in s.labels, (fam.name, s.labels)
    assert b"ann" not in fed().render()


def test_per_user_adds_user_to_spend_only():
    fams = families(fed(per_user=True).render())
    spend = samples(fams, "tollgate_spend_usd", "tollgate_spend_usd_total")
    assert all("user" in s.labels for s in spend)
    by_user = {s.labels["user"]: s.value for s in spend if s.labels["team"] == "alpha"}
    assert by_user["ann"] == pytest.approx((210_000 + 1) / 1e9, abs=1e-12)
    assert by_user["bob"] == pytest.approx(123_456_789 / 1e9, abs=1e-12)
    assert {s.labels["user"] for s in spend if s.labels["team"] == "none"} == {"none"}
    for name, fam in fams.items():
        if name != "tollgate_spend_usd":
            assert all("user" not in s.labels for s in fam.samples), name


def test_instances_do_not_collide():
    a, b = Metrics(), Metrics(per_user=True)
    a.observe(RECORDS[0])
    fb = families(b.render())
    assert samples(fb, "tollgate_spend_usd", "tollgate_spend_usd_total") == []
    fa = families(a.render())
    assert samples(fa, "tollgate_spend_usd", "tollgate_spend_usd_total")[0].value == pytest.approx(210_000 / 1e9)


def test_label_children_are_cached():
    m = Metrics()
    m.observe(RECORDS[0])
    n = (len(m._requests._series), len(m._spend._series), len(m._tokens._series))
    child = next(iter(m._requests._series.values()))
    for _ in range(100):
        m.observe(RECORDS[0])
    assert (len(m._requests._series), len(m._spend._series), len(m._tokens._series)) == n
    assert next(iter(m._requests._series.values())) is child
    fams = families(m.render())
    assert samples(fams, "tollgate_requests", "tollgate_requests_total")[0].value == 101


def test_label_sets_cached_per_record_values_count_like_uncached_ones():
    """`observe` keeps what records of one decision, API, provider, status, entry and team share;
    values that hash alike but label differently (200 and "200" do not; 200 and 200.0 do), a
    label value that cannot be hashed, and a per-user spend series all count as a fresh
    Metrics would count them."""
    odd = [rec(status=200), rec(status="200"), rec(status=200.0), rec(status=True), rec(team=["x", "y"], cost_nusd=5),
           rec(team="", cost_nusd=7), rec(team=None, cost_nusd=11), rec(user="zed", cost_nusd=13)]
    for per_user in (False, True):
        m = Metrics(per_user=per_user)
        for r in odd + odd:
            m.observe(r)
        fresh = defaultdict(float)
        for r in odd + odd:
            f = Metrics(per_user=per_user)
            f.observe(r)
            for fam in families(f.render()).values():
                for smp in fam.samples:
                    if smp.name.endswith("_total"):
                        fresh[(smp.name, tuple(sorted(smp.labels.items())))] += smp.value
        got = {(smp.name, tuple(sorted(smp.labels.items()))): smp.value for fam in families(m.render()).values()
               for smp in fam.samples if smp.name.endswith("_total")}
        assert got == pytest.approx(dict(fresh))
        classes = {dict(k[1])["status_class"]: v for k, v in got.items() if k[0] == "tollgate_requests_total"}
        assert classes == {"2xx": 14, "none": 2}


def test_glob_priced_model_names_add_no_series():
    """50 client-chosen names that one glob prices: one set of series, labelled with the glob
    (before: each name added its own, +150 series for 50 names)."""
    m = Metrics()
    m.observe(rec(model_served="ft:gpt-4o:acme:0", priced_as="ft:gpt-4o:*", cost_nusd=5))
    n = len(m.render().splitlines())
    for i in range(50):
        m.observe(rec(model_served=f"ft:gpt-4o:acme:{i}", priced_as="ft:gpt-4o:*", cost_nusd=5))
    assert len(m.render().splitlines()) == n
    assert b'model="ft:gpt-4o:*"' in m.render()


def test_sparse_record_does_not_raise():
    m = Metrics()
    m.observe({})
    m.observe({"status": "weird", "latency_ms": None, "cost_nusd": None, "complete": None})
    fams = families(m.render())
    rs = samples(fams, "tollgate_requests", "tollgate_requests_total")
    assert [(s.labels, s.value) for s in rs] == [
        ({"decision": "unknown", "api": "unknown", "provider": "unknown", "status_class": "none"}, 2)]


async def test_http_endpoint_serves_render():
    m = fed()
    srv = await m.serve("127.0.0.1", 0)
    try:
        assert srv.port != 0
        async with httpx.AsyncClient() as client:
            r = await client.get(srv.url)
            assert r.status_code == 200
            assert r.headers["content-type"].startswith("text/plain")
            assert r.content == m.render()
            m.observe(RECORDS[0])
            r2 = await client.get(f"http://127.0.0.1:{srv.port}/metrics")
            assert r2.content == m.render() != r.content
            assert (await client.get(f"http://127.0.0.1:{srv.port}/other")).status_code == 404
        fams = families(r2.text)
        assert "tollgate_spend_usd" in fams
    finally:
        await srv.stop()
    with pytest.raises(httpx.ConnectError):
        async with httpx.AsyncClient() as client:
            await client.get(srv.url)
    await srv.stop()  # idempotent


async def test_http_endpoint_on_fixed_port():
    from extproc.procs import free_port

    port = free_port()
    srv = await Metrics().serve("127.0.0.1", port)
    try:
        assert srv.port == port
        async with httpx.AsyncClient() as client:
            r = await client.get(f"http://127.0.0.1:{port}/metrics")
        assert r.status_code == 200 and "tollgate_requests" in families(r.text)
    finally:
        await srv.stop()


def test_created_series_dropped_unless_asked():
    assert b"_created" not in fed().render()
    m = Metrics(created_series=True)
    m.observe(RECORDS[0])
    assert b"tollgate_spend_usd_created" in m.render()
