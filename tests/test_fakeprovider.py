"""The fake upstream provider, checked with the real openai and anthropic SDKs."""

from __future__ import annotations

import base64
import math
import random
import struct
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import anthropic
import httpx
import openai
import pytest

try:  # newer SDKs ship their own fork of httpx and let its transport errors through
    import httpx2

    _HTTPX2_ERRORS: tuple[type[BaseException], ...] = (httpx2.TransportError,)
except ImportError:
    _HTTPX2_ERRORS = ()

from extproc.fakeprovider.server import count_input_tokens, output_token_count
from extproc.procs import Proc, free_port, wait_for_port


REPO = Path(__file__).resolve().parent.parent
STREAM_CUT_ERRORS = (anthropic.APIConnectionError, openai.APIConnectionError, httpx.TransportError, *_HTTPX2_ERRORS)


@pytest.fixture(scope="module")
def base_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    proc = Proc(
        "fakeprovider",
        [sys.executable, "-m", "extproc.fakeprovider", "--port", str(port)],
        log_path=tmp_path_factory.mktemp("fakeprovider") / "fakeprovider.log",
    ).start()
    try:
        wait_for_port(port, proc=proc)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def oai(base_url: str) -> Iterator[openai.OpenAI]:
    client = openai.OpenAI(base_url=base_url + "/v1", api_key="sk-test-openai", max_retries=0, timeout=5)
    yield client
    client.close()


@pytest.fixture(scope="module")
def ant(base_url: str) -> Iterator[anthropic.Anthropic]:
    client = anthropic.Anthropic(base_url=base_url, api_key="sk-ant-test", max_retries=0, timeout=5)
    yield client
    client.close()


def tok(text: str) -> int:
    return math.ceil(len(text.encode()) / 4)


def words(n: int) -> str:
    return " ".join(f"tok{i}" for i in range(n))


SYSTEM = "You are terse."  # 14 bytes -> 4 tokens
USER = "hello world, ünïcode"  # 23 bytes -> 6 tokens
CHAT_MESSAGES = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": USER}]
CHAT_IN = tok(SYSTEM) + tok(USER) + 3 * 2  # 16
CHAT_OUT = 16 + CHAT_IN % 16  # 16


def test_formula_constants() -> None:
    assert (CHAT_IN, CHAT_OUT) == (16, 16)


# ---------------------------------------------------------------------------- chat completions


def test_chat_plain(oai: openai.OpenAI) -> None:
    r = oai.chat.completions.create(model="gpt-4o-mini", messages=CHAT_MESSAGES)
    assert r.object == "chat.completion"
    assert r.model == "gpt-4o-mini"
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == words(CHAT_OUT)
    assert r.choices[0].finish_reason == "stop"
    u = r.usage
    assert (u.prompt_tokens, u.completion_tokens, u.total_tokens) == (CHAT_IN, CHAT_OUT, CHAT_IN + CHAT_OUT)
    assert u.prompt_tokens_details.cached_tokens == 0
    assert u.completion_tokens_details.reasoning_tokens == 0


def test_chat_list_parts_and_cap(oai: openai.OpenAI) -> None:
    msgs = [{"role": "user", "content": [{"type": "text", "text": "abcdefghi"}, {"type": "text", "text": "xy"}]}]
    expected_in = tok("abcdefghi") + tok("xy") + 3  # 3 + 1 + 3 = 7
    r = oai.chat.completions.create(model="gpt-4o", messages=msgs, max_completion_tokens=5)
    assert r.usage.prompt_tokens == expected_in
    assert r.usage.completion_tokens == 5
    assert r.choices[0].message.content == words(5)
    assert r.choices[0].finish_reason == "length"
    # the cap only caps: a larger max_tokens leaves the default alone
    r = oai.chat.completions.create(model="gpt-4o", messages=msgs, max_tokens=1000)
    assert r.usage.completion_tokens == 16 + expected_in % 16
    assert r.choices[0].finish_reason == "stop"


def test_chat_output_override_header(oai: openai.OpenAI) -> None:
    r = oai.chat.completions.create(
        model="gpt-4o", messages=CHAT_MESSAGES, extra_headers={"x-fake-output-tokens": "3"})
    assert r.usage.completion_tokens == 3
    assert r.choices[0].message.content == "tok0 tok1 tok2"
    r = oai.chat.completions.create(
        model="gpt-4o", messages=CHAT_MESSAGES, max_tokens=2, extra_headers={"x-fake-output-tokens": "40"})
    assert r.usage.completion_tokens == 2


def test_chat_stream_without_usage(oai: openai.OpenAI) -> None:
    chunks = list(oai.chat.completions.create(model="gpt-4o", messages=CHAT_MESSAGES, stream=True))
    assert all(c.object == "chat.completion.chunk" and c.model == "gpt-4o" for c in chunks)
    assert all(c.usage is None for c in chunks)
    content = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(content) == CHAT_OUT
    assert "".join(content) == words(CHAT_OUT)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_chat_stream_with_usage(oai: openai.OpenAI) -> None:
    chunks = list(oai.chat.completions.create(
        model="gpt-4o", messages=CHAT_MESSAGES, stream=True, stream_options={"include_usage": True}))
    last = chunks[-1]
    assert last.choices == []
    assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (CHAT_IN, CHAT_OUT)
    assert last.usage.total_tokens == CHAT_IN + CHAT_OUT
    assert all(c.usage is None for c in chunks[:-1])
    assert chunks[-2].choices[0].finish_reason == "stop"
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) == CHAT_OUT


def test_chat_stream_raw_wire(base_url: str) -> None:
    body = {"model": "gpt-4o", "messages": CHAT_MESSAGES, "stream": True,
            "stream_options": {"include_usage": True}}
    r = httpx.post(base_url + "/v1/chat/completions", json=body, headers={"x-fake-output-tokens": "2"})
    assert r.headers["content-type"].startswith("text/event-stream")
    lines = [ln for ln in r.text.split("\n") if ln]
    assert all(ln.startswith("data: ") for ln in lines)
    assert lines[-1] == "data: [DONE]"
    assert len(lines) == 2 + 1 + 1 + 1  # two tokens, finish, usage, [DONE]


# ---------------------------------------------------------------------------- responses

RESP_INSTR = "Answer briefly."  # 15 bytes -> 4
RESP_INPUT = "What is a tollgate?"  # 19 bytes -> 5
RESP_IN = tok(RESP_INSTR) + tok(RESP_INPUT)  # 9, a string input is not a message
RESP_OUT = 16 + RESP_IN % 16  # 25


def test_responses_plain(oai: openai.OpenAI) -> None:
    r = oai.responses.create(model="gpt-4o", instructions=RESP_INSTR, input=RESP_INPUT)
    assert r.object == "response" and r.status == "completed" and r.model == "gpt-4o"
    assert r.output[0].type == "message" and r.output[0].role == "assistant"
    assert r.output[0].content[0].type == "output_text"
    assert r.output[0].content[0].annotations == []
    assert r.output_text == words(RESP_OUT)
    u = r.usage
    assert (u.input_tokens, u.output_tokens, u.total_tokens) == (RESP_IN, RESP_OUT, RESP_IN + RESP_OUT)
    assert u.input_tokens_details.cached_tokens == 0
    assert u.output_tokens_details.reasoning_tokens == 0


def test_responses_message_list_and_cap(oai: openai.OpenAI) -> None:
    items = [{"role": "user", "content": [{"type": "input_text", "text": "abcd"}]},
             {"role": "user", "content": "efghi"}]
    r = oai.responses.create(model="gpt-4o", input=items, max_output_tokens=7)
    assert r.usage.input_tokens == (3 + 1) + (3 + 2)
    assert r.usage.output_tokens == 7


def test_responses_stream(oai: openai.OpenAI) -> None:
    events = list(oai.responses.create(
        model="gpt-4o", instructions=RESP_INSTR, input=RESP_INPUT, stream=True))
    types = [e.type for e in events]
    assert types[0] == "response.created"
    assert types[-1] == "response.completed"
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    assert len(deltas) == RESP_OUT
    assert "".join(deltas) == words(RESP_OUT)
    assert [e.sequence_number for e in events] == list(range(len(events)))
    done = events[-1].response
    assert done.status == "completed" and done.model == "gpt-4o"
    assert done.output_text == words(RESP_OUT)
    assert (done.usage.input_tokens, done.usage.output_tokens) == (RESP_IN, RESP_OUT)


def test_responses_stream_helper(oai: openai.OpenAI) -> None:
    with oai.responses.stream(model="gpt-4o", input=RESP_INPUT) as stream:
        for _ in stream:
            pass
        final = stream.get_final_response()
    assert final.usage.input_tokens == tok(RESP_INPUT)
    assert final.output_text == words(16 + tok(RESP_INPUT) % 16)


# ---------------------------------------------------------------------------- embeddings, models


def test_embeddings(oai: openai.OpenAI) -> None:
    r = oai.embeddings.create(model="text-embedding-3-small", input="hello there")
    assert r.object == "list" and r.model == "text-embedding-3-small"
    assert len(r.data) == 1 and r.data[0].index == 0 and len(r.data[0].embedding) == 8
    assert all(-1.0 <= x <= 1.0 for x in r.data[0].embedding)
    assert r.usage.prompt_tokens == r.usage.total_tokens == tok("hello there")

    r2 = oai.embeddings.create(model="text-embedding-3-small", input=["hello there", "general kenobi"])
    assert [d.index for d in r2.data] == [0, 1]
    assert r2.data[0].embedding == r.data[0].embedding  # deterministic
    assert r2.data[1].embedding != r.data[0].embedding
    assert r2.usage.prompt_tokens == tok("hello there") + tok("general kenobi")

    r3 = oai.embeddings.create(model="text-embedding-3-small", input="hello there", encoding_format="base64")
    floats = struct.unpack("<8f", base64.b64decode(r3.data[0].embedding))
    assert list(floats) == pytest.approx(r.data[0].embedding, abs=1e-6)


