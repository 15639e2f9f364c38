"""Rate limits through the real stack, with the SDKs: they trip at the configured count, answer in
each provider's shape with the headers its clients read, recover when the window ages, and hold
under a burst. Limits: tests/policies/test-ratelimits.yaml (per `run`, so tests never share one).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid

import anthropic
import httpx
import openai
import pytest
import redis

from extproc.stack import Stack
from tests.conftest import JsonLog

MSG = [{"role": "user", "content": "hi"}]


def tag(suite: str, run: str) -> dict[str, str]:
    return {"x-tollgate-metadata": json.dumps({"suite": suite, "run": run})}


def oai(stack: Stack, suite: str, run: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key="key-budget", max_retries=0,
                         default_headers=tag(suite, run))


def counter_total(stack: Stack, key_glob: str) -> int:
    """What a rate-limit counter holds in Redis: the sum of its window's buckets (settled)."""
    r = redis.Redis.from_url(stack.redis_url)
    try:
        keys = [k for k in r.scan_iter(match=key_glob) if not k.endswith(b":leases")]
        assert len(keys) == 1, keys
        h = r.hgetall(keys[0])
        assert int(h.get(b"reserved", b"0")) == 0, h  # nothing left held once every request settled
        return sum(int(v) for k, v in h.items() if k.startswith(b"b:"))
    finally:
        r.close()


def test_request_limit_trips_answers_openai_shape_and_recovers(stack: Stack, attribution: JsonLog):
    run = uuid.uuid4().hex
    c = oai(stack, "rl-requests", run)
    remaining = []
    for _ in range(3):
        raw = c.chat.completions.with_raw_response.create(model="gpt-4o-mini", max_tokens=8, messages=MSG)
        assert raw.headers["x-ratelimit-limit-requests"] == "3"
        remaining.append(int(raw.headers["x-ratelimit-remaining-requests"]))
        reset = raw.headers["x-ratelimit-reset-requests"]
        assert reset.endswith(("s", "ms")) and "anthropic-ratelimit-requests-limit" not in raw.headers
    assert remaining == [2, 1, 0]
    with pytest.raises(openai.RateLimitError) as e:
        c.chat.completions.create(model="gpt-4o-mini", max_tokens=8, messages=MSG)
    err, h = e.value.body, e.value.response.headers
    assert err["code"] == "rate_limit_exceeded" and err["type"] == "requests", err
    assert "rl-requests" in err["message"] and "3 of 3 requests" in err["message"], err["message"]
    assert 1 <= int(h["retry-after"]) <= 4
    assert h["x-ratelimit-limit-requests"] == "3" and h["x-ratelimit-remaining-requests"] == "0"
    assert h["x-tollgate-rate-limit-name"] == "rl-requests"
    rec = attribution.get(h["x-tollgate-request-id"])
    assert rec["decision"] == "blocked" and rec["error_code"] == "rate_limit_exceeded" and rec["cost_nusd"] == 0
    # The window slides: within its 4 s the first requests age out and requests pass again.
    deadline = time.monotonic() + 8
    while True:
        try:
            raw = c.chat.completions.with_raw_response.create(model="gpt-4o-mini", max_tokens=8, messages=MSG)
            break
        except openai.RateLimitError as again:
            assert time.monotonic() < deadline, "the request window never recovered"
            time.sleep(min(2.0, int(again.response.headers["retry-after"])) / 4)
    assert raw.http_response.status_code == 200
    assert int(raw.headers["x-ratelimit-remaining-requests"]) < 3


def test_request_limit_in_anthropic_shape(stack: Stack):
    run = uuid.uuid4().hex
    c = anthropic.Anthropic(base_url=stack.base_url, api_key="key-budget", max_retries=0,
                            default_headers=tag("rl-requests", run))
    for left in (2, 1, 0):
        raw = c.messages.with_raw_response.create(model="claude-3-5-haiku-20241022", max_tokens=8, messages=MSG)
        assert raw.headers["anthropic-ratelimit-requests-limit"] == "3"
        assert raw.headers["anthropic-ratelimit-requests-remaining"] == str(left)
        reset = raw.headers["anthropic-ratelimit-requests-reset"]
        assert reset.endswith("Z") and "T" in reset and "x-ratelimit-limit-requests" not in raw.headers
    with pytest.raises(anthropic.RateLimitError) as e:
        c.messages.create(model="claude-3-5-haiku-20241022", max_tokens=8, messages=MSG)
    body = e.value.body
    assert body["type"] == "error" and body["error"]["type"] == "rate_limit_error", body
    assert e.value.response.headers["anthropic-ratelimit-requests-remaining"] == "0"
    assert int(e.value.response.headers["retry-after"]) >= 1


def test_token_limit_reserves_the_worst_case_and_settles_what_was_used(stack: Stack, attribution: JsonLog):
    """400 tokens a minute. A request holds its input bound plus max_tokens while in flight and is
    charged what the provider reported at settle, so the counter ends equal to the usage the
    provider billed; a request whose worst case no longer fits is refused with type `tokens`."""
    run = uuid.uuid4().hex
    c = oai(stack, "rl-tokens", run)
    used = 0
    for _ in range(3):
        raw = c.chat.completions.with_raw_response.create(model="gpt-4o-mini", max_tokens=40, messages=MSG)
        u = raw.parse().usage
        assert raw.headers["x-ratelimit-limit-tokens"] == "400"
        # remaining = limit - what settled before - this request's whole reservation (> its usage)
        assert int(raw.headers["x-ratelimit-remaining-tokens"]) <= 400 - used - 40
        used += u.prompt_tokens + u.completion_tokens
        rec = attribution.get(raw.headers["x-tollgate-request-id"])
        assert rec["budgets"] == ["rl-budget"]  # the record lists budgets; rate limits count tokens apart
    assert counter_total(stack, f"tollgate:rl:rl-tokens:tokens:*run={run}") == used
    with pytest.raises(openai.RateLimitError) as e:
        c.chat.completions.create(model="gpt-4o-mini", max_tokens=400, messages=MSG)
    assert e.value.body["type"] == "tokens" and e.value.body["code"] == "rate_limit_exceeded"
    assert counter_total(stack, f"tollgate:rl:rl-tokens:tokens:*run={run}") == used  # the refusal held nothing


def test_burst_of_64_concurrent_clients_never_exceeds_the_limit(stack: Stack):
    run = uuid.uuid4().hex
    body = {"model": "gpt-4o-mini", "max_tokens": 8, "messages": MSG}
    headers = {"authorization": "Bearer key-budget", **tag("rl-burst", run), "x-fake-token-latency-ms": "20"}

    async def burst() -> list[int]:
        async with httpx.AsyncClient(base_url=stack.base_url, timeout=30) as h:
            replies = await asyncio.gather(*(h.post("/v1/chat/completions", json=body, headers=headers)
                                             for _ in range(64)))
        return [r.status_code for r in replies]

    statuses = asyncio.run(burst())
    assert statuses.count(200) == 20 and statuses.count(429) == 44, sorted(statuses)
    assert counter_total(stack, f"tollgate:rl:rl-burst:requests:*run={run}") == 20
