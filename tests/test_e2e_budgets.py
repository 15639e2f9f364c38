"""Budgets through the real stack: hard caps under concurrency, downgrade, clamp, shadow, block shapes.

Requests are sent by the `budget-bot` API key, whose `x-tollgate-metadata` header is trusted
(tests/policies/gateway.yaml); each test tags its requests with its own `suite` and `run`, so
every test has its own counters (tests/policies/test-budgets.yaml).
"""

from __future__ import annotations

import asyncio
import json
import random
import uuid

import anthropic
import httpx
import openai
import pytest

from extproc.stack import Stack
from tests.conftest import JsonLog, running_stack

LIMIT_USD = 1.0


def tag(suite: str, run: str | None = None) -> dict[str, str]:
    return {"x-tollgate-metadata": json.dumps({"suite": suite, "run": run or uuid.uuid4().hex})}


def client(stack: Stack, **kw) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key="key-budget", max_retries=0, **kw)


# ---- the README walkthrough (default policies, `trial` key) ---------------------------------

def test_readme_walkthrough_downgrades_then_blocks(stack, attribution: JsonLog):
    c = openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key="trial", max_retries=0)
    served = []
    for _ in range(4):
        raw = c.chat.completions.with_raw_response.create(
            model="gpt-4o", max_tokens=200, messages=[{"role": "user", "content": "hi"}])
        served.append((raw.parse().model, raw.headers["x-fake-model"], raw.headers["x-tollgate-decision"]))
    assert served == [("gpt-4o", "gpt-4o", "allowed")] * 2 + [("gpt-4o-mini", "gpt-4o-mini", "downgraded")] * 2
    with pytest.raises(openai.RateLimitError) as e:
        c.chat.completions.create(model="gpt-4o", max_tokens=200, messages=[{"role": "user", "content": "hi"}])
    err = e.value.body
    assert err["type"] == "budget_exceeded" and err["code"] == "budget_exceeded"
    assert err["budget"]["name"] == "trial-frontier" and err["budget"]["limit_usd"] == 0.0025
    assert "trial-frontier" in err["message"] and "resets at" in err["message"]
    h = e.value.response.headers
    assert 0 < int(h["retry-after"]) <= 86400
    assert h["x-tollgate-budget-name"] == "trial-frontier" and h["x-tollgate-budget-limit-usd"] == "0.0025"
    rec = attribution.get(h["x-tollgate-request-id"])
    assert rec["decision"] == "blocked" and rec["status"] == 429 and rec["cost_usd"] == 0


# ---- no overspend under concurrency ---------------------------------------------------------

async def _hammer(stack: Stack, run: str, clients: int = 64, per_client: int = 20) -> dict:
    """Phase 1: 64 concurrent clients with mixed sizes, each until its first refusal.
    Phase 2: with nothing in flight, the largest request, one at a time, until refused: a
    reservation leaked or never released by phase 1 would make this stop short."""
    rng = random.Random(run)
    stats = {"ok": 0, "blocked": 0, "max_worst": 0.0, "errors": []}
    oai = openai.AsyncOpenAI(base_url=f"{stack.base_url}/v1", api_key="key-budget", max_retries=0,
                             http_client=httpx.AsyncClient(limits=httpx.Limits(max_connections=clients), timeout=30))

    async def send(cap: int, size: int, out: int) -> bool:
        # Worst case as the gateway bounds it: body bytes (content plus generous JSON around it)
        # at the input price, plus the output cap at the output price.
        stats["max_worst"] = max(stats["max_worst"], (size + 200) * 2.5e-6 + cap * 1e-5)
        try:
            raw = await oai.chat.completions.with_raw_response.create(
                model="gpt-4o", max_tokens=cap, messages=[{"role": "user", "content": "x" * size}],
                extra_headers={**tag("overspend", run), "x-fake-output-tokens": str(out)})
            assert raw.headers["x-fake-model"] == "gpt-4o"
            stats["ok"] += 1
            return True
        except openai.RateLimitError:
            stats["blocked"] += 1
            return False
        except Exception as e:  # noqa: BLE001
            stats["errors"].append(repr(e))
            return False

    async def one_client() -> None:
        for _ in range(per_client):
            cap = rng.choice([200, 500, 1000, 2000])
            if not await send(cap, rng.randint(10, 2000), rng.randint(1, cap)):
                return

    await asyncio.gather(*(one_client() for _ in range(clients)))
    while await send(2000, 2000, 2000):
        pass
    await oai.close()
    return stats