def test_models(oai: openai.OpenAI) -> None:
    ids = [m.id for m in oai.models.list()]
    assert "gpt-4o" in ids and len(ids) >= 2


# ---------------------------------------------------------------------------- anthropic

ANT_MESSAGES = [{"role": "user", "content": USER},
                {"role": "assistant", "content": [{"type": "text", "text": "ok"}]},
                {"role": "user", "content": "again"}]
ANT_IN = tok(SYSTEM) + (3 + tok(USER)) + (3 + tok("ok")) + (3 + tok("again"))  # 4+9+4+5 = 22
ANT_OUT = 16 + ANT_IN % 16  # 22


def test_anthropic_plain(ant: anthropic.Anthropic) -> None:
    m = ant.messages.create(model="claude-sonnet-4-6", system=SYSTEM, messages=ANT_MESSAGES, max_tokens=1000)
    assert m.type == "message" and m.role == "assistant" and m.model == "claude-sonnet-4-6"
    assert m.content[0].type == "text" and m.content[0].text == words(ANT_OUT)
    assert m.stop_reason == "end_turn"
    assert (m.usage.input_tokens, m.usage.output_tokens) == (ANT_IN, ANT_OUT)
    assert m.usage.cache_read_input_tokens == 0 and m.usage.cache_creation_input_tokens == 0

    m = ant.messages.create(model="claude-haiku-4-5", messages=ANT_MESSAGES, max_tokens=4)
    assert m.usage.output_tokens == 4 and m.stop_reason == "max_tokens"
    assert m.usage.input_tokens == ANT_IN - tok(SYSTEM)


def test_anthropic_stream(ant: anthropic.Anthropic) -> None:
    events = list(ant.messages.create(
        model="claude-sonnet-4-6", system=SYSTEM, messages=ANT_MESSAGES, max_tokens=1000, stream=True))
    types = [e.type for e in events]
    assert types[:2] == ["message_start", "content_block_start"]
    assert types[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    start, delta = events[0], events[-2]
    assert start.message.model == "claude-sonnet-4-6"
    assert start.message.usage.input_tokens == ANT_IN and start.message.usage.output_tokens == 1
    assert delta.usage.output_tokens == ANT_OUT and delta.delta.stop_reason == "end_turn"
    texts = [e.delta.text for e in events if e.type == "content_block_delta"]
    assert len(texts) == ANT_OUT and "".join(texts) == words(ANT_OUT)


def test_anthropic_stream_helper(ant: anthropic.Anthropic) -> None:
    with ant.messages.stream(model="claude-sonnet-4-6", messages=ANT_MESSAGES, max_tokens=1000) as s:
        final = s.get_final_message()
    assert final.usage.output_tokens == 16 + (ANT_IN - tok(SYSTEM)) % 16
    assert final.usage.input_tokens == ANT_IN - tok(SYSTEM)


def test_anthropic_raw_wire(base_url: str) -> None:
    body = {"model": "claude-sonnet-4-6", "messages": ANT_MESSAGES, "max_tokens": 100, "stream": True}
    r = httpx.post(base_url + "/v1/messages", json=body, headers={"x-fake-output-tokens": "2"})
    events = [ln[len("event: "):] for ln in r.text.split("\n") if ln.startswith("event: ")]
    assert events == ["message_start", "content_block_start", "ping", "content_block_delta",
                      "content_block_delta", "content_block_stop", "message_delta", "message_stop"]


# ---------------------------------------------------------------------------- cache headers


def test_cache_headers_openai(oai: openai.OpenAI) -> None:
    r = oai.chat.completions.create(model="gpt-4o", messages=CHAT_MESSAGES, extra_headers={"x-fake-cache-read": "10"})
    assert r.usage.prompt_tokens == CHAT_IN
    assert r.usage.prompt_tokens_details.cached_tokens == 10
    r = oai.chat.completions.create(model="gpt-4o", messages=CHAT_MESSAGES, extra_headers={"x-fake-cache-read": "999"})
    assert r.usage.prompt_tokens_details.cached_tokens == CHAT_IN  # capped
    r = oai.responses.create(model="gpt-4o", input=RESP_INPUT, extra_headers={"x-fake-cache-read": "2"})
    assert r.usage.input_tokens == tok(RESP_INPUT)
    assert r.usage.input_tokens_details.cached_tokens == 2


def test_cache_headers_anthropic(ant: anthropic.Anthropic) -> None:
    hdrs = {"x-fake-cache-read": "5", "x-fake-cache-write": "7"}
    m = ant.messages.create(model="claude-sonnet-4-6", system=SYSTEM, messages=ANT_MESSAGES, max_tokens=1000,
                            extra_headers=hdrs)
    u = m.usage
    assert (u.cache_read_input_tokens, u.cache_creation_input_tokens) == (5, 7)
    assert u.input_tokens == ANT_IN - 12
    assert u.output_tokens == ANT_OUT  # output depends on the total input, not the split

    events = list(ant.messages.create(model="claude-sonnet-4-6", system=SYSTEM, messages=ANT_MESSAGES,
                                      max_tokens=1000, stream=True, extra_headers=hdrs))
    su = events[0].message.usage
    assert (su.input_tokens, su.cache_read_input_tokens, su.cache_creation_input_tokens) == (ANT_IN - 12, 5, 7)

    m = ant.messages.create(model="claude-sonnet-4-6", system=SYSTEM, messages=ANT_MESSAGES, max_tokens=1000,
                            extra_headers={"x-fake-cache-read": "20", "x-fake-cache-write": "20"})
    u = m.usage
    assert (u.cache_read_input_tokens, u.cache_creation_input_tokens, u.input_tokens) == (20, ANT_IN - 20, 0)


# ---------------------------------------------------------------------------- error hooks


def test_status_hook_openai(oai: openai.OpenAI, base_url: str) -> None:
    with pytest.raises(openai.RateLimitError) as ei:
        oai.chat.completions.create(model="gpt-4o", messages=CHAT_MESSAGES, extra_headers={"x-fake-status": "429"})
    assert ei.value.status_code == 429
    assert set(ei.value.body) == {"message", "type", "param", "code"}
    with pytest.raises(openai.InternalServerError):
        oai.chat.completions.create(model="gpt-4o", messages=CHAT_MESSAGES, stream=True,
                                    extra_headers={"x-fake-status": "500"})
    r = httpx.post(base_url + "/v1/responses", json={"model": "gpt-4o", "input": "x"},
                   headers={"x-fake-status": "503"})
    assert r.status_code == 503
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}


def test_status_hook_anthropic(ant: anthropic.Anthropic, base_url: str) -> None:
    with pytest.raises(anthropic.RateLimitError) as ei:
        ant.messages.create(model="claude-sonnet-4-6", messages=ANT_MESSAGES, max_tokens=10,
                            extra_headers={"x-fake-status": "429"})
    assert ei.value.body["type"] == "error"
    assert ei.value.body["error"]["type"] == "rate_limit_error"
    r = httpx.post(base_url + "/v1/messages", json={"model": "claude-sonnet-4-6", "messages": [], "max_tokens": 1},
                   headers={"x-fake-status": "529"})
    assert r.status_code == 529
    body = r.json()
    assert body == {"type": "error", "error": {"type": "overloaded_error", "message": body["error"]["message"]},
                    "request_id": r.headers["request-id"]}
    assert body["request_id"].startswith("req_")


def test_bad_requests(base_url: str) -> None:
    r = httpx.post(base_url + "/v1/chat/completions", content=b"{not json")
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    r = httpx.post(base_url + "/v1/chat/completions", json={"messages": []})
    assert r.status_code == 400 and "model" in r.json()["error"]["message"]
    r = httpx.post(base_url + "/v1/messages", content=b"[1, 2")
    assert r.status_code == 400 and r.json()["type"] == "error"
    r = httpx.post(base_url + "/v1/messages", json={"max_tokens": 3, "messages": []})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    r = httpx.get(base_url + "/v2/nothing")
    assert r.status_code == 404 and r.json()["error"]["code"] is None


def test_cut_after_openai_chat(oai: openai.OpenAI) -> None:
    got: list = []
    with pytest.raises(openai.APIConnectionError):
        for chunk in oai.chat.completions.create(
                model="gpt-4o", messages=CHAT_MESSAGES, stream=True, stream_options={"include_usage": True},
                extra_headers={"x-fake-cut-after": "3"}):
            got.append(chunk)
    assert len(got) == 3
    assert all(c.usage is None and c.choices[0].finish_reason is None for c in got)


def test_cut_after_openai_responses(oai: openai.OpenAI) -> None:
    got: list = []
    with pytest.raises(openai.APIConnectionError):
        for ev in oai.responses.create(model="gpt-4o", input=RESP_INPUT, stream=True,
                                       extra_headers={"x-fake-cut-after": "2", "x-fake-token-latency-ms": "1"}):
            got.append(ev.type)
    assert got.count("response.output_text.delta") == 2
    assert "response.completed" not in got


def test_cut_after_anthropic(ant: anthropic.Anthropic) -> None:
    got: list = []
    with pytest.raises(STREAM_CUT_ERRORS) as ei:
        for ev in ant.messages.create(model="claude-sonnet-4-6", messages=ANT_MESSAGES, max_tokens=100,
                                      stream=True, extra_headers={"x-fake-cut-after": "4"}):
            got.append(ev.type)
    assert isinstance(ei.value, anthropic.APIConnectionError) or "incomplete" in str(ei.value)
    assert got.count("content_block_delta") == 4
    assert "message_delta" not in got and "message_stop" not in got


def test_cut_after_raw_is_incomplete(base_url: str) -> None:
    body = {"model": "gpt-4o", "messages": CHAT_MESSAGES, "stream": True}
    with pytest.raises(httpx.RemoteProtocolError):
        httpx.post(base_url + "/v1/chat/completions", json=body, headers={"x-fake-cut-after": "1"})
    # the server is still fine afterwards
    assert httpx.get(base_url + "/v1/models").status_code == 200


# ---------------------------------------------------------------------------- echo, latency


