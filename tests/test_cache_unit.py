"""The response cache's parts without the stack: key, policy, entry format, Redis write-once,
per-request headers, records into rollups and metrics (issue 12). The end-to-end behaviour
through Envoy and the SDKs is tests/test_cache_e2e.py."""

from __future__ import annotations

import asyncio
import re
import shutil
from pathlib import Path

import pytest
import redis.asyncio as aredis

from extproc.budgets.pipe import ScriptPipe
from extproc.cache import key as cache_key
from extproc.cache import store
from extproc.cache.flow import CacheFlow, select
from extproc.cache.policy import CacheRule, describe_rule, uncachable_reason
from extproc.config import load_config
from extproc.errors import GatewayError
from extproc.metrics import Metrics
from extproc.policy_yaml import PolicyError
from extproc.usage import UsageRow, _tuples, usage_write

REPO = Path(__file__).resolve().parent.parent


# ---- the key ----------------------------------------------------------------------------------------

def _digest(body, **kw):
    args = {"api": "openai.chat", "provider": "fake", "model": "gpt-4o", "stream": False, **kw}
    return cache_key.digest(body=body, **args)


def test_canonical_ignores_key_order_whitespace_and_integral_floats():
    a = {"model": "gpt-4o", "temperature": 0, "messages": [{"role": "user", "content": "hi", "n": 1.0}]}
    b = {"messages": [{"n": 1, "content": "hi", "role": "user"}], "temperature": 0.0, "model": "gpt-4o"}
    assert cache_key.canonical(a) == cache_key.canonical(b)
    assert _digest(a) == _digest(b)
    assert _digest(a) != _digest({**a, "temperature": 0.5})
    assert _digest(a) != _digest({**a, "messages": [{"role": "user", "content": "hi!", "n": 1}]})


def test_digest_counts_api_provider_model_framing_and_ignored_fields():
    body = {"model": "gpt-4o", "messages": [], "user": "u1"}
    base = _digest(body)
    assert len({base, _digest(body, api="openai.responses"), _digest(body, provider="openai"),
                _digest(body, model="gpt-4o-mini"), _digest(body, stream=True)}) == 5
    assert _digest(body, ignore=["user"]) == _digest({**body, "user": "u2"}, ignore=["user"])
    assert _digest(body) != _digest({**body, "user": "u2"})


def test_custom_key_stands_for_the_body():
    one = cache_key.digest(api="a", provider="p", model="m", stream=False, custom="faq-1")
    assert one == cache_key.digest(api="a", provider="p", model="m", stream=False, custom="faq-1",
                                   body={"anything": 1})
    assert one != cache_key.digest(api="a", provider="p", model="m", stream=False, custom="faq-2")
    assert one != cache_key.digest(api="a", provider="p", model="m2", stream=False, custom="faq-1")
    assert one != _digest({"faq-1": 1})


def test_deeply_nested_bodies_still_have_a_key():
    deep: dict = {"x": 1.0}
    for _ in range(150):  # 300 levels: deeper than orjson writes (255), the standard library does
        deep = {"a": [deep]}
    assert _digest(deep) == _digest(deep)
    for _ in range(500):  # deeper than the gateway walks: not cacheable (the flow says skip)
        deep = {"a": [deep]}
    with pytest.raises(cache_key.Uncanonical):
        _digest(deep)


def test_scope_part():
    attrs = {"user": "al ice@x.com", "team": "ml", "groups": ["b", "a"]}
    assert cache_key.scope_part("team", attrs) == "team=ml"
    assert cache_key.scope_part("user", attrs) == "user=al%20ice@x.com"
    assert cache_key.scope_part("global", attrs) == "_"
    assert cache_key.scope_part("team", {"user": "x"}) is None  # no team: never shared


# ---- the policy ---------------------------------------------------------------------------------------

def _rule(**kw) -> CacheRule:
    return CacheRule.model_validate({"name": "r", **kw})


def test_uncachable_conditions():
    rule = _rule(uncachable=[{"temperature": "nonzero", "seed": "absent"}, {"n": {"gt": 1}},
                             {"tool_choice": {"in": ["required"]}}, {"stream_options.include_obfuscation": "present"}])
    assert uncachable_reason(rule, {"temperature": 0.7}) == "temperature=nonzero,seed=absent"
    assert uncachable_reason(rule, {"temperature": 0.7, "seed": 1}) is None
    assert uncachable_reason(rule, {"temperature": 0}) is None
    assert uncachable_reason(rule, {}) is None  # absent temperature is not `nonzero`
    assert uncachable_reason(rule, {"n": 2}) == "n=gt"
    assert uncachable_reason(rule, {"n": 1}) is None
    assert uncachable_reason(rule, {"tool_choice": "required"}) == "tool_choice=in"
    assert uncachable_reason(rule, {"tool_choice": "auto"}) is None
    assert uncachable_reason(rule, {"stream_options": {"include_obfuscation": True}}) is not None
    assert uncachable_reason(rule, {"stream_options": {}}) is None
    assert uncachable_reason(_rule(uncachable=[{"x": {"in": [1]}}]), {"x": True}) is None  # True is not 1


