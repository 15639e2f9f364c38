"""Rate tiers, data residency, audio and image generation: priced at their own rates, and bounded
at the rates the request asks for (issue 10).

Every expected number is worked out here by hand from the rates policies/prices.yaml gives (quoted
in each test), not by extproc.pricing; the fixtures are tests/fixtures/wire/ (their usage, read by
the providers' parsers, priced by the table: the "charged vs expected" of issue 10's resolution).
"""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path

import orjson
import pytest

from extproc import decide
from extproc.config import BoundsSection, load_config
from extproc.errors import GatewayError
from extproc.providers import APIS, api_for_path

CHAT, RESPONSES, MESSAGES = (api_for_path(p) for p in ("/v1/chat/completions", "/v1/responses", "/v1/messages"))
WIRE = Path(__file__).resolve().parent / "fixtures" / "wire"
M = 1000  # nano-USD per token at $1 per million


@pytest.fixture(scope="module")
def config():  # type: ignore[no-untyped-def]
    return load_config("policies")


@pytest.fixture(scope="module")
def refusing(tmp_path_factory):  # type: ignore[no-untyped-def]
    """The shipped policies with `gateway.bounds.unbounded: refuse`."""
    root = Path(__file__).resolve().parent.parent / "policies"
    out = tmp_path_factory.mktemp("refusing")
    for f in root.glob("*.yaml"):
        (out / f.name).write_text(f.read_text())
    (out / "zz-refuse.yaml").write_text("gateway:\n  bounds:\n    unbounded: refuse\n")
    return load_config(out)


def _fixture_cost(config, name: str, model: str) -> int:  # type: ignore[no-untyped-def]
    e = json.loads((WIRE / (name.rsplit(".", 1)[0] + ".expect.json")).read_text())
    usage = APIS[e["endpoint"]].usage_from_json(json.loads((WIRE / name).read_text()))
    return config.prices.cost_nusd(config.prices.lookup(model), usage)


# (fixture, the row that prices it, the bill worked out by hand in nano-USD, how)
FIXTURE_BILLS = [  # rates in nano-USD per token ($X per million = X * 1000)
    ("openai_chat_flex.json", "gpt-5.6-terra", 1138 * 1000 + 3072 * 100 + 912 * 6000,
     "flex: 1138 in x $1 + 3072 cached x $0.10 + 912 out x $6"),
    ("openai_responses_priority.json", "gpt-5.5", 3032 * 12_500 + 12288 * 1250 + 2048 * 75_000,
     "priority: 3032 in x $12.50 + 12288 cached x $1.25 + 2048 out x $75"),
    ("openai_chat_audio.json", "gpt-4o-mini-audio-preview", 45 * 150 + 196 * 10_000 + 46 * 600 + 372 * 20_000,
     "45 text in x $0.15 + 196 audio in x $10 + 46 text out x $0.60 + 372 audio out x $20"),
    ("anthropic_fast_us.json", "claude-opus-5-5",
     (2304 * 8000 + 8192 * 400 + 1024 * 10_000 + 615 * 40_000) * Decimal("1.1"),
     "fast ($8 in, $0.40 read, $10 5m write, $40 out) x 1.1 (US only)"),
    ("anthropic_fallback.json", "claude-fable-5-2", (1850 * 8000 + 9 * 40_000) + (1850 * 4000 + 402 * 20_000),
     "declined hop at Fable 5.2 ($8/$40) + served hop at Opus 5.5 ($4/$20)"),
    ("openai_responses_shell.json", "gpt-5.5", 5120 * 5000 + 780 * 30_000 + 30_000_000,
     "5120 in x $5 + 780 out x $30 + one container session $0.03"),
]


@pytest.mark.parametrize("name,model,want,how", FIXTURE_BILLS, ids=[f[0] for f in FIXTURE_BILLS])
def test_fixture_charged_what_the_provider_bills(config, name: str, model: str, want, how: str) -> None:  # type: ignore[no-untyped-def]
    got = _fixture_cost(config, name, model)
    assert got == int(Decimal(str(want)).to_integral_value("ROUND_CEILING")), (name, how, got)


def test_fixture_image_model_falls_back_to_the_main_rates_only_when_unpriced(config) -> None:  # type: ignore[no-untyped-def]
    # the fixture's tools name gpt-image-1 (shut down 2026-10-23, not in the table): the image tokens are
    # priced at the main model's rates then, never $0
    usage = RESPONSES.usage_from_json(json.loads((WIRE / "openai_responses_code_image_tools.json").read_text()))
    assert usage.image_gen[0].model == "gpt-image-1"
    got = config.prices.cost_nusd(config.prices.lookup("gpt-5.4"), usage)
    assert got == 2871 * 2500 + 1503 * 15_000 + 30_000_000 + 52 * 2500 + 1056 * 15_000


def _check(config, api, body: dict, path: str, bounds: BoundsSection | None = None):  # type: ignore[no-untyped-def]
    req = api.parse(orjson.dumps(body), bounds or config.gateway.bounds)
    cand = decide.check(config, api, req.model, req.output_cap, {}, path, req.choices, req.server_tools, req.advisors,
                        tier=req.tier, inference_geo=req.inference_geo, unbounded=req.unbounded)
    return req, cand


