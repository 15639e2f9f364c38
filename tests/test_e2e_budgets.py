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

from extproc.stack import Stack, StackPorts
from tests.conftest import FAKE_GATEWAY_KEY, AttributionLog

LIMIT_USD = 1.0


def tag(suite: str, run: str | None = None) -> dict[str, str]:
    return {"x-tollgate-metadata": json.dumps({"suite": suite, "run": run or uuid.uuid4().hex})}


def client(stack: Stack, **kw) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key="key-budget", max_retries=0, **kw)


# ---- the README walkthrough (default policies, `trial` key) ---------------------------------

def test_readme_walkthrough_downgrades_then_blocks(stack, attribution: AttributionLog):
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


def check_no_overspend(stack: Stack, logs: list[AttributionLog]) -> None:
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
    s = Stack(policy_dir, tmp_path_factory.mktemp("stack2"), StackPorts.free(extproc_count=2),
              extra_env={"TOLLGATE_FAKE_KEY": FAKE_GATEWAY_KEY, "TEST_JWKS_PORT": str(idp.port)})
    try:
        s.start()
        yield s
    finally:
        s.stop()


def test_no_overspend_two_extprocs_one_redis(two_extproc_stack):
    s = two_extproc_stack
    logs = [AttributionLog(s.attribution_log), AttributionLog(s.run_dir / "extproc-1.log")]
    check_no_overspend(s, logs)
    # Both processes really served requests.
    assert all(len(log.records()) > 10 for log in logs), [len(log.records()) for log in logs]
