"""Streams that do not end normally, through the real stack with the openai and anthropic SDKs.

* A client that closes a stream after N chunks is charged its input plus about N chunks of output.
* A provider stream cut mid-way is settled and recorded `complete: false`, `end: interrupted`
  (Envoy does not tell the ext_proc which side went away; its access log does: see
  Processor.close).
* The live cap: a provider that ignores the (clamped) output cap is stopped at the request's
  reservation; the SDK gets a parseable error event and the settled cost is at most one chunk over.
* Every one of them settles exactly once: the budget's settled spend, read from the next
  request's `x-tollgate-budget-spent-usd`, equals the recorded cost.

Requests are sent by the `budget-bot` key, tagged with their own `suite` / `run`
(tests/policies/test-streaming.yaml), so each test reads its own counter. The fake provider
streams one token per delta, `x-fake-token-latency-ms` apart.
"""

from __future__ import annotations

import json
import time
import uuid

import anthropic
import httpx
import openai
import pytest
import yaml

from extproc.fakeprovider.server import count_input_tokens
from tests.conftest import REPO, JsonLog

PRICES = yaml.safe_load((REPO / "policies" / "prices.yaml").read_text())["prices"]["models"]
# Per-token prices, USD: gpt-4o and claude-haiku-4-5 from the shipped price table.
GPT_IN, GPT_OUT = PRICES["gpt-4o"]["input"] / 1e6, PRICES["gpt-4o"]["output"] / 1e6
HAIKU_IN, HAIKU_OUT = PRICES["claude-haiku-4-5*"]["input"] / 1e6, PRICES["claude-haiku-4-5*"]["output"] / 1e6
MESSAGES = [{"role": "user", "content": "tell me a long story"}]


def tag(suite: str) -> dict[str, str]:
    return {"x-tollgate-metadata": json.dumps({"suite": suite, "run": uuid.uuid4().hex})}


@pytest.fixture(scope="module")
def oai(stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key="key-budget", max_retries=0)


@pytest.fixture(scope="module")
def claude(stack) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=stack.base_url, api_key="key-budget", max_retries=0)


def settled_spend(stack, headers: dict[str, str]) -> float:
    """The budget's settled spend, as the next request with the same tag is told (200 or 429)."""
    r = httpx.post(f"{stack.base_url}/v1/chat/completions", headers={**headers, "authorization": "Bearer key-budget"},
                   json={"model": "gpt-4o", "max_tokens": 1, "messages": [{"role": "user", "content": "x"}]})
    assert r.status_code in (200, 429), r.text
    return float(r.headers["x-tollgate-budget-spent-usd"])


def assert_settled_once(stack, headers: dict[str, str], rec: dict) -> None:
    assert rec["settlement"] == "settled"
    assert settled_spend(stack, headers) == pytest.approx(rec["cost_usd"], abs=1.5e-6)


# ---- the client goes away ------------------------------------------------------------------

@pytest.mark.parametrize("n", [1, 6])
def test_client_closing_chat_stream_pays_input_and_chunks_seen(stack, oai, attribution: JsonLog, n):
    headers = {**tag("stream-settle"), "x-fake-token-latency-ms": "40", "x-fake-output-tokens": "200"}
    with oai.chat.completions.with_streaming_response.create(
            model="gpt-4o", messages=MESSAGES, stream=True, extra_headers=headers) as resp:
        request_id = resp.headers["x-tollgate-request-id"]
        seen = 0
        for chunk in resp.parse():
            seen += bool(chunk.choices and chunk.choices[0].delta.content)
            if seen == n:
                break
    rec = attribution.get(request_id)
    assert rec["stream"] is True and rec["complete"] is False and rec["end"] == "interrupted"
    # Input: the request's upper bound (chat streams report usage only at the end); output: the
    # deltas seen, one token each for the fake, plus at most the few in flight when it closed.
    assert rec["input_tokens"] >= count_input_tokens({"messages": MESSAGES}, "chat")
    assert n <= rec["output_tokens"] <= n + 3
    want = rec["input_tokens"] * GPT_IN + rec["output_tokens"] * GPT_OUT
    assert rec["cost_usd"] == pytest.approx(want, abs=1e-6)
    assert 0 < rec["cost_usd"] < rec["reserved_usd"] / 10  # never $0, nowhere near the reservation
    assert_settled_once(stack, headers, rec)