def check_no_overspend(stack: Stack, logs: list[JsonLog]) -> None:
    run = uuid.uuid4().hex
    stats = asyncio.run(_hammer(stack, run))
    assert not stats["errors"], stats["errors"][:3]
    recs = [r for log in logs for r in log.records() if r.get("metadata", {}).get("run") == run]
    settled = sum(r["cost_nusd"] for r in recs) / 1e9
    assert stats["ok"] == sum(1 for r in recs if r["status"] == 200)
    assert stats["ok"] > 30 and stats["blocked"] > 0
    print(f"\nno-overspend: {stats['ok']} allowed, {stats['blocked']} refused, settled ${settled:.6f} "
          f"of ${LIMIT_USD} (largest worst case ${stats['max_worst']:.4f})")
    assert settled <= LIMIT_USD, f"overspent: {settled}"
    assert settled >= LIMIT_USD - stats["max_worst"], f"starved: {settled} (worst {stats['max_worst']})"


def test_no_overspend_64_concurrent_clients(stack, attribution):
    check_no_overspend(stack, [attribution])


@pytest.fixture(scope="module")
def two_extproc_stack(policy_dir, idp, tmp_path_factory):
    """A second stack whose Envoy spreads requests over two ext_proc processes sharing one Redis."""
    with running_stack(policy_dir, idp, tmp_path_factory.mktemp("stack2"), extproc_count=2) as s:
        yield s


def test_no_overspend_two_extprocs_one_redis(two_extproc_stack):
    s = two_extproc_stack
    logs = [JsonLog(s.attribution_log), JsonLog(s.run_dir / "extproc-1.log")]
    check_no_overspend(s, logs)
    # Both processes really served requests.
    assert all(len(log.records()) > 10 for log in logs), [len(log.records()) for log in logs]


# ---- downgrade, clamp, shadow, block shapes, tiers -----------------------------------------

def test_downgrade_rewrites_model_and_content_length(stack, attribution):
    c, headers = client(stack), tag("downgrade")
    # gpt-4o worst case here is about $0.0026 with max_tokens=250: the first fits the $0.003 cap.
    first = c.chat.completions.with_raw_response.create(
        model="gpt-4o", max_tokens=250, messages=[{"role": "user", "content": "first"}], extra_headers=headers)
    assert first.headers["x-fake-model"] == "gpt-4o"
    long_text = "a longer prompt " * 20
    raw = c.chat.completions.with_raw_response.create(
        model="gpt-4o", max_tokens=250, messages=[{"role": "user", "content": long_text}], extra_headers=headers)
    # The fake provider parsed the rewritten body (a wrong content-length would be a 500 from Envoy).
    assert raw.headers["x-fake-model"] == "gpt-4.1-nano"
    assert raw.parse().model == "gpt-4.1-nano"
    assert raw.headers["x-tollgate-model-served"] == "gpt-4.1-nano"
    assert raw.headers["x-tollgate-decision"] == "downgraded"
    rec = attribution.get(raw.headers["x-tollgate-request-id"])
    assert (rec["model_requested"], rec["model_served"], rec["decision"]) == ("gpt-4o", "gpt-4.1-nano", "downgraded")
    assert "downgrade-to-mini" in rec["reason"]
    # Billed at the served model's price, not the requested one's.
    want = (rec["input_tokens"] * 0.10 + rec["output_tokens"] * 0.40) / 1e6
    assert rec["cost_usd"] == pytest.approx(want, abs=1e-6)


def test_downgrade_streamed(stack, attribution):
    c, headers = client(stack), tag("downgrade")
    c.chat.completions.create(model="gpt-4o", max_tokens=250, messages=[{"role": "user", "content": "x"}],
                              extra_headers=headers)
    with c.chat.completions.with_streaming_response.create(
            model="gpt-4o", max_tokens=250, stream=True, messages=[{"role": "user", "content": "y" * 300}],
            extra_headers=headers) as resp:
        assert resp.headers["x-tollgate-model-served"] == "gpt-4.1-nano"
        chunks = list(resp.parse())
    assert {ch.model for ch in chunks} == {"gpt-4.1-nano"}
    rec = attribution.get(resp.headers["x-tollgate-request-id"])
    assert rec["stream"] and rec["complete"] and rec["model_served"] == "gpt-4.1-nano"


def test_clamp_lowers_max_tokens_then_blocks(stack, attribution):
    c, headers = client(stack), tag("clamp")
    headers["x-fake-output-tokens"] = "100000"  # the fake answers as long as the cap allows
    # No max_tokens: the worst case is gpt-4o's 16,384 output tokens ($0.16), far over the $0.001
    # cap, so the gateway lowers the cap to what the budget can pay for instead of refusing.
    raw = c.chat.completions.with_raw_response.create(
        model="gpt-4o", messages=[{"role": "user", "content": "hello"}], extra_headers=headers)
    clamped = int(raw.headers["x-tollgate-max-tokens-clamped"])
    assert raw.headers["x-tollgate-decision"] == "clamped"
    assert 16 <= clamped < 100
    assert raw.parse().usage.completion_tokens == clamped
    rec = attribution.get(raw.headers["x-tollgate-request-id"])
    assert rec["decision"] == "clamped" and rec["cost_usd"] <= 0.001
    spent = rec["cost_usd"]
    while True:  # keep going: each request gets a smaller cap, until not even 16 tokens fit
        try:
            r = c.chat.completions.with_raw_response.create(
                model="gpt-4o", messages=[{"role": "user", "content": "hello"}], extra_headers=headers)
            spent += attribution.get(r.headers["x-tollgate-request-id"])["cost_usd"]
        except openai.RateLimitError as e:
            assert e.body["budget"]["name"] == "clamp-cap"
            break
    assert 0.001 - 16 * 1e-5 - 0.0001 <= spent <= 0.001