def test_select_first_match_paths_and_served_model():
    off = _rule(name="off", match={"models": ["gpt-4.1-nano"]}, enabled=False)
    emb = _rule(name="emb", match={"paths": ["/v1/embeddings"], "where": {"team": "ml"}}, scope="global")
    chat = _rule(name="chat", match={"providers": "fake", "where": {"team": ["ml", "web"]}})
    rules = [off, emb, chat]
    ml = {"user": "u", "team": "ml"}
    assert select(rules, ml, model="gpt-4.1-nano", provider="fake", path="/v1/chat/completions") is off
    assert select(rules, ml, model="e", provider="fake", path="/v1/embeddings") is emb
    assert select(rules, ml, model="gpt-4o", provider="fake", path="/v1/chat/completions") is chat
    assert select(rules, ml, model="gpt-4o", provider="openai", path="/v1/chat/completions") is None
    assert select(rules, {"user": "u", "team": "ops"}, model="gpt-4o", provider="fake", path="/x") is None
    assert "off" in describe_rule(off) and "per gateway (global)" in describe_rule(emb)


def _policy_dir(tmp_path: Path, text: str) -> Path:
    d = tmp_path / "p"
    shutil.copytree(REPO / "policies", d)
    (d / "zz-cache.yaml").write_text(text)
    return d


def test_policy_errors_name_file_and_line(tmp_path, monkeypatch):
    monkeypatch.setenv("TOLLGATE_FAKE_KEY", "x")
    d = _policy_dir(tmp_path, "cache:\n  - name: a\n    ttl_seconds: 10\n    max_ttl_seconds: 5\n"
                              "  - name: b\n    scope: tenant\n    uncachable:\n      - {temperature: hot}\n"
                              "      - {n: {gt: 1, in: [2]}}\n    max_entry_bytes: 999999999\n    colour: red\n")
    with pytest.raises(PolicyError) as e:
        load_config(d)
    text = "\n".join(e.value.problems)
    # (policies/cache.yaml's rules come first: these are cache[n] and cache[n+1])
    assert re.search(r"zz-cache.yaml:2: cache\[\d+\]: max_ttl_seconds \(5\) is below ttl_seconds \(10\)", text)
    assert re.search(r"zz-cache.yaml:6: cache\[\d+\].scope", text)
    assert re.search(r"zz-cache.yaml:8: cache\[\d+\].uncachable\[0\]: temperature: 'hot' is not a test", text)
    assert "exactly one of `in`" in text
    assert re.search(r"zz-cache.yaml:10: cache\[\d+\].max_entry_bytes", text)
    assert re.search(r"zz-cache.yaml:11: cache\[\d+\].colour", text)


def test_policy_loads_and_defaults_off(tmp_path, monkeypatch):
    monkeypatch.setenv("TOLLGATE_FAKE_KEY", "x")
    assert load_config(REPO / "policies").doc.cache is not None
    d = _policy_dir(tmp_path, "cache:\n  - name: faq\n    match: {where: {team: support}}\n"
                              "    uncachable: [{temperature: nonzero, seed: absent}]\n")
    (rule,) = [r for r in load_config(d).doc.cache if r.name == "faq"]
    assert rule.scope == "team" and rule.ttl_seconds == 3600 and rule.max_entry_bytes == 1 << 20
    (d / "zz-cache.yaml").write_text("cache:\n  - name: faq\n  - name: faq\n")
    with pytest.raises(PolicyError, match="used twice"):
        load_config(d)


# ---- request headers ------------------------------------------------------------------------------

@pytest.mark.parametrize("headers", [{"x-tollgate-cache": "refresh"}, {"x-tollgate-cache-ttl": "0"},
                                     {"x-tollgate-cache-ttl": "1.5"}, {"x-tollgate-cache-ttl": "\u00b2"},
                                     {"x-tollgate-cache-ttl": "9" * 5000}, {"x-tollgate-cache-key": "k" * 2000}])
