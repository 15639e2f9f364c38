"""Unit tests of the usage parsers, the SSE parser and request parsing."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from extproc.errors import GatewayError
from extproc.pricing import Usage
from extproc.providers import APIS, SSEParser, StreamState


def sse(*events: tuple[str, dict | str]) -> bytes:
    out = b""
    for name, data in events:
        payload = data if isinstance(data, str) else json.dumps(data)
        out += (f"event: {name}\n" if name else "").encode() + f"data: {payload}\n\n".encode()
    return out


def run_stream(api: str, raw: bytes, chunks: list[int] | None = None) -> StreamState:
    parser, state, a = SSEParser(), StreamState(), APIS[api]
    pieces = [raw] if not chunks else [raw[i:j] for i, j in zip([0] + chunks, chunks + [len(raw)])]
    for piece in pieces:
        for ev, data in parser.feed(piece):
            a.on_event(state, ev, data)
    for ev, data in parser.flush():
        a.on_event(state, ev, data)
    return state


# ---- JSON usage -----------------------------------------------------------------------------

def test_chat_usage_subtracts_cached_tokens():
    u = APIS["/v1/chat/completions"].usage_from_json(
        {"usage": {"prompt_tokens": 100, "completion_tokens": 7, "prompt_tokens_details": {"cached_tokens": 40}}})
    assert u == Usage(input_tokens=60, cached_input_tokens=40, output_tokens=7)


def test_responses_usage():
    u = APIS["/v1/responses"].usage_from_json(
        {"usage": {"input_tokens": 50, "input_tokens_details": {"cached_tokens": 10}, "output_tokens": 9}})
    assert u == Usage(input_tokens=40, cached_input_tokens=10, output_tokens=9)


def test_anthropic_usage_keeps_cache_fields_apart():
    u = APIS["/v1/messages"].usage_from_json({"usage": {
        "input_tokens": 12, "output_tokens": 30, "cache_read_input_tokens": 100, "cache_creation_input_tokens": 20}})
    assert u == Usage(input_tokens=12, cached_input_tokens=100, cache_write_tokens=20, output_tokens=30)


def test_embeddings_usage_and_garbage():
    assert APIS["/v1/embeddings"].usage_from_json({"usage": {"prompt_tokens": 8, "total_tokens": 8}}) == Usage(input_tokens=8)
    for api in APIS.values():
        assert api.usage_from_json({"usage": "nope"}) is None
        assert api.usage_from_json({}) is None
    # Negative or non-integer counts are never trusted.
    assert APIS["/v1/chat/completions"].usage_from_json({"usage": {"prompt_tokens": -5, "completion_tokens": "9"}}) == Usage()


# ---- streamed usage -------------------------------------------------------------------------

CHAT_STREAM = sse(
    ("", {"model": "gpt-4o-2024-08-06", "choices": [{"delta": {"role": "assistant", "content": "a"}}]}),
    ("", {"choices": [{"delta": {"content": " b"}}]}),
    ("", {"choices": [{"delta": {}, "finish_reason": "stop"}]}),
    ("", {"choices": [], "usage": {"prompt_tokens": 11, "completion_tokens": 2}}),
    ("", "[DONE]"),
)

ANTHROPIC_STREAM = sse(
    ("message_start", {"type": "message_start", "message": {"model": "claude-x", "usage": {
        "input_tokens": 20, "cache_read_input_tokens": 5, "cache_creation_input_tokens": 3, "output_tokens": 1}}}),
    ("content_block_start", {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
    ("ping", {"type": "ping"}),
    ("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "hi"}}),
    ("content_block_stop", {"type": "content_block_stop", "index": 0}),
    ("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 15}}),
    ("message_stop", {"type": "message_stop"}),
)

RESPONSES_STREAM = sse(
    ("response.created", {"type": "response.created", "response": {"model": "gpt-4.1"}}),
    ("response.output_text.delta", {"type": "response.output_text.delta", "delta": "x"}),
    ("response.completed", {"type": "response.completed", "response": {"model": "gpt-4.1", "usage": {
        "input_tokens": 30, "input_tokens_details": {"cached_tokens": 0}, "output_tokens": 4}}}),
)


def test_chat_stream_usage_and_served_model():
    s = run_stream("/v1/chat/completions", CHAT_STREAM)
    assert s.done and s.usage == Usage(input_tokens=11, output_tokens=2)
    assert s.served_model == "gpt-4o-2024-08-06" and s.output_deltas == 2


def test_anthropic_stream_usage():
    s = run_stream("/v1/messages", ANTHROPIC_STREAM)
    assert s.done and s.usage == Usage(input_tokens=20, cached_input_tokens=5, cache_write_tokens=3, output_tokens=15)
    assert s.served_model == "claude-x" and s.output_deltas == 1


def test_responses_stream_usage():
    s = run_stream("/v1/responses", RESPONSES_STREAM)
    assert s.done and s.usage == Usage(input_tokens=30, output_tokens=4)


def test_stream_cut_before_usage_is_not_done():
    s = run_stream("/v1/chat/completions", CHAT_STREAM[: CHAT_STREAM.index(b'{"choices": []')])
    assert not s.done and s.usage is None and s.output_deltas == 2


# ---- SSE parser -----------------------------------------------------------------------------

def test_sse_crlf_comments_and_multiline_data():
    p = SSEParser()
    raw = b": keepalive\r\nevent: a\r\ndata: 1\r\ndata: 2\r\n\r\ndata:3\r\n\r\n"
    assert p.feed(raw) == [("a", b"1\n2"), ("", b"3")]


def test_sse_cr_split_from_lf_across_chunks():
    p = SSEParser()
    assert p.feed(b"data: x\r") == []
    assert p.feed(b"\n\r") == []
    assert p.feed(b"\ndata: y\r\n\r\n") == [("", b"x"), ("", b"y")]


@pytest.mark.parametrize("stream", [CHAT_STREAM, ANTHROPIC_STREAM, RESPONSES_STREAM,
                                    CHAT_STREAM.replace(b"\n", b"\r\n")])
@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_sse_any_split_gives_the_same_events(stream, data):
    whole = SSEParser().feed(stream)
    cuts = sorted(set(data.draw(st.lists(st.integers(min_value=1, max_value=len(stream) - 1), max_size=30))))
    p, got = SSEParser(), []
    for i, j in zip([0] + cuts, cuts + [len(stream)]):
        got += p.feed(stream[i:j])
    got += p.flush()
    assert got == whole


# ---- request parsing ------------------------------------------------------------------------

def test_parse_reads_model_stream_and_cap():
    raw = json.dumps({"model": "gpt-4o", "stream": True, "max_completion_tokens": 50,
                      "messages": [{"role": "user", "content": "hi"}]}).encode()
    r = APIS["/v1/chat/completions"].parse(raw)
    assert (r.model, r.stream, r.output_cap) == ("gpt-4o", True, 50)
    assert r.input_tokens_upper >= len(raw)


def test_image_parts_raise_the_input_bound():
    raw = json.dumps({"model": "gpt-4o", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "https://x/y.png"}}]}]}).encode()
    assert APIS["/v1/chat/completions"].parse(raw).input_tokens_upper >= 3000


@pytest.mark.parametrize("raw, code", [(b"{", "invalid_json"), (b"3", "invalid_json"), (b"{}", "missing_model"),
                                       (b'{"model": 5}', "missing_model"),
                                       (b'{"model": "m", "max_tokens": true}', "invalid_value")])
def test_parse_errors(raw, code):
    with pytest.raises(GatewayError) as e:
        APIS["/v1/messages"].parse(raw)
    assert e.value.status == 400 and e.value.code == code


def test_prepare_stream_adds_include_usage_once():
    api = APIS["/v1/chat/completions"]
    body = {"model": "m", "stream": True, "stream_options": {"foo": 1}}
    assert api.prepare_stream(body) and body["stream_options"] == {"foo": 1, "include_usage": True}
    assert not api.prepare_stream(body)