def test_shadow_budget_never_blocks_but_records(stack, attribution):
    c, headers = client(stack), tag("shadow")
    for _ in range(3):
        raw = c.chat.completions.with_raw_response.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], extra_headers=headers)
        rec = attribution.get(raw.headers["x-tollgate-request-id"])
        assert rec["status"] == 200 and rec["decision"] == "allowed"
        assert rec["shadow_blocked"] == ["shadow-cap"] and "shadow-cap" in rec["budgets"]


def test_anthropic_block_has_anthropic_shape(stack):
    c = anthropic.Anthropic(base_url=stack.base_url, api_key="key-budget", max_retries=0)
    headers = tag("anthropic-block")
    with pytest.raises(anthropic.RateLimitError) as e:
        for _ in range(20):
            c.messages.create(model="claude-haiku-4-5", max_tokens=30, messages=[{"role": "user", "content": "hi"}],
                              extra_headers=headers)
    body = e.value.body
    assert body["type"] == "error" and body["error"]["type"] == "budget_exceeded"
    assert body["error"]["budget"]["name"] == "claude-cap"
    assert body["error"]["budget"]["window"].startswith("calendar week")
    assert int(e.value.response.headers["retry-after"]) <= 7 * 86400


def test_rolling_window_block_says_when_spend_ages_out(stack):
    c, headers = client(stack), tag("rolling")
    with pytest.raises(openai.RateLimitError) as e:
        for _ in range(30):
            c.chat.completions.create(model="gpt-4o", max_tokens=20, messages=[{"role": "user", "content": "hi"}],
                                      extra_headers=headers)
    budget = e.value.body["budget"]
    assert budget["name"] == "rolling-cap" and budget["window"].startswith("rolling")
    # Spend from a moment ago leaves the 1h window in just under an hour.
    assert 3000 < int(e.value.response.headers["retry-after"]) <= 3600


@pytest.mark.parametrize("key, limit", [("key-ic", "500.00"), ("key-senior", "2000.00"), ("key-alice", "3000.00")])
def test_group_tiers_and_overrides_pick_the_limit(stack, key, limit):
    c = openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key=key, max_retries=0)
    raw = c.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
    assert raw.headers["x-tollgate-budget-name"] == "engineer-monthly"
    assert raw.headers["x-tollgate-budget-limit-usd"] == limit
    assert float(raw.headers["x-tollgate-budget-remaining-usd"]) < float(limit)


# ---- Redis unreachable: fail closed (503) or open, and never hang -------------------------------
# Runs last in this module, on the module's own two-ext_proc stack, since it breaks its Redis.

def _redis_of(s: Stack):
    return next(p for p in s.procs if p.name == "redis")


@pytest.mark.parametrize("how", ["hung", "dead"])
def test_redis_down_fails_closed_or_open_quickly(two_extproc_stack, how):
    import os
    import signal
    import time

    s = two_extproc_stack
    redis = _redis_of(s)
    c = client(s)
    if how == "hung":
        os.kill(redis.pid, signal.SIGSTOP)
    else:
        redis.stop()
    try:
        for _ in range(2):  # both ext_proc processes
            t0 = time.monotonic()
            with pytest.raises(openai.APIStatusError) as e:
                c.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}],
                                          extra_headers=tag("overspend"))
            assert time.monotonic() - t0 < 2.5  # well inside Envoy's 3 s message timeout
            assert e.value.status_code == 503
            assert e.value.body["code"] == "budget_store_unavailable"
            assert e.value.response.headers["retry-after"] == "1"
            ok = c.chat.completions.with_raw_response.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], extra_headers=tag("fail-open"))
            assert ok.headers["x-fake-model"] == "gpt-4o-mini"
            logs = [JsonLog(s.attribution_log), JsonLog(s.run_dir / "extproc-1.log")]
            rid = ok.headers["x-tollgate-request-id"]
            # The record follows the answer: the settle (here queued, once Redis fails) runs after it.
            deadline = time.monotonic() + 5
            while (rec := next((r for log in logs for r in log.records() if r["request_id"] == rid), None)) is None:
                assert time.monotonic() < deadline, f"no record for {rid}"
                time.sleep(0.05)
            assert rec["budget_store_error"] is True and rec["cost_usd"] > 0
    finally:
        if how == "hung":
            os.kill(redis.pid, signal.SIGCONT)
    if how == "hung":  # back to normal once Redis answers again
        c.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}],
                                  extra_headers=tag("overspend"))
