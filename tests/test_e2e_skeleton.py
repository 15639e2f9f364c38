"""The walking skeleton through the real stack: SDKs -> Envoy -> ext_proc -> fake provider.

Costs are checked against the price table with plain float arithmetic written here, not with
the gateway's own pricing code, to the micro-dollar.
"""

from __future__ import annotations

import json

import anthropic
import httpx
import openai
import pytest
import yaml

from tests.conftest import FAKE_GATEWAY_KEY, REPO, JsonLog

PRICES = yaml.safe_load((REPO / "policies" / "prices.yaml").read_text())["prices"]["models"]


def expected_cost(model_key: str, *, input=0, cached=0, cache_write=0, output=0) -> float:
    p = PRICES[model_key]
    return (input * p["input"] + cached * p.get("cached_input", p["input"])
            + cache_write * p.get("cache_write", p["input"]) + output * p["output"]) / 1e6


@pytest.fixture(scope="module")
def oai(stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key="demo", max_retries=0)


@pytest.fixture(scope="module")
def claude(stack) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=stack.base_url, api_key="demo", max_retries=0)


def test_chat_completion_is_priced_and_uses_gateway_key(oai, attribution: JsonLog):
    raw = oai.chat.completions.with_raw_response.create(
        model="gpt-4o", messages=[{"role": "user", "content": "hello there, how are you?"}])
    resp = raw.parse()
    assert resp.choices[0].message.content.startswith("tok0")
    assert resp.model == "gpt-4o"
    # The gateway-held key replaced the client's "demo" key on the way to the provider.
    assert raw.headers["x-fake-authorization"] == f"Bearer {FAKE_GATEWAY_KEY}"
    rec = attribution.get(raw.headers["x-tollgate-request-id"])
    assert rec["provider"] == "fake" and rec["model_served"] == "gpt-4o" and rec["status"] == 200
    assert rec["input_tokens"] == resp.usage.prompt_tokens and rec["output_tokens"] == resp.usage.completion_tokens
    want = expected_cost("gpt-4o", input=resp.usage.prompt_tokens, output=resp.usage.completion_tokens)
    assert rec["cost_usd"] == pytest.approx(want, abs=1e-6)
    assert float(raw.headers["x-tollgate-cost-usd"]) == pytest.approx(want, abs=1e-6)


def test_cached_tokens_priced_at_cached_rate(oai, attribution):
    raw = oai.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "x" * 400}],
        extra_headers={"x-fake-cache-read": "64"})
    usage = raw.parse().usage
    assert usage.prompt_tokens_details.cached_tokens == 64
    rec = attribution.get(raw.headers["x-tollgate-request-id"])
    assert rec["cached_input_tokens"] == 64
    want = expected_cost("gpt-4o-mini", input=usage.prompt_tokens - 64, cached=64, output=usage.completion_tokens)
    assert rec["cost_usd"] == pytest.approx(want, abs=1e-6)


def test_streaming_chat_is_priced_even_without_include_usage(oai, attribution):
    messages = [{"role": "user", "content": "stream me something please"}]
    plain = oai.chat.completions.create(model="gpt-4o", messages=messages)
    stream = oai.chat.completions.with_raw_response.create(model="gpt-4o", messages=messages, stream=True)
    request_id = stream.headers["x-tollgate-request-id"]
    chunks = list(stream.parse())
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    rec = attribution.get(request_id)
    assert rec["stream"] is True and rec["complete"] is True
    assert (rec["input_tokens"], rec["output_tokens"]) == (plain.usage.prompt_tokens, plain.usage.completion_tokens)
    want = expected_cost("gpt-4o", input=plain.usage.prompt_tokens, output=plain.usage.completion_tokens)
    assert rec["cost_usd"] == pytest.approx(want, abs=1e-6)


def test_embeddings_are_priced(oai, attribution):
    raw = oai.embeddings.with_raw_response.create(model="text-embedding-3-small", input=["one", "two three"])
    resp = raw.parse()
    assert len(resp.data) == 2
    rec = attribution.get(raw.headers["x-tollgate-request-id"])
    assert rec["api"] == "openai.embeddings" and rec["input_tokens"] == resp.usage.prompt_tokens
    assert rec["cost_usd"] == pytest.approx(expected_cost("text-embedding-3-small", input=resp.usage.prompt_tokens), abs=1e-6)


def test_responses_api_plain_and_streamed(oai, attribution):
    raw = oai.responses.with_raw_response.create(model="gpt-4.1", input="write a haiku", max_output_tokens=30)
    resp = raw.parse()
    rec = attribution.get(raw.headers["x-tollgate-request-id"])
    want = expected_cost("gpt-4.1", input=resp.usage.input_tokens, output=resp.usage.output_tokens)
    assert rec["cost_usd"] == pytest.approx(want, abs=1e-6)
    s = oai.responses.with_raw_response.create(model="gpt-4.1", input="write a haiku", max_output_tokens=30, stream=True)
    events = list(s.parse())
    assert events[-1].type == "response.completed"
    srec = attribution.get(s.headers["x-tollgate-request-id"])
    assert srec["stream"] is True and srec["cost_usd"] == pytest.approx(want, abs=1e-6)