def test_echo_headers(oai: openai.OpenAI, ant: anthropic.Anthropic, base_url: str) -> None:
    raw = oai.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=CHAT_MESSAGES)
    assert raw.headers["x-fake-authorization"] == "Bearer sk-test-openai"
    assert raw.headers["x-fake-api-key"] == ""
    assert raw.headers["x-fake-model"] == "gpt-4o-mini"
    raw = ant.messages.with_raw_response.create(model="claude-haiku-4-5", messages=ANT_MESSAGES, max_tokens=5)
    # anthropic SDKs send the key as x-api-key (classic) or as "Authorization: Bearer" (2.x)
    assert (raw.headers["x-fake-api-key"], raw.headers["x-fake-authorization"]) in {
        ("sk-ant-test", ""), ("", "Bearer sk-ant-test")}
    assert raw.headers["x-fake-model"] == "claude-haiku-4-5"
    r = httpx.post(base_url + "/v1/messages", json={"model": "claude-x", "messages": [], "max_tokens": 1},
                   headers={"x-fake-status": "401", "x-api-key": "k1", "authorization": "Bearer t"})
    assert (r.headers["x-fake-api-key"], r.headers["x-fake-authorization"], r.headers["x-fake-model"]) == (
        "k1", "Bearer t", "claude-x")
    r = httpx.post(base_url + "/v1/chat/completions", json={"model": "m", "messages": CHAT_MESSAGES, "stream": True})
    assert r.headers["x-fake-model"] == "m"


def test_latency_header(oai: openai.OpenAI) -> None:
    hdrs = {"x-fake-token-latency-ms": "20", "x-fake-output-tokens": "5"}
    t0 = time.monotonic()
    stamps = []
    for c in oai.chat.completions.create(model="gpt-4o", messages=CHAT_MESSAGES, stream=True, extra_headers=hdrs):
        stamps.append(time.monotonic())
    assert stamps[-1] - t0 >= 0.1
    t0 = time.monotonic()
    oai.chat.completions.create(model="gpt-4o", messages=CHAT_MESSAGES, extra_headers=hdrs)
    assert time.monotonic() - t0 >= 0.1


# ---------------------------------------------------------------------------- formula functions


def test_input_tokens_never_exceed_body_bytes() -> None:
    import orjson

    bodies = [
        ("chat", {"model": "m", "messages": [{"role": "user", "content": ""}] * 50}),
        ("chat", {"model": "m", "messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "€"}]}),
        ("anthropic", {"model": "m", "system": [{"type": "text", "text": "s"}],
                       "messages": [{"role": "user", "content": [{"type": "text", "text": "x"}] * 30}]}),
        ("responses", {"model": "m", "input": [{"role": "user", "content": "z"}] * 20, "instructions": "i"}),
        ("embeddings", {"model": "m", "input": ["a", "b", "ü" * 7]}),
        ("embeddings", {"model": "m", "input": [1, 2, 3]}),
    ]
    for api, body in bodies:
        raw = orjson.dumps(body)
        n = count_input_tokens(body, api, len(raw))
        assert 0 < n <= len(raw), (api, n, len(raw))
    assert count_input_tokens(bodies[1][1], "chat") == 2 * 3 + 1 + 1

    rng = random.Random(0)
    alphabet = "ab €ü😀\n\""
    for _ in range(300):
        texts = ["".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 12))) for _ in range(rng.randrange(1, 6))]
        for api, body in [
            ("chat", {"model": "m", "messages": [{"role": "user", "content": t} for t in texts]}),
            ("anthropic", {"model": "m", "system": texts[0],
                           "messages": [{"role": "user", "content": [{"type": "text", "text": t} for t in texts]}]}),
            ("responses", {"model": "m", "instructions": texts[0], "input": [{"role": "user", "content": t} for t in texts]}),
            ("embeddings", {"model": "m", "input": texts}),
        ]:
            raw = orjson.dumps(body)
            n = count_input_tokens(body, api, len(raw))
            assert n <= len(raw)
            # the clamp is a guard only: the formula itself stays under the body size
            assert count_input_tokens(body, api, 10**9) == n


def test_output_token_count() -> None:
    assert output_token_count({}, "chat", 17) == (17, False)
    assert output_token_count({"max_tokens": 4}, "chat", 17) == (4, True)
    assert output_token_count({"max_completion_tokens": 4}, "chat", 0) == (4, True)
    assert output_token_count({"max_output_tokens": 100}, "responses", 31) == (31, False)
    assert output_token_count({"max_tokens": 4}, "responses", 31) == (31, False)
    assert output_token_count({}, "anthropic", 5, override=2) == (2, False)


# ---------------------------------------------------------------------------- fault hooks, ledger

import socket  # noqa: E402  (the fault-hook tests read the raw wire)
from urllib.parse import urlsplit  # noqa: E402

import orjson  # noqa: E402
from aiohttp.test_utils import TestClient, TestServer  # noqa: E402

from extproc.fakeprovider.server import build_app  # noqa: E402

# one small request per generating endpoint: (path, body)
ENDPOINTS = {
    "chat": ("/v1/chat/completions", {"model": "gpt-4o", "messages": CHAT_MESSAGES}),
    "responses": ("/v1/responses", {"model": "gpt-4o", "instructions": RESP_INSTR, "input": RESP_INPUT}),
    "embeddings": ("/v1/embeddings", {"model": "text-embedding-3-small", "input": ["hello there", "again"]}),
    "anthropic": ("/v1/messages", {"model": "claude-sonnet-4-6", "system": SYSTEM, "messages": ANT_MESSAGES,
                                   "max_tokens": 1000}),
}
STREAMING = ("chat", "responses", "anthropic")


def raw_post(base_url: str, path: str, body: dict, headers: dict[str, str] | None = None,
             timeout: float = 5.0) -> tuple[int, dict[str, str], bytes]:
    """POST over a bare socket and read until the server closes: ``(status, headers, raw body)``
    with the body exactly as sent on the wire (chunked framing included), so a test sees what
    an HTTP client library would hide or refuse."""
    url = urlsplit(base_url)
    data = orjson.dumps(body)
    head = [f"POST {path} HTTP/1.1", f"Host: {url.netloc}", "Content-Type: application/json",
            f"Content-Length: {len(data)}", "Connection: close"]
    head += [f"{k}: {v}" for k, v in (headers or {}).items()]
    with socket.create_connection((url.hostname, url.port), timeout=timeout) as sock:
        sock.sendall("\r\n".join(head).encode() + b"\r\n\r\n" + data)
        buf = b""
        while chunk := sock.recv(65536):
            buf += chunk
    header_block, _, rest = buf.partition(b"\r\n\r\n")
    lines = header_block.decode().split("\r\n")
    status = int(lines[0].split()[1])
    hdrs = {k.strip().lower(): v.strip() for k, v in (ln.split(":", 1) for ln in lines[1:])}
    return status, hdrs, rest


def dechunk(raw: bytes) -> tuple[list[bytes], bool]:
    """The data chunks of a chunked body and whether its terminating zero chunk arrived."""
    chunks: list[bytes] = []
    while raw:
        size_line, sep, raw = raw.partition(b"\r\n")
        if not sep:
            return chunks, False
        size = int(size_line, 16)
        if size == 0:
            return chunks, True
        chunks.append(raw[:size])
        raw = raw[size + 2:]
    return chunks, False


def output_of(api: str, answer: dict) -> int:
    """The output tokens a JSON answer reports (embeddings have none)."""
    if api == "embeddings":
        return 0
    return answer["usage"]["completion_tokens" if api == "chat" else "output_tokens"]


def ledger(base_url: str, **filters: str) -> list[dict]:
    r = httpx.get(base_url + "/_fake/ledger", params=filters)
    assert r.status_code == 200
    return r.json()


def entry_for(base_url: str, fake_id: str) -> dict:
    (entry,) = ledger(base_url, id=fake_id)
    return entry


def sse_payloads(text: str) -> list[tuple[str, dict | str]]:
    """``(event name or "", parsed data)`` per SSE event; ``[DONE]`` stays a string."""
    out: list[tuple[str, dict | str]] = []
    for block in text.split("\n\n"):
        if not block.strip():
            continue
        name, data = "", ""
        for ln in block.split("\n"):
            if ln.startswith("event: "):
                name = ln[len("event: "):]
            elif ln.startswith("data: "):
                data = ln[len("data: "):]
        out.append((name, data if data == "[DONE]" else orjson.loads(data)))
    return out