def test_client_closing_anthropic_stream_pays_reported_input_and_chunks_seen(stack, claude, attribution):
    n = 5
    headers = {**tag("stream-settle"), "x-fake-token-latency-ms": "40", "x-fake-output-tokens": "200"}
    with claude.messages.with_streaming_response.create(
            model="claude-haiku-4-5", max_tokens=1000, messages=MESSAGES, stream=True, extra_headers=headers) as resp:
        request_id = resp.headers["x-tollgate-request-id"]
        seen = 0
        for event in resp.parse():
            seen += event.type == "content_block_delta"
            if seen == n:
                break
    rec = attribution.get(request_id)
    assert rec["complete"] is False and rec["end"] == "interrupted"
    # message_start told the real input count: that is charged, not the request's upper bound.
    assert rec["input_tokens"] == count_input_tokens({"messages": MESSAGES}, "anthropic")
    assert n <= rec["output_tokens"] <= n + 3
    want = rec["input_tokens"] * HAIKU_IN + rec["output_tokens"] * HAIKU_OUT
    assert rec["cost_usd"] == pytest.approx(want, abs=1e-6)
    assert 0 < rec["cost_usd"] < rec["reserved_usd"] / 10
    assert_settled_once(stack, headers, rec)


# ---- the provider goes away ----------------------------------------------------------------

def test_chat_stream_cut_by_provider_is_settled_and_incomplete(stack, oai, attribution):
    headers = {**tag("stream-settle"), "x-fake-token-latency-ms": "20", "x-fake-cut-after": "4"}
    with oai.chat.completions.with_streaming_response.create(
            model="gpt-4o", messages=MESSAGES, stream=True, extra_headers=headers) as resp:
        request_id = resp.headers["x-tollgate-request-id"]
        with pytest.raises((httpx.HTTPError, openai.APIError)):
            for _ in resp.parse():
                pass
    rec = attribution.get(request_id)
    assert rec["stream"] is True and rec["complete"] is False and rec["end"] == "interrupted"
    assert 3 <= rec["output_tokens"] <= 4 and rec["input_tokens"] > 0
    assert 0 < rec["cost_usd"] < rec["reserved_usd"]
    assert_settled_once(stack, headers, rec)


def test_anthropic_stream_cut_by_provider_is_settled_and_incomplete(stack, claude, attribution):
    headers = {**tag("stream-settle"), "x-fake-token-latency-ms": "20", "x-fake-cut-after": "4"}
    with claude.messages.with_streaming_response.create(
            model="claude-haiku-4-5", max_tokens=500, messages=MESSAGES, stream=True, extra_headers=headers) as resp:
        request_id = resp.headers["x-tollgate-request-id"]
        with pytest.raises(Exception):  # the SDK's transport (httpx2) sees an incomplete chunked body
            for _ in resp.parse():
                pass
    rec = attribution.get(request_id)
    assert rec["complete"] is False and rec["end"] == "interrupted"
    assert rec["input_tokens"] == count_input_tokens({"messages": MESSAGES}, "anthropic")
    assert 3 <= rec["output_tokens"] <= 4
    assert 0 < rec["cost_usd"] < rec["reserved_usd"]
    assert_settled_once(stack, headers, rec)


# ---- the live cap --------------------------------------------------------------------------

def test_live_cap_stops_chat_stream_with_parseable_error(stack, oai, attribution):
    # No max_tokens: the $0.001 clamp budget lowers the cap to what it can pay for; the provider
    # ignores it and would stream 400 tokens.
    headers = {**tag("stream-cap"), "x-fake-ignore-max-tokens": "1", "x-fake-output-tokens": "400",
               "x-fake-token-latency-ms": "2"}
    with oai.chat.completions.with_streaming_response.create(
            model="gpt-4o", messages=MESSAGES, stream=True, extra_headers=headers) as resp:
        request_id = resp.headers["x-tollgate-request-id"]
        clamped = int(resp.headers["x-tollgate-max-tokens-clamped"])
        text = []
        with pytest.raises(openai.APIError) as e:
            for chunk in resp.parse():
                if chunk.choices and chunk.choices[0].delta.content:
                    text.append(chunk.choices[0].delta.content)
    assert e.value.body["type"] == "budget_exceeded" and e.value.body["code"] == "budget_exceeded"
    assert "stream-live-cap" in e.value.message
    rec = attribution.get(request_id)
    assert rec["decision"] == "clamped" and rec["complete"] is False and rec["end"] == "budget_cap"
    # Stopped one token past the clamped cap (the one chunk that crossed the reservation), and
    # the client got exactly the tokens it is charged for.
    assert rec["output_tokens"] == clamped + 1 == len(text)
    reserved_nusd = round(rec["reserved_usd"] * 1e9)
    assert reserved_nusd < rec["cost_nusd"] <= reserved_nusd + round(GPT_OUT * 1e9)
    assert_settled_once(stack, headers, rec)