def test_anthropic_messages_plain_and_streamed(claude, attribution):
    headers = {"x-fake-cache-read": "5", "x-fake-cache-write": "3"}
    kwargs = dict(model="claude-sonnet-4-6", max_tokens=40,
                  messages=[{"role": "user", "content": "Tell me about the sea, briefly."}])
    raw = claude.messages.with_raw_response.create(**kwargs, extra_headers=headers)
    msg = raw.parse()
    assert msg.model == "claude-sonnet-4-6"
    # Anthropic's wire format gets the gateway key in x-api-key; the client's own credential is gone.
    assert raw.headers["x-fake-api-key"] == FAKE_GATEWAY_KEY and raw.headers["x-fake-authorization"] == ""
    u = msg.usage
    want = expected_cost("claude-sonnet-4-6*", input=u.input_tokens, cached=u.cache_read_input_tokens,
                         cache_write=u.cache_creation_input_tokens, output=u.output_tokens)
    rec = attribution.get(raw.headers["x-tollgate-request-id"])
    assert (rec["cached_input_tokens"], rec["cache_write_tokens"]) == (5, 3)
    assert rec["cost_usd"] == pytest.approx(want, abs=1e-6)

    with claude.messages.with_streaming_response.create(**kwargs, stream=True, extra_headers=headers) as sresp:
        request_id = sresp.headers["x-tollgate-request-id"]
        text = "".join(e.delta.text for e in sresp.parse() if e.type == "content_block_delta")
    assert text == msg.content[0].text
    srec = attribution.get(request_id)
    assert srec["stream"] is True and srec["complete"] is True
    assert srec["cost_usd"] == pytest.approx(want, abs=1e-6)


def test_models_list(oai):
    ids = {m.id for m in oai.models.list()}
    assert {"gpt-4o", "gpt-5"} <= ids


def test_envoy_access_log_carries_cost(oai, stack):
    raw = oai.chat.completions.with_raw_response.create(model="gpt-4o", messages=[{"role": "user", "content": "log me"}])
    line = JsonLog(stack.access_log).get(raw.headers["x-tollgate-request-id"])
    assert line["model_served"] == "gpt-4o" and float(line["cost_usd"]) > 0
    assert line["upstream_cluster"] == "provider_fake"


# ---- bad input: status and provider-shaped JSON error through Envoy ---------------------------

def _post(stack, path: str, body: bytes, **headers) -> httpx.Response:
    return httpx.post(f"{stack.base_url}{path}", content=body,
                      headers={"content-type": "application/json", "authorization": "Bearer demo", **headers})


def _openai_error(r: httpx.Response) -> dict:
    assert r.headers["content-type"].startswith("application/json")
    err = r.json()["error"]
    assert set(err) >= {"message", "type", "param", "code"}
    return err


@pytest.mark.parametrize("body, status, code", [
    (b'{"model": "gpt-4o", "messages": [', 400, "invalid_json"),
    (b'[1, 2]', 400, "invalid_json"),
    (b'{"messages": []}', 400, "missing_model"),
    (b'{"model": "gpt-9-ultra", "messages": []}', 400, "model_not_found"),
    (b'{"model": "gpt-4o", "max_tokens": -5, "messages": []}', 400, "invalid_value"),
])
def test_bad_chat_bodies(stack, body, status, code):
    r = _post(stack, "/v1/chat/completions", body)
    assert r.status_code == status
    assert _openai_error(r)["code"] == code


def test_unknown_path_is_404(stack):
    r = _post(stack, "/v1/fine_tuning/jobs", b"{}")
    assert r.status_code == 404 and _openai_error(r)["code"] == "unknown_path"


def test_get_on_post_endpoint_is_405(stack):
    r = httpx.get(f"{stack.base_url}/v1/chat/completions", headers={"authorization": "Bearer demo"})
    assert r.status_code == 405 and _openai_error(r)["code"] == "method_not_allowed"


def test_oversized_body_is_413(stack):
    big = json.dumps({"model": "gpt-4o", "messages": [{"role": "user", "content": "x" * 70_000}]}).encode()
    r = _post(stack, "/v1/chat/completions", big)
    assert r.status_code == 413 and _openai_error(r)["code"] == "request_too_large"


def test_oversized_chunked_body_is_413(stack):
    big = json.dumps({"model": "gpt-4o", "messages": [{"role": "user", "content": "x" * 70_000}]}).encode()
    r = httpx.post(f"{stack.base_url}/v1/chat/completions", content=iter([big[:1000], big[1000:]]),
                   headers={"content-type": "application/json", "authorization": "Bearer demo"})
    assert r.status_code == 413 and _openai_error(r)["code"] == "request_too_large"


def test_anthropic_errors_have_anthropic_shape(stack):
    r = _post(stack, "/v1/messages", b'{"model": "claude-unknown", "max_tokens": 5, "messages": []}')
    assert r.status_code == 400
    body = r.json()
    assert body["type"] == "error" and body["error"]["type"] == "invalid_request_error"
    assert "claude-unknown" in body["error"]["message"]


def test_sdk_raises_typed_errors(oai, claude):
    with pytest.raises(openai.BadRequestError) as e:
        oai.chat.completions.create(model="nope-1", messages=[{"role": "user", "content": "x"}])
    assert e.value.code == "model_not_found"
    with pytest.raises(anthropic.BadRequestError):
        claude.messages.create(model="nope-1", max_tokens=5, messages=[{"role": "user", "content": "x"}])


def test_upstream_error_passes_through_and_costs_nothing(oai, attribution):
    with pytest.raises(openai.InternalServerError) as e:
        oai.chat.completions.with_raw_response.create(
            model="gpt-4o", messages=[{"role": "user", "content": "x"}], extra_headers={"x-fake-status": "500"})
    rec = attribution.get(e.value.response.headers["x-tollgate-request-id"])
    assert rec["status"] == 500 and rec["cost_usd"] == 0