def test_ledger_records_what_was_billed(base_url: str) -> None:
    hdrs = {"x-fake-cache-read": "5", "x-fake-cache-write": "3", "x-request-id": "envoy-req-1"}
    r = httpx.post(base_url + "/v1/chat/completions", json=ENDPOINTS["chat"][1], headers=hdrs)
    fid = r.headers["x-fake-id"]
    assert fid == r.json()["id"]
    assert entry_for(base_url, fid) == {
        "id": fid, "api": "chat", "model": "gpt-4o", "request_id": "envoy-req-1", "stream": False,
        "input_tokens": CHAT_IN - 8, "output_tokens": CHAT_OUT, "cached": 5, "cache_write": 3,
        "cache_write_5m": 0, "cache_write_1h": 0, "cache_write_30m": 3, "cache_write_12h": 0,
        "reasoning_tokens": 0, "n": 1, "context_tokens": 0, "tool_input_tokens": 0,
        "web_search_requests": 0, "web_fetch_requests": 0, "tool_calls": {}, "iterations": [], "other_models": [],
        "previous_response_id": None, "error": None, "audio_input_tokens": 0, "audio_output_tokens": 0,
        "service_tier": "default", "inference_geo": None, "image_gen": None,
        "status": 200, "complete": True, "hooks": {"x-fake-cache-read": "5", "x-fake-cache-write": "3"}}
    assert [e["id"] for e in ledger(base_url, request_id="envoy-req-1")] == [fid]

    # Anthropic reports the same split on the wire; the ledger uses one convention for both
    r = httpx.post(base_url + "/v1/messages", json=ENDPOINTS["anthropic"][1], headers=hdrs)
    e = entry_for(base_url, r.headers["x-fake-id"])
    assert (e["input_tokens"], e["cached"], e["cache_write"]) == (r.json()["usage"]["input_tokens"], 5, 3)
    assert (e["cache_write_5m"], e["cache_write_1h"], e["cache_write_30m"]) == (3, 0, 0)
    assert e["output_tokens"] == r.json()["usage"]["output_tokens"] == ANT_OUT

    # a stream bills the token events it wrote; embeddings bill input only
    r = httpx.post(base_url + "/v1/responses", json={**ENDPOINTS["responses"][1], "stream": True},
                   headers={"x-fake-output-tokens": "7"})
    e = entry_for(base_url, r.headers["x-fake-id"])
    assert (e["api"], e["stream"], e["output_tokens"], e["complete"]) == ("responses", True, 7, True)
    r = httpx.post(base_url + "/v1/embeddings", json=ENDPOINTS["embeddings"][1])
    e = entry_for(base_url, r.headers["x-fake-id"])
    assert (e["input_tokens"], e["output_tokens"]) == (r.json()["usage"]["prompt_tokens"], 0)

    # errors bill nothing but are served, so they are recorded; count_tokens is free and is not
    r = httpx.post(base_url + "/v1/messages", json=ENDPOINTS["anthropic"][1], headers={"x-fake-status": "529"})
    e = entry_for(base_url, r.headers["x-fake-id"])
    assert (e["status"], e["input_tokens"], e["output_tokens"], e["model"]) == (529, 0, 0, "claude-sonnet-4-6")
    r = httpx.post(base_url + "/v1/chat/completions", content=b"{nope")
    assert entry_for(base_url, r.headers["x-fake-id"])["status"] == 400
    before = len(ledger(base_url))
    r = httpx.post(base_url + "/v1/messages/count_tokens", json=ENDPOINTS["anthropic"][1])
    assert r.status_code == 200 and "x-fake-id" not in r.headers
    assert len(ledger(base_url)) == before


def test_ledger_counts_a_cut_stream_up_to_the_cut(base_url: str) -> None:
    body = {**ENDPOINTS["anthropic"][1], "stream": True}
    with pytest.raises(httpx.RemoteProtocolError):
        httpx.post(base_url + "/v1/messages", json=body, headers={"x-fake-cut-after": "3", "x-request-id": "cut-1"})
    (e,) = ledger(base_url, request_id="cut-1")
    assert (e["output_tokens"], e["complete"]) == (3, False)


async def test_ledger_clear_and_bound() -> None:
    """In-process, with aiohttp's test client: DELETE clears, the size bound evicts the oldest."""
    async with TestClient(TestServer(build_app(ledger_size=2))) as client:
        ids = []
        for _ in range(3):
            r = await client.post("/v1/chat/completions", json=ENDPOINTS["chat"][1])
            ids.append(r.headers["x-fake-id"])
        r = await client.get("/_fake/ledger")
        assert [e["id"] for e in await r.json()] == ids[1:]
        assert r.headers["x-fake-ledger-dropped"] == "1"
        r = await client.delete("/_fake/ledger")
        assert r.status == 204
        assert await (await client.get("/_fake/ledger")).json() == []


@pytest.mark.parametrize("api", list(ENDPOINTS))
def test_truncate_body(base_url: str, api: str) -> None:
    path, body = ENDPOINTS[api]
    status, hdrs, got = raw_post(base_url, path, body, {"x-fake-truncate-body": "10"})
    assert status == 200 and hdrs["content-type"].startswith("application/json")
    full = int(hdrs["content-length"])
    assert full > 10 and got == got[:10] and len(got) == 10  # headers promise the whole body, 10 bytes came
    _, _, whole = raw_post(base_url, path, body)
    assert len(whole) == full  # the promised length is the real answer's
    e = entry_for(base_url, hdrs["x-fake-id"])
    assert (e["status"], e["complete"]) == (200, False)
    assert e["output_tokens"] == output_of(api, orjson.loads(whole))


def test_truncate_body_through_the_sdks(oai: openai.OpenAI, ant: anthropic.Anthropic) -> None:
    with pytest.raises(openai.APIConnectionError):
        oai.chat.completions.create(model="gpt-4o", messages=CHAT_MESSAGES, extra_headers={"x-fake-truncate-body": "0"})
    with pytest.raises(STREAM_CUT_ERRORS):
        ant.messages.create(model="claude-sonnet-4-6", messages=ANT_MESSAGES, max_tokens=10,
                            extra_headers={"x-fake-truncate-body": "40"})


def _strip_volatile(obj: object) -> object:
    """``obj`` without what differs between two identical requests (ids, times) and usage."""
    if isinstance(obj, dict):
        return {k: _strip_volatile(v) for k, v in obj.items() if k not in ("id", "created", "created_at", "usage")}
    if isinstance(obj, list):
        return [_strip_volatile(v) for v in obj]
    return obj


@pytest.mark.parametrize("api", list(ENDPOINTS))
def test_omit_usage_json(base_url: str, api: str) -> None:
    path, body = ENDPOINTS[api]
    normal = httpx.post(base_url + path, json=body).json()
    r = httpx.post(base_url + path, json=body, headers={"x-fake-omit-usage": "1"})
    got = r.json()
    if api == "responses":
        assert got["usage"] is None  # the Responses schema marks absent usage with null
    else:
        assert "usage" not in got
    assert _strip_volatile(got) == _strip_volatile(normal)  # otherwise exactly as usual
    e = entry_for(base_url, r.headers["x-fake-id"])
    assert e["output_tokens"] == output_of(api, normal)
    assert e["input_tokens"] > 0 and e["hooks"] == {"x-fake-omit-usage": "1"}


def test_omit_usage_streams(base_url: str) -> None:
    omit = {"x-fake-omit-usage": "1"}
    body = {**ENDPOINTS["chat"][1], "stream": True, "stream_options": {"include_usage": True}}
    r = httpx.post(base_url + "/v1/chat/completions", json=body, headers=omit)
    events = [d for _, d in sse_payloads(r.text)]
    assert events[-1] == "[DONE]"
    chunks = [d for d in events if isinstance(d, dict)]
    assert all("usage" not in c and c["choices"] for c in chunks)  # no usage field, no usage chunk
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert entry_for(base_url, r.headers["x-fake-id"])["output_tokens"] == CHAT_OUT

    r = httpx.post(base_url + "/v1/messages", json={**ENDPOINTS["anthropic"][1], "stream": True}, headers=omit)
    events = dict(sse_payloads(r.text))
    assert "usage" not in events["message_start"]["message"]
    assert "usage" not in events["message_delta"] and events["message_delta"]["delta"]["stop_reason"] == "end_turn"
    assert entry_for(base_url, r.headers["x-fake-id"])["output_tokens"] == ANT_OUT

    r = httpx.post(base_url + "/v1/responses", json={**ENDPOINTS["responses"][1], "stream": True}, headers=omit)
    events = sse_payloads(r.text)
    assert events[-1][0] == "response.completed"
    assert all(d["response"]["usage"] is None for _, d in events if "response" in d)
    assert entry_for(base_url, r.headers["x-fake-id"])["output_tokens"] == RESP_OUT


STALL_MS = 300


@pytest.mark.parametrize("api", list(ENDPOINTS))
def test_stall_json_sends_nothing_until_the_stall_ends(base_url: str, api: str) -> None:
    path, body = ENDPOINTS[api]
    hdrs = {"x-fake-stall-after-ms": str(STALL_MS), "x-request-id": f"stall-{api}"}
    # a client whose timeout is shorter than the stall gets nothing at all, not even headers ...
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(base_url + path, json=body, headers=hdrs, timeout=httpx.Timeout(5, read=STALL_MS / 3000))
    # ... yet the provider did the work and billed it
    (e,) = ledger(base_url, request_id=f"stall-{api}")
    t0 = time.monotonic()
    r = httpx.post(base_url + path, json=body, headers={"x-fake-stall-after-ms": str(STALL_MS)})
    assert r.status_code == 200 and time.monotonic() - t0 >= STALL_MS / 1000
    assert r.json()["model"] == body["model"]
    assert e["input_tokens"] > 0 and e["output_tokens"] == output_of(api, r.json())
    assert e["complete"] is False  # the first client had left when the answer was ready


@pytest.mark.parametrize("api", STREAMING)
def test_stall_stream_sends_every_event_then_holds_the_connection(base_url: str, api: str) -> None:
    path, body = ENDPOINTS[api]
    last_event = {"chat": b"data: [DONE]", "responses": b"event: response.completed",
                  "anthropic": b"event: message_stop"}[api]
    t0 = time.monotonic()
    seen = b""
    with httpx.stream("POST", base_url + path, json={**body, "stream": True},
                      headers={"x-fake-stall-after-ms": str(STALL_MS)}) as r:
        fid = r.headers["x-fake-id"]
        body_chunks = r.iter_raw()
        while last_event not in seen:
            seen += next(body_chunks)
        all_events_at = time.monotonic() - t0
        assert entry_for(base_url, fid)["complete"] is False  # still open
        for _ in body_chunks:
            pass
    ended_at = time.monotonic() - t0
    assert all_events_at < STALL_MS / 1000 <= ended_at
    assert entry_for(base_url, fid)["complete"] is True


@pytest.mark.parametrize("api", STREAMING)
def test_single_write_sends_the_whole_overrun_in_one_chunk(base_url: str, api: str) -> None:
    path, body = ENDPOINTS[api]
    body = {**body, "stream": True, ("max_output_tokens" if api == "responses" else "max_tokens"): 5}
    overrun = {"x-fake-ignore-max-tokens": "1", "x-fake-output-tokens": "40", "x-fake-token-latency-ms": "2"}
    # without the hook a paced stream is many chunks ...
    _, _, raw = raw_post(base_url, path, body, overrun)
    chunks, ended = dechunk(raw)
    assert ended and len(chunks) > 40
    # ... with it, the same events in one chunk, then the end of the body
    status, hdrs, raw = raw_post(base_url, path, body, {**overrun, "x-fake-single-write": "1"})
    assert status == 200 and hdrs["transfer-encoding"] == "chunked"
    (chunk,), ended = dechunk(raw)
    assert ended
    assert len(sse_payloads(chunk.decode())) == len(sse_payloads(b"".join(chunks).decode()))
    deltas = chunk.count(b"tok")
    assert deltas >= 40  # the overrun past max_tokens=5 is all in it
    e = entry_for(base_url, hdrs["x-fake-id"])
    assert (e["output_tokens"], e["complete"]) == (40, True)


