"""Every billed token and tool call charged as the provider bills it, through the real stack (issue 10).

Each case sends a request through Envoy and the ext_proc to the fake provider, asking it (with
`x-fake-*` headers) for one of the usage shapes that real providers send and Tollgate used to
undercharge: cache writes by TTL, reasoning tokens, server tool calls, Anthropic
`usage.iterations`, `n` choices, a failed stream, Azure's empty first-chunk model. The oracle is
the fake's ledger (what it billed, by kind) priced by tests/accounting.py's own reading of
policies/prices.yaml, not by extproc.pricing; the charge must equal it to the nano-dollar, the
record must say the number came from the provider, and the reservation must cover it.

Requests are sent by the `budget-bot` key, tagged `suite: lifecycle` (tests/policies/
test-lifecycle.yaml: a roomy budget, so every request holds a reservation).
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field

import httpx
import pytest

from tests.accounting import Prices, fake_ledger
from tests.conftest import JsonLog

CHAT, RESPONSES, MESSAGES = "/v1/chat/completions", "/v1/responses", "/v1/messages"
PROMPT = [{"role": "user", "content": "tell me about prompt caching " * 20}]


@dataclass(frozen=True)
class Case:
    name: str
    path: str
    body: dict
    hooks: dict[str, str] = field(default_factory=dict)
    billed_kinds: tuple[str, ...] = ()  # ledger fields that must be non-zero (the case really exercises them)


CASES = [
    Case("chat cache writes (30 m)", CHAT,
         {"model": "gpt-6.2-sol", "max_completion_tokens": 40, "messages": PROMPT},
         {"x-fake-cache-write": "120", "x-fake-cache-read": "40"}, ("cache_write", "cached")),
    Case("chat reasoning tokens", CHAT, {"model": "o3", "max_completion_tokens": 200, "messages": PROMPT},
         {"x-fake-reasoning-tokens": "90"}, ("reasoning_tokens",)),
    Case("chat n=3", CHAT, {"model": "gpt-4o", "n": 3, "max_tokens": 20, "messages": PROMPT}, {}, ()),
    Case("responses cache writes (30 m + 12 h)", RESPONSES,
         {"model": "gpt-6.2-sol", "max_output_tokens": 40, "input": "hello " * 50},
         {"x-fake-cache-write": "60", "x-fake-cache-write-12h": "80"}, ("cache_write_12h",)),
    Case("responses server tools", RESPONSES,
         {"model": "gpt-6.2-sol", "max_output_tokens": 40, "input": "search for it", "max_tool_calls": 4,
          "tools": [{"type": "web_search"}, {"type": "file_search", "vector_store_ids": ["vs_1"]}]},
         {"x-fake-web-search": "2", "x-fake-file-search": "1", "x-fake-tool-input-tokens": "3000"}, ("tool_calls",)),
    Case("anthropic 5 m + 1 h cache writes", MESSAGES,
         {"model": "claude-sonnet-4-6", "max_tokens": 40, "messages": PROMPT},
         {"x-fake-cache-write": "20", "x-fake-cache-write-1h": "40", "x-fake-cache-read": "10"},
         ("cache_write_1h", "cache_write_5m")),
    Case("anthropic web search", MESSAGES,
         {"model": "claude-sonnet-4-6", "max_tokens": 40, "messages": PROMPT,
          "tools": [{"type": "web_search_20250305", "name": "web_search", "max_uses": 3}]},
         {"x-fake-web-search": "3", "x-fake-tool-input-tokens": "2500"}, ("web_search_requests",)),
    Case("anthropic compaction iterations", MESSAGES,
         {"model": "claude-sonnet-4-6", "max_tokens": 40, "messages": PROMPT},
         {"x-fake-compaction-iterations": "2", "x-fake-compaction-tokens": "300,40"}, ("iterations",)),
    Case("anthropic advisor iterations", MESSAGES,
         {"model": "claude-haiku-4-5", "max_tokens": 40, "messages": PROMPT,
          "tools": [{"type": "advisor_20260301", "name": "advisor", "model": "claude-opus-4-7", "max_uses": 1,
                     "max_tokens": 100}]},
         {"x-fake-advisor-model": "claude-opus-4-7", "x-fake-advisor-tokens": "400,60"}, ("other_models",)),
    Case("anthropic max_tokens 0", MESSAGES,
         {"model": "claude-haiku-4-5", "max_tokens": 0, "messages": PROMPT}, {"x-fake-cache-write": "100"}, ()),
    # rate tiers, audio, image generation, hosted shell, fallback (issue 10, the second part)
    Case("chat flex tier", CHAT,
         {"model": "gpt-5.6-terra", "service_tier": "flex", "max_completion_tokens": 60, "messages": PROMPT},
         {"x-fake-cache-read": "40"}, ("service_tier", "cached")),
    Case("responses priority tier (sent as fast)", RESPONSES,
         {"model": "gpt-5.4", "service_tier": "fast", "max_output_tokens": 40, "input": "hello " * 50},
         {"x-fake-reasoning-tokens": "12"}, ("service_tier",)),
    Case("chat audio tokens", CHAT,
         {"model": "gpt-4o-mini-audio-preview", "max_completion_tokens": 60, "messages": PROMPT},
         {"x-fake-audio-input-tokens": "150", "x-fake-audio-output-tokens": "30"},
         ("audio_input_tokens", "audio_output_tokens")),
    Case("responses image generation tokens", RESPONSES,
         {"model": "gpt-5.5", "max_output_tokens": 40, "input": "draw a chart", "max_tool_calls": 2,
          "tools": [{"type": "image_generation"}]},
         {"x-fake-image-generation": "2", "x-fake-image-gen-tokens": "55,1056"}, ("image_gen",)),
    Case("responses hosted shell", RESPONSES,
         {"model": "gpt-5.5", "max_output_tokens": 40, "input": "list the files", "max_tool_calls": 3,
          "tools": [{"type": "shell", "environment": {"type": "container_auto"}}]},
         {"x-fake-shell": "2"}, ("tool_calls",)),
    Case("anthropic fast mode, US inference", MESSAGES,
         {"model": "claude-opus-5-5", "max_tokens": 40, "speed": "fast", "inference_geo": "us", "messages": PROMPT},
         {"x-fake-cache-write": "20", "x-fake-cache-read": "10"}, ("service_tier", "inference_geo")),
    Case("anthropic server-side fallback", MESSAGES,
         {"model": "claude-fable-5-2", "max_tokens": 60, "messages": PROMPT,
          "fallbacks": [{"model": "claude-opus-5-5"}]},
         {"x-fake-fallback-model": "claude-opus-5-5", "x-fake-fallback-declined-output": "5"}, ("other_models",)),
]


def _send(stack, case: Case, stream: bool) -> tuple[httpx.Response, str, bytes]:
    """Send one case; a stream the provider cuts ends in a protocol error, which is kept as the end."""
    rid = uuid.uuid4().hex
    headers = {"authorization": "Bearer key-budget", "content-type": "application/json",
               "x-tollgate-metadata": json.dumps({"suite": "lifecycle", "run": f"billing-{rid}"}), **case.hooks}
    body = {**case.body, "stream": True} if stream else case.body
    raw = b""
    with httpx.stream("POST", stack.base_url + case.path, json=body, headers=headers, timeout=30) as r:
        try:
            for chunk in r.iter_raw():
                raw += chunk
        except httpx.RemoteProtocolError:
            pass
    return r, rid, raw


def _ledger_entry(stack, attribution: JsonLog, r: httpx.Response) -> tuple[dict, dict]:
    """The request's record, and the fake's ledger entry for it (joined on Envoy's request id)."""
    rec = attribution.get(r.headers["x-tollgate-request-id"])
    (entry,) = fake_ledger(stack.ports.fake, request_id=rec["envoy_request_id"])
    return rec, entry


@pytest.mark.parametrize("stream", [False, True, 7, 61], ids=["json", "sse", "sse-split-7", "sse-split-61"])
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_charged_exactly_what_the_provider_billed(stack, attribution: JsonLog, case: Case, stream: bool | int) -> None:
    """`stream` an int: the fake writes the stream in pieces of that many bytes, splitting events
    (and lines) at arbitrary points, as TCP segments do."""
    if stream and case.name == "anthropic max_tokens 0":
        pytest.skip("max_tokens 0 is a cache warm-up; nothing to stream")
    if not isinstance(stream, bool):
        case = Case(case.name, case.path, case.body, {**case.hooks, "x-fake-chunk-bytes": str(stream)}, case.billed_kinds)
    r, _, raw = _send(stack, case, bool(stream))
    assert r.status_code == 200, raw[:400]
    rec, entry = _ledger_entry(stack, attribution, r)
    for kind in case.billed_kinds:
        assert entry[kind], f"the fake billed no {kind}: {entry}"
    expected = Prices().ledger_cost(entry)
    summary = {k: rec.get(k) for k in ("cost_nusd", "usage_source", "estimate", "input_tokens", "cached_input_tokens",
                                       "cache_write_tokens", "cache_write_long_tokens", "output_tokens",
                                       "reasoning_tokens", "tool_calls", "other_models", "reserved_usd",
                                       "service_tier", "inference_geo", "audio_input_tokens", "audio_output_tokens",
                                       "image_generation")}
    assert rec["usage_source"] == "provider" and rec["complete"] is True, summary
    assert rec["cost_nusd"] == expected, f"billed {expected} nUSD, charged {rec['cost_nusd']}: {summary}; ledger {entry}"
    assert rec["reserved_usd"] * 1e9 >= rec["cost_nusd"] - 1, f"the reservation did not cover the charge: {summary}"
    if entry.get("reasoning_tokens"):
        assert rec["reasoning_tokens"] == entry["reasoning_tokens"]


def test_failed_stream_with_null_usage_costs_nothing(stack, attribution: JsonLog) -> None:
    case = Case("failed", RESPONSES, {"model": "gpt-4o", "max_output_tokens": 40, "input": "x " * 4000},
                {"x-fake-stream-error-after": "3"})
    r, _, raw = _send(stack, case, stream=True)
    assert r.status_code == 200 and b"response.failed" in raw
    rec, entry = _ledger_entry(stack, attribution, r)
    assert Prices().ledger_cost(entry) == 0  # the provider billed nothing
    assert rec["cost_nusd"] == 0 and rec["usage_source"] == "provider", rec


def test_reasoning_stream_cut_before_its_usage_is_charged_at_least_what_was_billed(stack, attribution: JsonLog) -> None:
    """The reasoning tokens never show as deltas: charged the reservation, never the deltas seen."""
    case = Case("cut", CHAT, {"model": "o3", "max_completion_tokens": 300, "messages": PROMPT},
                {"x-fake-reasoning-tokens": "200", "x-fake-cut-after": "10", "x-fake-output-tokens": "40",
                 "x-fake-token-latency-ms": "5"})
    r, _, _ = _send(stack, case, stream=True)
    assert r.status_code == 200, r.status_code
    rec, entry = _ledger_entry(stack, attribution, r)
    assert rec["estimate"] == "reservation" and rec["usage_source"] == "estimate:reservation", rec
    assert rec["cost_nusd"] >= Prices().ledger_cost(entry) > 0


def test_empty_first_chunk_model_is_not_the_served_model(stack, attribution: JsonLog) -> None:
    case = Case("azure", CHAT, {"model": "gpt-4o", "max_tokens": 10, "messages": PROMPT}, {"x-fake-empty-model": "1"})
    r, _, raw = _send(stack, case, stream=True)
    assert b'"model":""' in raw.replace(b" ", b"")
    rec = attribution.get(r.headers["x-tollgate-request-id"])
    assert rec["model_served"] == "gpt-4o", rec


@pytest.mark.parametrize("path,body,status,check", [
    (MESSAGES, {"model": "claude-haiku-4-5", "messages": PROMPT}, 400,
     lambda j: j["type"] == "error" and j["error"]["type"] == "invalid_request_error" and "max_tokens" in j["error"]["message"]),
    (MESSAGES, {"model": "claude-haiku-4-5", "max_tokens": 5, "messages": []}, 400,
     lambda j: j["type"] == "error" and j["error"]["type"] == "invalid_request_error"),
    (CHAT, {"model": "o3", "max_tokens": 5, "messages": PROMPT}, 400,
     lambda j: j["error"]["code"] == "unsupported_parameter" and j["error"]["param"] == "max_tokens"),
    (RESPONSES, {"model": "gpt-4o", "max_output_tokens": 20, "input": "x", "previous_response_id": "resp_missing"}, 404,
     lambda j: j["error"]["code"] == "previous_response_not_found"),
])
def test_provider_refusals_reach_the_client_in_its_shape_and_cost_nothing(stack, attribution: JsonLog, path, body,
                                                                          status, check) -> None:
    """The fake refuses what the real APIs refuse, with their status and error shape; Tollgate
    passes the refusal through, releases the reservation and charges nothing."""
    r, _, raw = _send(stack, Case("refusal", path, body), stream=False)
    assert r.status_code == status and check(json.loads(raw)), raw[:300]
    rec, entry = _ledger_entry(stack, attribution, r)
    assert rec["cost_nusd"] == 0 and rec["status"] == status and rec["settlement"] == "settled", rec
    assert entry["status"] == status and Prices().ledger_cost(entry) == 0
