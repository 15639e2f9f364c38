"""The worst case is a real upper bound: what bodies cannot show gets a stated allowance (issue 10).

Each test prices a request's worst case with the rates it names, independently of the table's
code, and checks the bound the gateway computes covers what the provider could bill.
"""

from __future__ import annotations

from decimal import Decimal

import orjson
import pytest

from extproc import decide
from extproc.config import BoundsSection, load_config
from extproc.errors import GatewayError
from extproc.pricing import LongContextPrice, ModelPrice, PriceTable, Usage
from extproc.providers import api_for_path

BOUNDS = BoundsSection(server_tool_calls=7, server_tool_input_tokens=1000, document_input_tokens=5000,
                       stateful_input_tokens=90_000)
CHAT, RESPONSES, MESSAGES = (api_for_path(p) for p in ("/v1/chat/completions", "/v1/responses", "/v1/messages"))


def parse(api, body: dict):  # type: ignore[no-untyped-def]
    raw = orjson.dumps(body)
    return raw, api.parse(raw, BOUNDS)


def test_n_choices_multiply_the_output_bound() -> None:
    config = load_config("policies")
    _, req = parse(CHAT, {"model": "gpt-4o", "n": 8, "max_tokens": 100, "messages": [{"role": "user", "content": "x"}]})
    cand = decide.check(config, CHAT, req.model, req.output_cap, {}, "/v1/chat/completions", req.choices)
    # gpt-4o: $2.50 in, $10 out per M; 8 choices x 100 tokens of output
    assert cand.cost_fn("gpt-4o", 50, 100) == 50 * 2500 + 8 * 100 * 10_000
    with pytest.raises(GatewayError):
        CHAT.parse(b'{"model":"gpt-4o","n":0,"messages":[]}')


def test_anthropic_max_tokens_zero_is_accepted_and_reserves_no_output() -> None:
    config = load_config("policies")
    _, req = parse(MESSAGES, {"model": "claude-haiku-4-5", "max_tokens": 0, "messages": [{"role": "user", "content": "x"}]})
    assert req.output_cap == 0
    cand = decide.check(config, MESSAGES, req.model, req.output_cap, {}, "/v1/messages")
    assert cand.cap == 0
    with pytest.raises(GatewayError):
        CHAT.parse(b'{"model":"gpt-4o","max_tokens":0,"messages":[]}')  # OpenAI: at least 1


def test_server_tools_add_input_allowance_and_fees() -> None:
    raw, req = parse(MESSAGES, {"model": "claude-haiku-4-5", "max_tokens": 10, "messages": [],
                                "tools": [{"type": "web_search_20250305", "name": "web_search", "max_uses": 3},
                                          {"type": "web_fetch_20250910", "name": "web_fetch"},
                                          {"name": "my_tool", "input_schema": {"type": "object"}}]})
    assert req.server_tools == {"web_search": 3, "web_fetch": 7}
    assert req.input_tokens_upper == len(raw) + (3 + 7) * 1000
    raw, req = parse(RESPONSES, {"model": "gpt-5", "input": "x", "max_tool_calls": 2,
                                 "tools": [{"type": "web_search_preview"}, {"type": "file_search"}, {"type": "function"}]})
    assert req.server_tools == {"file_search": 2, "web_search": 2}
    table = PriceTable({}, tools={"web_search": Decimal("0.01"), "file_search": Decimal("0.0025")})
    assert table.tool_fees_nusd(req.server_tools) == 2 * 10_000_000 + 2 * 2_500_000


def test_documents_by_reference_and_stored_context_are_bounded() -> None:
    raw, req = parse(MESSAGES, {"model": "claude-haiku-4-5", "max_tokens": 10, "messages": [{"role": "user", "content": [
        {"type": "document", "source": {"type": "url", "url": "https://example.com/a.pdf"}},
        {"type": "document", "source": {"type": "file", "file_id": "file_1"}},
        {"type": "document", "source": {"type": "base64", "media_type": "application/pdf", "data": "JVBERi0="}}]}]})
    assert req.input_tokens_upper == len(raw) + 2 * 5000  # the inline one is in the body's bytes
    raw, req = parse(RESPONSES, {"model": "gpt-5", "previous_response_id": "resp_1", "input": [
        {"role": "user", "content": [{"type": "input_file", "file_id": "file-abc"}]}]})
    assert req.input_tokens_upper == len(raw) + 5000 + 90_000


def test_long_context_rates_apply_to_the_whole_request_and_the_bound() -> None:
    p = ModelPrice(input=Decimal(3), output=Decimal(15), cache_write=Decimal("3.75"), cache_write_long=Decimal(6),
                   long_context=LongContextPrice(above_input_tokens=200_000, input=Decimal(6), output=Decimal("22.5"),
                                                 cache_write=Decimal("7.5"), cache_write_long=Decimal(12)))
    assert p.cost_nusd(Usage(input_tokens=200_000, output_tokens=10)) == 200_000 * 3000 + 10 * 15_000
    assert p.cost_nusd(Usage(input_tokens=150_000, cache_write_long_tokens=60_000, output_tokens=10)) == (
        150_000 * 6000 + 60_000 * 12_000 + 10 * 22_500)
    worst = p.worst_case_nusd(210_000, 10)
    assert worst == 210_000 * 12_000 + 10 * 22_500
    assert worst >= p.cost_nusd(Usage(cache_write_long_tokens=210_000, output_tokens=10))


def test_other_models_and_tool_calls_are_priced_by_the_table() -> None:
    main = ModelPrice(input=Decimal(1), output=Decimal(5))
    advisor = ModelPrice(input=Decimal(15), output=Decimal(75))
    table = PriceTable({"main": main, "advisor": advisor}, tools={"web_search": Decimal("0.01")})
    u = Usage(input_tokens=1000, output_tokens=100, tool_calls={"web_search": 2},
              other_models=[("advisor", Usage(input_tokens=10, output_tokens=1)), ("unknown", Usage(input_tokens=1))])
    assert table.cost_nusd(main, u) == (1000 * 1000 + 100 * 5000) + 2 * 10_000_000 + (10 * 15_000 + 75_000) + 1000


@pytest.mark.parametrize("raw", [
    b'{"model":"gpt-4o-mini","messages":[],"model":"gpt-4o"}',
    b'{"model":"gpt-4o","max_tokens":10,"messages":[],"max_tokens":100000}',
    b'{"model":"gpt-4o","messages":[],"tools":[{"type":"web_search_20250305","max_uses":1,"max_uses":50}]}',
])
def test_duplicate_keys_in_a_priced_body_are_refused(raw: bytes) -> None:
    """Priced on the last key, forwarded as sent: an upstream that reads the first would serve
    another model (issue 15, item 5)."""
    with pytest.raises(GatewayError) as e:
        CHAT.parse(raw)
    assert e.value.status == 400 and e.value.code == "duplicate_key"


def test_a_repeated_key_name_inside_text_is_not_a_duplicate() -> None:
    raw = b'{"model":"gpt-4o","messages":[{"role":"user","content":"the \\"model\\" field"}]}'
    assert CHAT.parse(raw).model == "gpt-4o"