def test_bad_cache_headers_are_400(headers):
    with pytest.raises(GatewayError) as e:
        CacheFlow(None, Metrics()).read_headers(headers)
    assert e.value.status == 400 and e.value.code == "invalid_cache_header"


def test_cache_headers_read():
    f = CacheFlow(None, Metrics())
    f.read_headers({"x-tollgate-cache": "Skip", "x-tollgate-cache-ttl": "30", "x-tollgate-cache-key": "k"})
    assert (f._skip, f._ttl, f._custom) == (True, 30, "k")
    assert f.status == "off"


# ---- the entry and its write-once store ---------------------------------------------------------------

def _entry(body: bytes = b'{"ok":1}\n{"second line"}', **kw) -> store.Entry:
    args = {"status": 200, "content_type": "application/json", "stream": False, "model": "gpt-4o",
            "provider": "fake", "cost_nusd": 210000, "request_id": "r1", "created": 1.5, "body": body,
            "usage": {"input_tokens": 4}}
    return store.Entry(**{**args, **kw})


def test_entry_round_trip_and_garbage():
    e = _entry()
    assert store.Entry.decode(e.encode()) == e
    sse = _entry(b"data: {}\n\ndata: [DONE]\n\n", stream=True, content_type="text/event-stream")
    assert store.Entry.decode(sse.encode()) == sse
    for raw in (None, b"", b"no newline", b'{"v": 99}\nbody', b"{not json}\nbody", b'{"v": 1}\nbody'):
        assert store.Entry.decode(raw) is None


@pytest.mark.parametrize("client", ["pipe", "redis-py"])
def test_put_writes_once(redis_url, client):
    """Through the gateway's script pipe (its hot-path connection) and through redis-py (a Redis
    the pipe cannot reach) alike."""
    async def go():
        r = aredis.Redis.from_url(redis_url)
        c = ScriptPipe.for_client(r) if client == "pipe" else r
        assert c is not None
        try:
            key = store.redis_key("tollgate:test:", f"team={client}", "d" * 64)
            await r.delete(key)
            assert await store.get(c, key) is None
            first, second = _entry(request_id="first"), _entry(request_id="second")
            results = await asyncio.gather(store.put(c, key, first, 60), store.put(c, key, second, 60))
            assert sorted(results) == [False, True]
            got = await store.get(c, key)
            assert got in (first, second)
            assert 0 < await r.pttl(key) <= 60_000
            await r.set(key, b"garbage")
            assert await store.get(c, key) is None
            await r.delete(key)
        finally:
            if isinstance(c, ScriptPipe):
                await c.close()
            await r.aclose()

    asyncio.run(go())


# ---- records: rollups and metrics --------------------------------------------------------------------

def _record(**kw):
    return {"ts": "2026-11-28T10:00:00.000+00:00", "user": "u", "team": "t", "app": None, "groups": [],
            "model_served": "gpt-4o", "provider": "fake", "service_token": None, "decision": "allowed",
            "input_tokens": 0, "output_tokens": 0, "cost_nusd": 0, "priced_as": "gpt-4o", "status": 200, **kw}


def test_a_hit_rolls_up_its_avoided_cost_and_a_miss_does_not():
    hit = usage_write(_record(cache="hit", avoided_cost_nusd=210000))
    miss = usage_write(_record(cache="miss", input_tokens=4, output_tokens=20, cost_nusd=210000))
    row = UsageRow(key={})
    for w in (hit, miss):
        metrics = _tuples({f.encode(): str(v).encode() for f, v in w.increments})
        for m in metrics.values():
            row.add(m)
    assert (row.requests, row.cache_hits, row.avoided_cost_nusd, row.cost_nusd) == (2, 1, 210000, 210000)
    assert not any(f.startswith(("cache_hits", "avoided")) for f, _ in miss.increments)
    assert row.as_dict()["avoided_cost_usd"] == 0.00021


def test_metrics_count_cache_results_and_avoided_spend():
    m = Metrics()
    m.observe(_record(cache="hit", avoided_cost_nusd=2_500_000_000))
    m.observe(_record(cache="miss", cost_nusd=10))
    m.observe(_record(cache="off"))
    m.cache_write("stored")
    text = m.render().decode()
    assert 'tollgate_cache_requests_total{result="hit"} 1.0' in text
    assert 'tollgate_cache_requests_total{result="miss"} 1.0' in text
    assert 'result="off"' not in text
    assert 'tollgate_cache_avoided_usd_total{model="gpt-4o",provider="fake",team="t"} 2.5' in text
    assert 'tollgate_cache_writes_total{outcome="stored"} 1.0' in text