def test_live_cap_stops_anthropic_stream_with_error_event(stack, claude, attribution):
    headers = {**tag("stream-cap"), "x-fake-ignore-max-tokens": "1", "x-fake-output-tokens": "600",
               "x-fake-token-latency-ms": "2"}
    with claude.messages.with_streaming_response.create(
            model="claude-haiku-4-5", max_tokens=4000, messages=MESSAGES, stream=True, extra_headers=headers) as resp:
        request_id = resp.headers["x-tollgate-request-id"]
        assert int(resp.headers["x-tollgate-max-tokens-clamped"]) < 600
        deltas = 0
        with pytest.raises(anthropic.APIError) as e:
            for event in resp.parse():
                deltas += event.type == "content_block_delta"
    assert e.value.body["type"] == "error" and e.value.body["error"]["type"] == "budget_exceeded"
    rec = attribution.get(request_id)
    assert rec["complete"] is False and rec["end"] == "budget_cap" and rec["output_tokens"] == deltas
    reserved_nusd = round(rec["reserved_usd"] * 1e9)
    assert reserved_nusd < rec["cost_nusd"] <= reserved_nusd + round(HAIKU_OUT * 1e9)
    assert_settled_once(stack, headers, rec)


def test_live_cap_never_cuts_a_stream_that_keeps_to_its_cap(stack, oai, attribution):
    """A provider that honours max_tokens uses at most the reservation: never cut, priced exactly."""
    headers = {**tag("stream-cap"), "x-fake-output-tokens": "400"}
    with oai.chat.completions.with_streaming_response.create(
            model="gpt-4o", messages=MESSAGES, stream=True, extra_headers=headers) as resp:
        request_id = resp.headers["x-tollgate-request-id"]
        clamped = int(resp.headers["x-tollgate-max-tokens-clamped"])
        chunks = list(resp.parse())
    assert chunks[-1].usage.completion_tokens == clamped
    rec = attribution.get(request_id)
    assert rec["complete"] is True and rec["end"] == "completed" and rec["output_tokens"] == clamped
    assert rec["cost_usd"] <= rec["reserved_usd"]


def test_live_cap_after_the_error_the_upstream_is_stopped(stack, attribution):
    """A raw client that keeps reading gets the error event, then the stream ends (Envoy resets it
    at the next upstream chunk, which also stops the provider) instead of waiting for the rest."""
    headers = {**tag("stream-cap"), "authorization": "Bearer key-budget", "x-fake-ignore-max-tokens": "1",
               "x-fake-output-tokens": "400", "x-fake-token-latency-ms": "20"}
    body = {"model": "gpt-4o", "stream": True, "messages": MESSAGES}
    got = b""
    started = time.monotonic()
    with httpx.stream("POST", f"{stack.base_url}/v1/chat/completions", json=body, headers=headers, timeout=30) as r:
        request_id = r.headers["x-tollgate-request-id"]
        try:
            for chunk in r.iter_raw():
                got += chunk
        except httpx.HTTPError:
            pass  # the reset after the error event
    elapsed = time.monotonic() - started
    events = [e for e in got.split(b"\n\n") if e.strip()]
    assert events[-1] == b"data: [DONE]"
    assert json.loads(events[-2].removeprefix(b"data: "))["error"]["code"] == "budget_exceeded"
    rec = attribution.get(request_id)
    assert rec["end"] == "budget_cap"
    assert elapsed < 400 * 0.020 * 0.6  # well before the provider would have finished