def test_single_write_with_the_sdk(oai: openai.OpenAI) -> None:
    chunks = list(oai.chat.completions.create(
        model="gpt-4o", messages=CHAT_MESSAGES, stream=True, stream_options={"include_usage": True},
        max_tokens=2, extra_headers={"x-fake-single-write": "1", "x-fake-ignore-max-tokens": "1",
                                     "x-fake-output-tokens": "9"}))
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) == 9
    assert chunks[-1].usage.completion_tokens == 9


# ---------------------------------------------------------------------------- validation like the real APIs


def _post_json(base_url: str, path: str, body: dict, headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.post(base_url + path, json=body, headers=headers or {})


def _refusal_entry(base_url: str, r: httpx.Response, status: int) -> None:
    """A refusal is in the ledger, billed nothing."""
    e = entry_for(base_url, r.headers["x-fake-id"])
    assert (e["status"], e["input_tokens"], e["output_tokens"], e["cached"]) == (status, 0, 0, 0)


@pytest.mark.parametrize(("body", "status", "etype", "message"), [
    ({"model": "claude-sonnet-4-6", "messages": ANT_MESSAGES}, 400, "invalid_request_error",
     "max_tokens: Field required"),
    ({"model": "claude-sonnet-4-6", "messages": ANT_MESSAGES, "max_tokens": -1}, 400, "invalid_request_error",
     "max_tokens: Input should be greater than or equal to 0"),
    ({"model": "claude-sonnet-4-6", "messages": ANT_MESSAGES, "max_tokens": "9"}, 400, "invalid_request_error",
     "max_tokens: Input should be a valid integer"),
    ({"model": "claude-sonnet-4-6", "messages": "hello", "max_tokens": 9}, 400, "invalid_request_error",
     "messages: Input should be a valid list"),
    ({"model": "claude-sonnet-4-6", "messages": [], "max_tokens": 9}, 400, "invalid_request_error",
     "messages: at least one message is required"),
    ({"model": "claude-sonnet-4-6", "max_tokens": 9}, 400, "invalid_request_error", "messages: Field required"),
    ({"model": "claude-nonexistent-9", "messages": ANT_MESSAGES, "max_tokens": 9}, 404, "not_found_error",
     "model: claude-nonexistent-9"),
    ({"model": "gpt-4o", "messages": ANT_MESSAGES, "max_tokens": 9}, 404, "not_found_error", "model: gpt-4o"),
])
def test_anthropic_refusals(base_url: str, body: dict, status: int, etype: str, message: str) -> None:
    r = _post_json(base_url, "/v1/messages", body)
    assert r.status_code == status
    assert r.json() == {"type": "error", "error": {"type": etype, "message": message},
                        "request_id": r.headers["request-id"]}
    _refusal_entry(base_url, r, status)


def test_anthropic_refusals_through_the_sdk(ant: anthropic.Anthropic) -> None:
    with pytest.raises(anthropic.NotFoundError) as ei:
        ant.messages.create(model="claude-nonexistent-9", messages=ANT_MESSAGES, max_tokens=5)
    assert ei.value.body["error"]["type"] == "not_found_error"
    with pytest.raises(anthropic.BadRequestError):
        ant.messages.create(model="claude-sonnet-4-6", messages=[], max_tokens=5)
    with pytest.raises(anthropic.BadRequestError):  # the same refusal before any event of a stream
        ant.messages.create(model="claude-sonnet-4-6", messages=[], max_tokens=5, stream=True)
    # count_tokens checks the messages and the model, not max_tokens
    counted = ant.messages.count_tokens(model="claude-sonnet-4-6", messages=ANT_MESSAGES)
    assert counted.input_tokens == ANT_IN - tok(SYSTEM)
    with pytest.raises(anthropic.NotFoundError):
        ant.messages.count_tokens(model="claude-nonexistent-9", messages=ANT_MESSAGES)


def test_anthropic_max_tokens_zero_warms_the_cache(ant: anthropic.Anthropic, base_url: str) -> None:
    raw = ant.messages.with_raw_response.create(model="claude-sonnet-4-6", messages=ANT_MESSAGES, max_tokens=0,
                                                extra_headers={"x-fake-cache-write": "10"})
    m = raw.parse()
    assert m.content == [] and m.stop_reason == "max_tokens"
    assert (m.usage.output_tokens, m.usage.cache_creation_input_tokens) == (0, 10)
    e = entry_for(base_url, raw.headers["x-fake-id"])
    assert (e["output_tokens"], e["cache_write"], e["input_tokens"]) == (0, 10, ANT_IN - tok(SYSTEM) - 10)
    events = list(ant.messages.create(model="claude-sonnet-4-6", messages=ANT_MESSAGES, max_tokens=0, stream=True))
    assert [e.type for e in events] == ["message_start", "message_delta", "message_stop"]
    assert events[0].message.usage.output_tokens == 0 and events[1].usage.output_tokens == 0
    assert events[1].delta.stop_reason == "max_tokens"


CHAT_REFUSALS = [
    ({"model": "gpt-4o"}, 400, "messages", "missing_required_parameter"),
    ({"model": "gpt-4o", "messages": "hello"}, 400, "messages", "invalid_type"),
    ({"model": "gpt-4o", "messages": []}, 400, "messages", "empty_array"),
    ({"model": "gpt-4o", "messages": CHAT_MESSAGES, "n": 0}, 400, "n", "integer_below_min_value"),
    ({"model": "gpt-4o", "messages": CHAT_MESSAGES, "n": 129}, 400, "n", "integer_above_max_value"),
    ({"model": "gpt-4o", "messages": CHAT_MESSAGES, "n": "2"}, 400, "n", "invalid_type"),
    ({"model": "gpt-9-ultra", "messages": CHAT_MESSAGES}, 404, None, "model_not_found"),
    ({"model": "o3", "messages": CHAT_MESSAGES, "max_tokens": 10}, 400, "max_tokens", "unsupported_parameter"),
    ({"model": "gpt-5.2", "messages": CHAT_MESSAGES, "max_tokens": 10}, 400, "max_tokens", "unsupported_parameter"),
    ({"model": "o4-mini-2025-04-16", "messages": CHAT_MESSAGES, "max_tokens": 1}, 400, "max_tokens",
     "unsupported_parameter"),
]


@pytest.mark.parametrize(("body", "status", "param", "code"), CHAT_REFUSALS)
def test_openai_chat_refusals(base_url: str, body: dict, status: int, param: str | None, code: str) -> None:
    r = _post_json(base_url, "/v1/chat/completions", {**body, "stream": True})  # refused before streaming
    assert r.status_code == status and r.headers["content-type"].startswith("application/json")
    err = r.json()["error"]
    assert set(r.json()) == {"error"} and set(err) == {"message", "type", "param", "code"}
    assert (err["type"], err["param"], err["code"]) == ("invalid_request_error", param, code)
    assert err["message"]
    _refusal_entry(base_url, r, status)


def test_openai_refusals_through_the_sdk(oai: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as ei:
        oai.chat.completions.create(model="gpt-9-ultra", messages=CHAT_MESSAGES)
    assert ei.value.code == "model_not_found" and "gpt-9-ultra" in ei.value.message
    with pytest.raises(openai.BadRequestError) as ei:
        oai.chat.completions.create(model="o3", messages=CHAT_MESSAGES, max_tokens=10)
    assert (ei.value.code, ei.value.param) == ("unsupported_parameter", "max_tokens")
    # the same models take max_completion_tokens, and the non-reasoning ones max_tokens
    r = oai.chat.completions.create(model="o3", messages=CHAT_MESSAGES, max_completion_tokens=3)
    assert r.usage.completion_tokens == 3
    r = oai.chat.completions.create(model="gpt-4.1", messages=CHAT_MESSAGES, max_tokens=3)
    assert r.usage.completion_tokens == 3
    with pytest.raises(openai.NotFoundError):
        oai.responses.create(model="gpt-9-ultra", input="x")
    with pytest.raises(openai.NotFoundError):
        oai.embeddings.create(model="text-embedding-9", input="x")


@pytest.mark.parametrize(("body", "status", "param", "code"), [
    ({"model": "text-embedding-3-small", "input": "x", "dimensions": -1}, 400, "dimensions", "integer_below_min_value"),
    ({"model": "text-embedding-3-small", "input": "x", "dimensions": 0}, 400, "dimensions", "integer_below_min_value"),
    ({"model": "text-embedding-3-small", "input": "x", "dimensions": "8"}, 400, "dimensions", "invalid_type"),
    ({"model": "text-embedding-3-small"}, 400, "input", "missing_required_parameter"),
    ({"model": "text-embedding-ada-002", "input": "x", "dimensions": 8}, 400, None, None),
])
def test_embeddings_refusals(base_url: str, body: dict, status: int, param: str | None, code: str | None) -> None:
    r = _post_json(base_url, "/v1/embeddings", body)
    assert r.status_code == status
    err = r.json()["error"]
    assert (err["type"], err["param"], err["code"]) == ("invalid_request_error", param, code)
    _refusal_entry(base_url, r, status)


def test_embeddings_dimensions(oai: openai.OpenAI) -> None:
    r = oai.embeddings.create(model="text-embedding-3-large", input="hello there", dimensions=20)
    assert len(r.data[0].embedding) == 20 and all(-1.0 <= x <= 1.0 for x in r.data[0].embedding)
    short = oai.embeddings.create(model="text-embedding-3-large", input="hello there")
    assert r.data[0].embedding[:8] == short.data[0].embedding  # the first 8 are the default vector
    r64 = oai.embeddings.create(model="text-embedding-3-large", input="hello there", dimensions=20,
                                encoding_format="base64")
    assert list(struct.unpack("<20f", base64.b64decode(r64.data[0].embedding))) == pytest.approx(
        r.data[0].embedding, abs=1e-6)


async def test_models_served_follow_the_price_table(tmp_path) -> None:
    """Every model of policies/prices.yaml is served, globs included; more come from --prices,
    --models and $TOLLGATE_FAKE_MODELS; the OpenAI endpoints serve names outside OpenAI's namespace."""
    import yaml

    from extproc.fakeprovider.validation import ModelList

    prices = yaml.safe_load((REPO / "policies" / "prices.yaml").read_text())["prices"]["models"]
    extra = tmp_path / "zz-extra.yaml"
    extra.write_text("prices:\n  models:\n    claude-house-1: {input: 1, output: 2}\n")
    async with TestClient(TestServer(build_app(prices=[str(tmp_path)], models_extra=["claude-glob-*"]))) as client:
        for name in prices:
            model = name.replace("*", "-20250101")
            api = "/v1/messages" if model.startswith("claude") else "/v1/chat/completions"
            body = ({"model": model, "messages": ANT_MESSAGES, "max_tokens": 3} if api == "/v1/messages"
                    else {"model": model, "messages": CHAT_MESSAGES})
            r = await client.post(api, json=body)
            assert r.status == 200, (model, await r.text())
        for model in ("claude-house-1", "claude-glob-7"):
            r = await client.post("/v1/messages", json={"model": model, "messages": ANT_MESSAGES, "max_tokens": 3})
            assert r.status == 200, model
        for model, status in (("my-local-model", 200), ("@cf/meta/llama-9", 200), ("gpt-4o-unknown", 404),
                              ("o9-mini", 404), ("chatgpt-9o", 404)):
            r = await client.post("/v1/chat/completions", json={"model": model, "messages": CHAT_MESSAGES})
            assert r.status == status, model
        r = await client.post("/v1/messages", json={"model": "my-local-model", "messages": ANT_MESSAGES,
                                                    "max_tokens": 3})
        assert r.status == 404
        listed = [m["id"] for m in (await (await client.get("/v1/models")).json())["data"]]
        assert "gpt-4o" in listed and "claude-house-1" in listed and not any("*" in m for m in listed)
    env_models = ModelList.load(env={"TOLLGATE_FAKE_MODELS": "claude-env-*, gpt-env"})
    assert env_models.known("claude-env-3") and env_models.known("gpt-env") and not env_models.known("gpt-envy")


# ---------------------------------------------------------------------------- n choices


def test_chat_n_choices(oai: openai.OpenAI, base_url: str) -> None:
    raw = oai.chat.completions.with_raw_response.create(model="gpt-4o", messages=CHAT_MESSAGES, n=3, max_tokens=5)
    r = raw.parse()
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert all(c.message.content == words(5) and c.finish_reason == "length" for c in r.choices)
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (CHAT_IN, 3 * 5)
    e = entry_for(base_url, raw.headers["x-fake-id"])
    assert (e["n"], e["output_tokens"], e["input_tokens"]) == (3, 15, CHAT_IN)


def test_chat_n_choices_streamed(oai: openai.OpenAI, base_url: str) -> None:
    raw = oai.chat.completions.with_raw_response.create(
        model="gpt-4o", messages=CHAT_MESSAGES, n=2, stream=True, stream_options={"include_usage": True},
        extra_headers={"x-fake-output-tokens": "4"})
    chunks = list(raw.parse())
    texts: dict[int, str] = {}
    finishes: dict[int, str] = {}
    for c in chunks:
        for ch in c.choices:
            assert len(c.choices) == 1  # one choice per chunk
            texts[ch.index] = texts.get(ch.index, "") + (ch.delta.content or "")
            if ch.finish_reason:
                finishes[ch.index] = ch.finish_reason
    assert texts == {0: words(4), 1: words(4)} and finishes == {0: "stop", 1: "stop"}
    assert chunks[-1].usage.completion_tokens == 8
    e = entry_for(base_url, raw.headers["x-fake-id"])
    assert (e["n"], e["output_tokens"], e["complete"]) == (2, 8, True)


# ---------------------------------------------------------------------------- stored responses


def test_previous_response_id_bills_the_stored_conversation(oai: openai.OpenAI, base_url: str) -> None:
    r1 = oai.responses.create(model="gpt-4o", instructions=RESP_INSTR, input=RESP_INPUT)
    conv1 = r1.usage.input_tokens - tok(RESP_INSTR) + r1.usage.output_tokens  # instructions are not carried over
    raw = oai.responses.with_raw_response.create(model="gpt-4o", input="and then?", previous_response_id=r1.id)
    r2 = raw.parse()
    assert r2.previous_response_id == r1.id
    assert r2.usage.input_tokens == tok("and then?") + conv1
    assert r2.usage.output_tokens == 16 + tok("and then?") % 16  # the output follows the body alone
    e = entry_for(base_url, raw.headers["x-fake-id"])
    assert (e["context_tokens"], e["input_tokens"], e["previous_response_id"]) == (conv1, r2.usage.input_tokens, r1.id)
    # a chain re-reads the whole conversation; a streamed answer is stored once complete
    events = list(oai.responses.create(model="gpt-4o", input="more", previous_response_id=r2.id, stream=True,
                                       extra_headers={"x-fake-cache-read": "10"}))
    r3 = events[-1].response
    assert r3.usage.input_tokens == tok("more") + r2.usage.input_tokens + r2.usage.output_tokens
    assert r3.usage.input_tokens_details.cached_tokens == 10  # the stored conversation can be a cache hit
    r4 = oai.responses.create(model="gpt-4o", input="x", previous_response_id=r3.id)
    assert r4.usage.input_tokens == tok("x") + r3.usage.input_tokens + r3.usage.output_tokens


def test_previous_response_id_unknown_or_not_stored(oai: openai.OpenAI, base_url: str) -> None:
    with pytest.raises(openai.NotFoundError) as ei:
        oai.responses.create(model="gpt-4o", input="x", previous_response_id="resp_does_not_exist")
    assert ei.value.body == {"message": "Previous response with id 'resp_does_not_exist' not found.",
                             "type": "invalid_request_error", "param": "previous_response_id",
                             "code": "previous_response_not_found"}
    unstored = oai.responses.create(model="gpt-4o", input="x", store=False)
    assert unstored.store is False
    r = _post_json(base_url, "/v1/responses", {"model": "gpt-4o", "input": "y", "previous_response_id": unstored.id,
                                               "stream": True})
    assert r.status_code == 404 and r.json()["error"]["code"] == "previous_response_not_found"
    _refusal_entry(base_url, r, 404)
    # a failed stream is not stored either
    failed = _post_json(base_url, "/v1/responses", {"model": "gpt-4o", "input": "z", "stream": True},
                        {"x-fake-stream-error-after": "1"})
    rid = failed.headers["x-fake-id"]
    r = _post_json(base_url, "/v1/responses", {"model": "gpt-4o", "input": "y", "previous_response_id": rid})
    assert r.status_code == 404


# ---------------------------------------------------------------------------- cache writes by TTL


def test_anthropic_cache_creation_split(ant: anthropic.Anthropic, base_url: str) -> None:
    hdrs = {"x-fake-cache-read": "3", "x-fake-cache-write": "4", "x-fake-cache-write-1h": "6"}
    raw = ant.messages.with_raw_response.create(model="claude-sonnet-4-6", system=SYSTEM, messages=ANT_MESSAGES,
                                                max_tokens=1000, extra_headers=hdrs)
    u = raw.parse().usage
    assert (u.cache_creation.ephemeral_5m_input_tokens, u.cache_creation.ephemeral_1h_input_tokens) == (4, 6)
    assert u.cache_creation_input_tokens == 10 and u.cache_read_input_tokens == 3
    assert u.input_tokens == ANT_IN - 13
    e = entry_for(base_url, raw.headers["x-fake-id"])
    assert (e["input_tokens"], e["cached"], e["cache_write"], e["cache_write_5m"], e["cache_write_1h"]) == (
        ANT_IN - 13, 3, 10, 4, 6)
    start = next(iter(ant.messages.create(model="claude-sonnet-4-6", system=SYSTEM, messages=ANT_MESSAGES,
                                          max_tokens=1000, stream=True, extra_headers=hdrs)))
    su = start.message.usage
    assert (su.cache_creation.ephemeral_5m_input_tokens, su.cache_creation.ephemeral_1h_input_tokens) == (4, 6)
    # writes are capped at what reads left: 1h after 5m
    u = ant.messages.create(model="claude-sonnet-4-6", system=SYSTEM, messages=ANT_MESSAGES, max_tokens=10,
                            extra_headers={"x-fake-cache-read": "10", "x-fake-cache-write": "10",
                                           "x-fake-cache-write-1h": "10"}).usage
    assert (u.cache_read_input_tokens, u.cache_creation.ephemeral_5m_input_tokens,
            u.cache_creation.ephemeral_1h_input_tokens, u.input_tokens) == (10, 10, ANT_IN - 20, 0)


def test_openai_cache_writes(oai: openai.OpenAI, base_url: str) -> None:
    hdrs = {"x-fake-cache-read": "2", "x-fake-cache-write": "3", "x-fake-cache-write-12h": "1"}
    raw = oai.responses.with_raw_response.create(model="gpt-4o", instructions=RESP_INSTR, input=RESP_INPUT,
                                                 extra_headers=hdrs)
    u = raw.parse().usage
    assert u.input_tokens == RESP_IN  # the whole input, reads and writes included
    d = u.input_tokens_details
    assert (d.cached_tokens, d.cache_write_tokens) == (2, 4)
    assert (d.cache_write_tokens_details.ttl_30m_tokens, d.cache_write_tokens_details.ttl_12h_tokens) == (3, 1)
    e = entry_for(base_url, raw.headers["x-fake-id"])
    assert (e["input_tokens"], e["cached"], e["cache_write"], e["cache_write_30m"], e["cache_write_12h"]) == (
        RESP_IN - 6, 2, 4, 3, 1)
    plain = oai.responses.create(model="gpt-4o", input=RESP_INPUT).usage.input_tokens_details
    assert plain.cache_write_tokens == 0 and plain.cache_write_tokens_details is None
    raw = oai.chat.completions.with_raw_response.create(model="gpt-4o", messages=CHAT_MESSAGES, extra_headers=hdrs)
    u = raw.parse().usage
    assert (u.prompt_tokens, u.prompt_tokens_details.cached_tokens, u.prompt_tokens_details.cache_write_tokens) == (
        CHAT_IN, 2, 3)  # chat has only the default TTL
    e = entry_for(base_url, raw.headers["x-fake-id"])
    assert (e["input_tokens"], e["cache_write_30m"], e["cache_write_12h"]) == (CHAT_IN - 5, 3, 0)


# ---------------------------------------------------------------------------- cumulative message_delta


def test_message_delta_is_cumulative(base_url: str, ant: anthropic.Anthropic) -> None:
    hdrs = {"x-fake-cache-read": "5", "x-fake-cache-write": "2", "x-fake-cache-write-1h": "1"}
    body = {**ENDPOINTS["anthropic"][1], "stream": True}
    events = dict(sse_payloads(_post_json(base_url, "/v1/messages", body, hdrs).text))
    assert events["message_delta"]["usage"] == {"input_tokens": ANT_IN - 8, "cache_creation_input_tokens": 3,
                                                "cache_read_input_tokens": 5, "output_tokens": ANT_OUT}
    legacy = dict(sse_payloads(_post_json(base_url, "/v1/messages", body,
                                          {**hdrs, "x-fake-legacy-message-delta": "1"}).text))
    assert legacy["message_delta"]["usage"] == {"output_tokens": ANT_OUT}
    assert legacy["message_start"] == events["message_start"] | {"message": {
        **events["message_start"]["message"], "id": legacy["message_start"]["message"]["id"]}}
    with ant.messages.stream(model="claude-sonnet-4-6", system=SYSTEM, messages=ANT_MESSAGES, max_tokens=1000,
                             extra_headers=hdrs) as s:
        final = s.get_final_message()
    assert (final.usage.input_tokens, final.usage.output_tokens, final.usage.cache_read_input_tokens) == (
        ANT_IN - 8, ANT_OUT, 5)


# ---------------------------------------------------------------------------- server tools


def test_anthropic_server_tools(ant: anthropic.Anthropic, base_url: str) -> None:
    hdrs = {"x-fake-web-search": "2", "x-fake-web-fetch": "1", "x-fake-tool-input-tokens": "100",
            "x-fake-output-tokens": "3"}
    raw = ant.messages.with_raw_response.create(model="claude-sonnet-4-6", system=SYSTEM, messages=ANT_MESSAGES,
                                                max_tokens=1000, extra_headers=hdrs)
    m = raw.parse()
    assert [b.type for b in m.content] == ["server_tool_use", "web_search_tool_result"] * 2 + [
        "server_tool_use", "web_fetch_tool_result", "text"]
    uses = [b for b in m.content if b.type == "server_tool_use"]
    assert [b.name for b in uses] == ["web_search", "web_search", "web_fetch"]
    results = [b for b in m.content if b.type.endswith("_tool_result")]
    assert [r.tool_use_id for r in results] == [b.id for b in uses]
    assert m.content[1].content[0].type == "web_search_result" and m.content[5].content.type == "web_fetch_result"
    assert m.content[-1].text == words(3)
    u = m.usage
    assert (u.server_tool_use.web_search_requests, u.server_tool_use.web_fetch_requests) == (2, 1)
    assert u.input_tokens == ANT_IN + 100 and u.output_tokens == 3  # the results grew the input
    e = entry_for(base_url, raw.headers["x-fake-id"])
    assert (e["web_search_requests"], e["web_fetch_requests"]) == (2, 1)
    assert e["tool_calls"] == {"web_search": 2, "web_fetch": 1}
    assert (e["input_tokens"], e["tool_input_tokens"], e["output_tokens"]) == (ANT_IN + 100, 100, 3)
    # streamed: message_start shows the prompt, the cumulative message_delta the grown input and the calls
    events = list(ant.messages.create(model="claude-sonnet-4-6", system=SYSTEM, messages=ANT_MESSAGES,
                                      max_tokens=1000, stream=True, extra_headers=hdrs))
    assert events[0].message.usage.input_tokens == ANT_IN
    delta = next(e for e in events if e.type == "message_delta")
    assert (delta.usage.input_tokens, delta.usage.server_tool_use.web_search_requests) == (ANT_IN + 100, 2)
    with ant.messages.stream(model="claude-sonnet-4-6", system=SYSTEM, messages=ANT_MESSAGES, max_tokens=1000,
                             extra_headers=hdrs) as s:
        final = s.get_final_message()
    assert [b.type for b in final.content] == [b.type for b in m.content]
    assert final.content[0].input == {"query": "fake query 0"}
    assert final.usage.input_tokens == ANT_IN + 100 and final.usage.server_tool_use.web_fetch_requests == 1
    plain = ant.messages.create(model="claude-sonnet-4-6", messages=ANT_MESSAGES, max_tokens=5)
    assert plain.usage.server_tool_use is None


def test_responses_server_tools(oai: openai.OpenAI, base_url: str) -> None:
    hdrs = {"x-fake-web-search": "2", "x-fake-file-search": "1", "x-fake-code-interpreter": "1",
            "x-fake-image-generation": "1", "x-fake-tool-input-tokens": "50", "x-fake-output-tokens": "4"}
    raw = oai.responses.with_raw_response.create(model="gpt-4o", input=RESP_INPUT, extra_headers=hdrs)
    r = raw.parse()
    assert [o.type for o in r.output] == ["web_search_call", "web_search_call", "file_search_call",
                                          "code_interpreter_call", "image_generation_call", "message"]
    assert all(o.status == "completed" for o in r.output[:-1])
    assert r.output[0].action.type == "search" and r.output[3].container_id and r.output[4].result
    assert r.output_text == words(4)
    assert r.usage.input_tokens == tok(RESP_INPUT) + 50
    e = entry_for(base_url, raw.headers["x-fake-id"])
    assert e["tool_calls"] == {"web_search": 2, "file_search": 1, "code_interpreter": 1, "image_generation": 1}
    assert (e["web_search_requests"], e["input_tokens"], e["tool_input_tokens"]) == (2, tok(RESP_INPUT) + 50, 50)
    events = list(oai.responses.create(model="gpt-4o", input=RESP_INPUT, stream=True, extra_headers=hdrs))
    types = [ev.type for ev in events]
    for kind, phase in (("web_search_call", "searching"), ("file_search_call", "searching"),
                        ("code_interpreter_call", "interpreting"), ("image_generation_call", "generating")):
        for step in ("in_progress", phase, "completed"):
            assert f"response.{kind}.{step}" in types
    assert "response.code_interpreter_call_code.delta" in types
    assert [ev.sequence_number for ev in events] == list(range(len(events)))
    done = events[-1].response
    assert [o.type for o in done.output] == [o.type for o in r.output]
    added = [ev.output_index for ev in events if ev.type == "response.output_item.added"]
    assert added == list(range(6))
    assert done.usage.input_tokens == tok(RESP_INPUT) + 50


# ---------------------------------------------------------------------------- reasoning tokens


def test_reasoning_tokens_chat(oai: openai.OpenAI, base_url: str) -> None:
    hdrs = {"x-fake-reasoning-tokens": "30", "x-fake-output-tokens": "5"}
    raw = oai.chat.completions.with_raw_response.create(model="o3", messages=CHAT_MESSAGES, extra_headers=hdrs)
    r = raw.parse()
    assert r.choices[0].message.content == words(5)
    assert (r.usage.completion_tokens, r.usage.completion_tokens_details.reasoning_tokens) == (35, 30)
    e = entry_for(base_url, raw.headers["x-fake-id"])
    assert (e["output_tokens"], e["reasoning_tokens"]) == (35, 30)
    # the cap bounds reasoning plus answer: reasoning first
    r = oai.chat.completions.create(model="o3", messages=CHAT_MESSAGES, max_completion_tokens=32, extra_headers=hdrs)
    assert (r.choices[0].message.content, r.choices[0].finish_reason) == (words(2), "length")
    assert (r.usage.completion_tokens, r.usage.completion_tokens_details.reasoning_tokens) == (32, 30)
    r = oai.chat.completions.create(model="o3", messages=CHAT_MESSAGES, max_completion_tokens=20, extra_headers=hdrs)
    assert (r.choices[0].message.content, r.usage.completion_tokens) == ("", 20)
    # streamed: never a delta, but in the usage and the ledger (from the start of the stream)
    raw = oai.chat.completions.with_raw_response.create(
        model="o3", messages=CHAT_MESSAGES, stream=True, stream_options={"include_usage": True}, n=2,
        extra_headers=hdrs)
    chunks = list(raw.parse())
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) == 2 * 5
    assert chunks[-1].usage.completion_tokens_details.reasoning_tokens == 60
    assert chunks[-1].usage.completion_tokens == 70
    e = entry_for(base_url, raw.headers["x-fake-id"])
    assert (e["output_tokens"], e["reasoning_tokens"], e["n"]) == (70, 60, 2)
    _, hdrs_cut, _ = raw_post(base_url, "/v1/chat/completions",
                              {"model": "o3", "messages": CHAT_MESSAGES, "stream": True},
                              {**hdrs, "x-fake-cut-after": "1"})
    assert entry_for(base_url, hdrs_cut["x-fake-id"])["output_tokens"] == 31


def test_reasoning_tokens_responses(oai: openai.OpenAI, base_url: str) -> None:
    hdrs = {"x-fake-reasoning-tokens": "12", "x-fake-output-tokens": "3"}
    r = oai.responses.create(model="o4-mini", input=RESP_INPUT, extra_headers=hdrs)
    assert [o.type for o in r.output] == ["reasoning", "message"] and r.output[0].summary == []
    assert r.output_text == words(3)
    assert (r.usage.output_tokens, r.usage.output_tokens_details.reasoning_tokens) == (15, 12)
    events = list(oai.responses.create(model="o4-mini", input=RESP_INPUT, stream=True, extra_headers=hdrs))
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == words(3)
    assert events[-1].response.usage.output_tokens_details.reasoning_tokens == 12


# ---------------------------------------------------------------------------- usage.iterations


def test_compaction_iterations(ant: anthropic.Anthropic, base_url: str) -> None:
    hdrs = {"x-fake-compaction-iterations": "2", "x-fake-compaction-tokens": "5000,300", "x-fake-output-tokens": "4"}
    raw = ant.beta.messages.with_raw_response.create(model="claude-sonnet-4-6", system=SYSTEM,
                                                     messages=ANT_MESSAGES, max_tokens=1000, extra_headers=hdrs)
    m = raw.parse()
    assert [b.type for b in m.content] == ["compaction", "compaction", "text"] and m.content[0].content
    u = m.usage
    assert [it.type for it in u.iterations] == ["compaction", "compaction", "message"]
    assert [(it.input_tokens, it.output_tokens) for it in u.iterations] == [(5000, 300), (5000, 300), (ANT_IN, 4)]
    assert (u.input_tokens, u.output_tokens) == (ANT_IN, 4)  # the top level leaves compaction out
    e = entry_for(base_url, raw.headers["x-fake-id"])
    assert (e["input_tokens"], e["output_tokens"]) == (ANT_IN + 10000, 4 + 600)  # ... but it is billed
    assert [it["type"] for it in e["iterations"]] == ["compaction", "compaction", "message"]
    assert e["other_models"] == []
    with ant.beta.messages.stream(model="claude-sonnet-4-6", system=SYSTEM, messages=ANT_MESSAGES,
                                  max_tokens=1000, extra_headers=hdrs) as s:
        final = s.get_final_message()
        fid = s.response.headers["x-fake-id"]
    assert [b.type for b in final.content] == ["compaction", "compaction", "text"]
    assert final.content[1].content == m.content[1].content
    assert [it.type for it in final.usage.iterations] == ["compaction", "compaction", "message"]
    assert entry_for(base_url, fid)["output_tokens"] == 604  # compaction output billed once the stream starts


def test_advisor_iterations(ant: anthropic.Anthropic, base_url: str) -> None:
    hdrs = {"x-fake-advisor-model": "claude-opus-4-6", "x-fake-advisor-tokens": "900,40", "x-fake-output-tokens": "6",
            "x-fake-cache-read": "4"}
    raw = ant.beta.messages.with_raw_response.create(model="claude-sonnet-4-6", system=SYSTEM,
                                                     messages=ANT_MESSAGES, max_tokens=1000, extra_headers=hdrs)
    m = raw.parse()
    assert [b.type for b in m.content] == ["server_tool_use", "advisor_tool_result", "text"]
    assert m.content[0].name == "advisor" and m.content[1].content.type == "advisor_result"
    its = m.usage.iterations
    assert [it.type for it in its] == ["message", "advisor_message", "message"]
    assert its[1].model == "claude-opus-4-6" and (its[1].input_tokens, its[1].output_tokens) == (900, 40)
    assert (its[0].input_tokens, its[0].cache_read_input_tokens, its[0].output_tokens) == (ANT_IN - 4, 4, 0)
    assert (its[2].input_tokens, its[2].output_tokens) == (ANT_IN + 40, 6)
    u = m.usage
    assert (u.input_tokens, u.output_tokens, u.cache_read_input_tokens) == (2 * ANT_IN - 4 + 40, 6, 4)
    e = entry_for(base_url, raw.headers["x-fake-id"])
    assert (e["input_tokens"], e["cached"], e["output_tokens"]) == (u.input_tokens, 4, 6)
    assert e["other_models"] == [{"type": "advisor_message", "model": "claude-opus-4-6", "input_tokens": 900,
                                  "cached": 0, "cache_write_5m": 0, "cache_write_1h": 0, "output_tokens": 40}]
    # streamed: message_start has the first turn, message_delta the totals and the iterations
    body = {**ENDPOINTS["anthropic"][1], "stream": True}
    events = dict(sse_payloads(_post_json(base_url, "/v1/messages", body, hdrs).text))
    assert events["message_start"]["message"]["usage"]["input_tokens"] == ANT_IN - 4
    du = events["message_delta"]["usage"]
    assert du["input_tokens"] == u.input_tokens and [it["type"] for it in du["iterations"]] == [
        "message", "advisor_message", "message"]
    with ant.beta.messages.stream(model="claude-sonnet-4-6", system=SYSTEM, messages=ANT_MESSAGES,
                                  max_tokens=1000, extra_headers=hdrs) as s:
        final = s.get_final_message()
    assert final.usage.iterations[1].model == "claude-opus-4-6" and final.usage.input_tokens == u.input_tokens


# ---------------------------------------------------------------------------- errors mid-stream, empty model


def test_stream_error_chat(oai: openai.OpenAI, base_url: str) -> None:
    body = {"model": "gpt-4o", "messages": CHAT_MESSAGES, "stream": True, "stream_options": {"include_usage": True}}
    status, hdrs, raw = raw_post(base_url, "/v1/chat/completions", body, {"x-fake-stream-error-after": "3"})
    chunks, ended = dechunk(raw)
    assert status == 200 and ended  # the body ends cleanly
    events = [d for _, d in sse_payloads(b"".join(chunks).decode())]
    assert len(events) == 4 and "[DONE]" not in events
    assert events[-1] == {"error": {"message": events[-1]["error"]["message"], "type": "server_error",
                                    "param": None, "code": None}}
    e = entry_for(base_url, hdrs["x-fake-id"])
    assert (e["error"], e["input_tokens"], e["output_tokens"], e["complete"]) == ("server_error", 0, 0, True)
    got = []
    with pytest.raises(openai.APIError):
        for c in oai.chat.completions.create(model="gpt-4o", messages=CHAT_MESSAGES, stream=True,
                                             extra_headers={"x-fake-stream-error-after": "2"}):
            got.append(c)
    assert len(got) == 2
    _, hdrs, _ = raw_post(base_url, "/v1/chat/completions", body,
                          {"x-fake-stream-error-after": "3", "x-fake-failed-usage": "1"})
    e = entry_for(base_url, hdrs["x-fake-id"])
    assert (e["error"], e["input_tokens"], e["output_tokens"]) == ("server_error", CHAT_IN, 3)


def test_stream_error_responses(oai: openai.OpenAI, base_url: str) -> None:
    body = {**ENDPOINTS["responses"][1], "stream": True}
    r = _post_json(base_url, "/v1/responses", body, {"x-fake-stream-error-after": "2"})
    events = sse_payloads(r.text)
    assert [n for n, _ in events[-2:]] == ["error", "response.failed"]
    err, failed = events[-2][1], events[-1][1]
    assert (err["type"], err["code"]) == ("error", "server_error") and err["message"]
    assert failed["response"]["status"] == "failed" and failed["response"]["usage"] is None
    assert failed["response"]["error"]["code"] == "server_error"
    assert [d["sequence_number"] for _, d in events] == list(range(len(events)))
    assert sum(1 for n, _ in events if n == "response.output_text.delta") == 2
    e = entry_for(base_url, r.headers["x-fake-id"])
    assert (e["error"], e["input_tokens"], e["output_tokens"]) == ("server_error", 0, 0)
    evs = list(oai.responses.create(model="gpt-4o", input=RESP_INPUT, stream=True,
                                    extra_headers={"x-fake-stream-error-after": "1", "x-fake-failed-usage": "1",
                                                   "x-fake-reasoning-tokens": "5"}))
    assert [ev.type for ev in evs[-2:]] == ["error", "response.failed"]
    usage = evs[-1].response.usage
    assert (usage.input_tokens, usage.output_tokens, usage.output_tokens_details.reasoning_tokens) == (
        tok(RESP_INPUT), 6, 5)


def test_stream_error_anthropic(ant: anthropic.Anthropic, base_url: str) -> None:
    body = {**ENDPOINTS["anthropic"][1], "stream": True}
    status, hdrs, raw = raw_post(base_url, "/v1/messages", body, {"x-fake-stream-error-after": "2"})
    chunks, ended = dechunk(raw)
    assert status == 200 and ended
    events = sse_payloads(b"".join(chunks).decode())
    assert events[-1] == ("error", {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}})
    assert "message_delta" not in [n for n, _ in events]
    e = entry_for(base_url, hdrs["x-fake-id"])
    assert (e["error"], e["input_tokens"], e["output_tokens"]) == ("overloaded_error", 0, 0)
    got = []
    with pytest.raises(anthropic.APIStatusError) as ei:
        for ev in ant.messages.create(model="claude-sonnet-4-6", messages=ANT_MESSAGES, max_tokens=100, stream=True,
                                      extra_headers={"x-fake-stream-error-after": "1"}):
            got.append(ev.type)
    assert got.count("content_block_delta") == 1 and "overloaded" in str(ei.value).lower()


def test_empty_model_in_the_first_chunk(oai: openai.OpenAI, base_url: str) -> None:
    chunks = list(oai.chat.completions.create(model="gpt-4o", messages=CHAT_MESSAGES, stream=True,
                                              extra_headers={"x-fake-empty-model": "1"}))
    assert chunks[0].model == "" and {c.model for c in chunks[1:]} == {"gpt-4o"}
    events = list(oai.responses.create(model="gpt-4o", input=RESP_INPUT, stream=True,
                                       extra_headers={"x-fake-empty-model": "1"}))
    assert events[0].response.model == "" and events[-1].response.model == "gpt-4o"
    r = oai.chat.completions.create(model="gpt-4o", messages=CHAT_MESSAGES, extra_headers={"x-fake-empty-model": "1"})
    assert r.model == "gpt-4o"  # JSON answers are unaffected