def test_the_requested_tier_sets_the_bound(config) -> None:  # type: ignore[no-untyped-def]
    msgs = [{"role": "user", "content": "x"}]
    body = {"model": "gpt-5.4", "max_completion_tokens": 100, "messages": msgs}
    _, std = _check(config, CHAT, body, "/v1/chat/completions")
    _, fast = _check(config, CHAT, {**body, "service_tier": "fast"}, "/v1/chat/completions")
    _, flex = _check(config, CHAT, {**body, "service_tier": "flex"}, "/v1/chat/completions")
    # gpt-5.4: standard $2.50/$15, priority $5/$30, flex $1.25/$7.50
    assert std.cost_fn("gpt-5.4", 1000, 100) == 1000 * 2500 + 100 * 15_000
    assert fast.cost_fn("gpt-5.4", 1000, 100) == 1000 * 5000 + 100 * 30_000
    assert flex.cost_fn("gpt-5.4", 1000, 100) == 1000 * 1250 + 100 * 7500
    # a project whose default is priority: the policy says so, and a request without a tier is bounded at it
    bounds = BoundsSection(default_service_tier="priority")
    _, proj = _check(config, CHAT, body, "/v1/chat/completions", bounds)
    assert proj.cost_fn("gpt-5.4", 1000, 100) == fast.cost_fn("gpt-5.4", 1000, 100)


def test_a_tier_the_table_lacks_is_bounded_at_the_stated_multiplier_or_refused(config, refusing) -> None:  # type: ignore[no-untyped-def]
    body = {"model": "gpt-5.6-sol", "service_tier": "ultrafast", "max_output_tokens": 100, "input": "x"}
    req, cand = _check(config, RESPONSES, body, "/v1/responses")
    # gpt-5.6-sol standard $5 in (cache write $6.25 is the dearest input), $30 out; times 2
    assert cand.cost_fn("gpt-5.6-sol", 1000, 100) == 2 * (1000 * 6250 + 100 * 30_000)
    with pytest.raises(GatewayError) as e:
        _check(refusing, RESPONSES, body, "/v1/responses", BoundsSection(unbounded="refuse"))
    assert e.value.status == 400 and "ultrafast" in str(e.value)


def test_refuse_mode_refuses_every_allowance_case(refusing) -> None:  # type: ignore[no-untyped-def]
    bounds = refusing.gateway.bounds
    assert bounds.unbounded == "refuse"
    msgs = [{"role": "user", "content": "x"}]
    cases = [
        (RESPONSES, {"model": "gpt-5.4", "input": "x", "previous_response_id": "resp_1"}, "stored context"),
        (RESPONSES, {"model": "gpt-5.4", "input": "x", "tools": [{"type": "web_search"}]}, "server tools"),
        (RESPONSES, {"model": "gpt-5.4", "input": [{"role": "user", "content": [
            {"type": "input_file", "file_id": "file_1"}]}]}, "documents by reference"),
        (RESPONSES, {"model": "gpt-5.4", "input": "x", "max_tool_calls": 1, "tools": [{"type": "image_generation"}]},
         "image generation"),
        (MESSAGES, {"model": "claude-opus-5-5", "max_tokens": 10, "messages": msgs, "fallbacks": "default"},
         "fallbacks"),
        (CHAT, {"model": "gpt-5.2", "service_tier": "flex", "max_completion_tokens": 10, "messages": msgs}, "flex"),
    ]
    for api, body, what in cases:
        with pytest.raises(GatewayError) as e:
            _check(refusing, api, body, "/x", bounds)
        assert e.value.status == 400 and what in str(e.value), (what, str(e.value))
    # bounded requests pass
    _check(refusing, RESPONSES, {"model": "gpt-5.4", "input": "x", "max_tool_calls": 2,
                                 "tools": [{"type": "web_search"}]}, "/x", bounds)
    _check(refusing, MESSAGES, {"model": "claude-opus-5-5", "max_tokens": 10, "messages": msgs,
                                "speed": "fast", "inference_geo": "us"}, "/x", bounds)


def test_anthropic_fast_us_fallback_and_image_bounds(config) -> None:  # type: ignore[no-untyped-def]
    msgs = [{"role": "user", "content": "x"}]
    _, c = _check(config, MESSAGES, {"model": "claude-opus-5-5", "max_tokens": 100, "messages": msgs,
                                     "speed": "fast", "inference_geo": "us"}, "/v1/messages")
    # fast: $16 1h write is the dearest input, $40 out; times 1.1
    assert c.cost_fn("claude-opus-5-5", 1000, 100) == int((1000 * 16_000 + 100 * 40_000) * Decimal("1.1"))
    _, c = _check(config, MESSAGES, {"model": "claude-fable-5-2", "max_tokens": 100, "messages": msgs,
                                     "fallbacks": [{"model": "claude-opus-5-5", "max_tokens": 50}]}, "/v1/messages")
    # Fable 5.2 ($16 1h write, $40 out) + one Opus 5.5 hop ($8 1h write, $20 out) reading input + output
    assert c.cost_fn("claude-fable-5-2", 1000, 100) == 1000 * 16_000 + 100 * 40_000 + 1100 * 8000 + 50 * 20_000
    bounds = BoundsSection(image_output_tokens=1000)
    _, c = _check(config, RESPONSES, {"model": "gpt-5.4", "max_output_tokens": 100, "input": "x", "max_tool_calls": 2,
                                      "tools": [{"type": "image_generation"}]}, "/v1/responses", bounds)
    # gpt-5.4 + 2 images at gpt-image-2.6-sunburst ($8 image input is the dearest, $30 out), the tools' fee 0
    assert c.cost_fn("gpt-5.4", 1000, 100) == 1000 * 2500 + 100 * 15_000 + 2 * (1100 * 8000 + 1000 * 30_000)
