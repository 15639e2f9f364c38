"""The independent oracle: real provider wire shapes through Tollgate's parsers.

Each fixture under tests/fixtures/wire/ is one response as a provider sends it (`<case>.json` for a
non-streamed body, `<case>_stream.sse` for the raw event stream), written from the providers' API
references and the official SDKs' type definitions, never produced by Tollgate or its fake
provider. Its sidecar `<case>[_stream].expect.json` says what the provider BILLS, worked out by hand
from the payload and the docs (see tests/fixtures/wire/README.md for the format).

For every fixture this runs the matching parser (`api.usage_from_json(obj)`, or SSEParser +
`api.on_event` fed at every byte boundary for short streams and at random boundaries with fixed
seeds for long ones) and compares, one test per (fixture, check), what Tollgate extracted with
what the provider bills. A check that today's `Usage` cannot express, or that today's parser gets
wrong, is a strict xfail in XFAIL below with the missing field or parser gap as its reason: when a
fix lands the test XPASSes, which fails the run until the entry is removed.

The expected kinds are looked up on `Usage` by name through KIND_FIELDS (the one place to update
as Usage grows): a field Usage gains later (a `cache_write_1h_tokens`, a `tool_tokens` dict, ...) is
picked up by adding its name there, without touching the checks.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import random
from functools import cache
from pathlib import Path
from typing import Any

import orjson
import pytest

from extproc.providers import APIS, SSEParser, StreamState

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "wire"

# ---- where Tollgate's Usage holds each billed kind ------------------------------------------
# kind (in .expect.json) -> candidate places on a Usage, first that exists wins: "attr" is an
# attribute; "attr[key]" a key of a dict attribute (a missing key counts as 0). A kind none of
# whose candidates exists is one Usage "cannot express yet": its check fails unless expected 0.
KIND_FIELDS: dict[str, tuple[str, ...]] = {
    "input": ("input_tokens",),  # uncached input, excluding cache reads and writes
    "cached_input": ("cached_input_tokens",),  # cache reads
    # cache writes by TTL: a dedicated field if Usage grows one, else the short/long pair
    "cache_write_5m": ("cache_write_5m_tokens", "cache_writes[5m]", "cache_write_tokens"),  # Anthropic, 1.25x
    "cache_write_1h": ("cache_write_1h_tokens", "cache_writes[1h]", "cache_write_long_tokens"),  # Anthropic, 2x
    "cache_write_30m": ("cache_write_30m_tokens", "cache_writes[30m]", "cache_write_tokens"),  # OpenAI
    "cache_write_12h": ("cache_write_12h_tokens", "cache_writes[12h]", "cache_write_long_tokens"),  # OpenAI
    "output": ("output_tokens",),  # all billed output, reasoning included
    "reasoning": ("reasoning_tokens",),  # the part of `output` that was reasoning / thinking
    # server tools: calls (or container sessions) billed per unit
    "web_search_calls": ("web_search_calls", "tool_calls[web_search]"),
    "web_fetch_calls": ("web_fetch_calls", "tool_calls[web_fetch]"),
    "file_search_calls": ("file_search_calls", "tool_calls[file_search]"),
    "code_interpreter_containers": ("code_interpreter_containers", "tool_calls[code_interpreter]"),
    "image_generation_calls": ("image_generation_calls", "tool_calls[image_generation]"),
    # image generation tokens, billed at the image model's rates (Responses tool_usage.image_gen)
    "image_gen_input": ("image_gen_input_tokens", "tool_tokens[image_generation_input]"),
    "image_gen_output": ("image_gen_output_tokens", "tool_tokens[image_generation_output]"),
    # audio models: the audio part of `input` / `output`, billed at the audio rates
    "audio_input": ("audio_input_tokens",),
    "audio_output": ("audio_output_tokens",),
    "shell_containers": ("shell_containers", "tool_calls[shell]"),  # hosted shell container sessions
}
# The rates a response says it was billed at (`rates` in .expect.json): the rate tier as the
# price table names it (OpenAI service_tier `flex` / `priority`, `standard` for `default`;
# Anthropic speed `fast` / `standard`) and where inference ran (Anthropic inference_geo).
RATE_FIELDS: dict[str, tuple[str, ...]] = {
    "service_tier": ("tier", "service_tier"),
    "inference_geo": ("inference_geo",),
}
# Usage billed at other models' rates inside one response (Anthropic advisor iterations): a
# sequence on the Usage of (model, usage) pairs, or of objects / dicts with a `model` and the kinds.
OTHER_MODELS_FIELD = ("other_models",)
# What the stream state says, beyond the usage.
STATE_FIELDS: dict[str, tuple[str, ...]] = {
    "usage_known": ("usage_final",),  # the provider's own final count arrived
    "done": ("done",),  # the provider's own end-of-response event arrived
    "served_model": ("served_model",),
    "error": ("error",),
    "visible_deltas": ("output_deltas",),
}

# ---- what today's code cannot do: one strict xfail per (fixture, check) -----------------------
# Remove an entry when its fix lands (the test then XPASSes, which fails the run until you do).
XFAIL: dict[str, str] = {}
"""(fixture stem::check) -> the missing field or parser gap; empty now that image generation
tokens are priced (Usage.image_gen_input_tokens / image_gen_output_tokens)."""

# ---- how streams are fed ----------------------------------------------------------------------
EXHAUSTIVE_MAX = 4096  # streams up to this size: also every two-piece split at each byte
RANDOM_SPLITS = 48  # longer streams: this many random multi-piece splits, fixed seeds

_MISSING = object()


def fixture_names() -> list[str]:
    return sorted(p.name for p in FIXTURES.iterdir()
                  if p.suffix in (".json", ".sse") and not p.name.endswith(".expect.json"))


def _stem(name: str) -> str:
    return name.rsplit(".", 1)[0]


@cache
def load(name: str) -> tuple[bytes, dict[str, Any]]:
    raw = (FIXTURES / name).read_bytes()
    expect = json.loads((FIXTURES / (_stem(name) + ".expect.json")).read_text())
    return raw, expect


def splits(name: str, raw: bytes):
    """(description, chunks) for every way the stream is fed."""
    yield "whole", [raw]
    yield "1-byte chunks", [raw[i:i + 1] for i in range(len(raw))]
    if len(raw) <= EXHAUSTIVE_MAX:
        for i in range(1, len(raw)):
            yield f"split at byte {i}", [raw[:i], raw[i:]]
    else:
        for seed in range(RANDOM_SPLITS):
            rng = random.Random(f"{name}/{seed}")
            cuts = sorted(rng.sample(range(1, len(raw)), rng.randint(2, 48)))
            bounds = [0, *cuts, len(raw)]
            yield f"random split seed {seed} at {cuts}", [raw[a:b] for a, b in itertools.pairwise(bounds)]


def run_stream(endpoint: str, chunks: list[bytes]) -> StreamState:
    api, parser, state = APIS[endpoint], SSEParser(), StreamState()
    for chunk in chunks:
        for event, data in parser.feed(chunk):
            api.on_event(state, event, data)
    for event, data in parser.flush():  # the meter flushes at end of stream
        api.on_event(state, event, data)
    return state


@dataclasses.dataclass
class Extracted:
    how: str  # which way the body was fed
    usage: Any  # the parser's Usage, or None
    usage_known: bool
    state: StreamState | None = None


@cache
def extractions(name: str) -> tuple[Extracted, ...]:
    raw, expect = load(name)
    if name.endswith(".json"):
        usage = APIS[expect["endpoint"]].usage_from_json(orjson.loads(raw))
        return (Extracted("usage_from_json", usage, usage is not None),)
    out = []
    for how, chunks in splits(name, raw):
        st = run_stream(expect["endpoint"], chunks)
        out.append(Extracted(how, st.usage, bool(_get(st, STATE_FIELDS["usage_known"], False)), st))
    return tuple(out)


# ---- reading values by name ---------------------------------------------------------------------

def _lookup(obj: Any, spec: str) -> Any:
    """One candidate: `attr` or `attr[key]`, on an object or a dict. _MISSING if it does not exist."""
    key = None
    if spec.endswith("]") and "[" in spec:
        spec, key = spec[:-1].split("[", 1)
    val = obj.get(spec, _MISSING) if isinstance(obj, dict) else getattr(obj, spec, _MISSING)
    if val is _MISSING or key is None:
        return val
    return val.get(key, 0) if isinstance(val, dict) else _MISSING


def _get(obj: Any, candidates: tuple[str, ...], default: Any = _MISSING) -> Any:
    for spec in candidates:
        val = _lookup(obj, spec)
        if val is not _MISSING:
            return val
    return default


def _kind(obj: Any, kind: str, item: bool = False) -> Any:
    return _get(obj, KIND_FIELDS[kind] + ((kind,) if item else ()))


def _other_models(usage: Any) -> dict[str, dict[str, int]] | None:
    """Usage.other_models as {model: {kind: n}} (nonzero kinds only), or None if Usage has no such field."""
    items = _get(usage, OTHER_MODELS_FIELD)
    if items is _MISSING:
        return None
    out: dict[str, dict[str, int]] = {}
    for item in items or ():
        if isinstance(item, tuple | list) and len(item) == 2:
            model, part = item
        else:
            model, part = _get(item, ("model",), None), item
        acc = out.setdefault(str(model), {})
        for kind in KIND_FIELDS:
            n = _kind(part, kind, item=True)
            if n is not _MISSING and n:
                acc[kind] = acc.get(kind, 0) + n
    return out


def _numbers(obj: Any) -> list[int]:
    if isinstance(obj, bool) or obj is None or isinstance(obj, str):
        return []
    if isinstance(obj, int | float):
        return [obj]
    if isinstance(obj, dict):
        return [n for v in obj.values() for n in _numbers(v)]
    if isinstance(obj, list | tuple):
        return [n for v in obj for n in _numbers(v)]
    if dataclasses.is_dataclass(obj):
        return [n for f in dataclasses.fields(obj) for n in _numbers(getattr(obj, f.name))]
    return [n for v in getattr(obj, "__dict__", {}).values() for n in _numbers(v)]


def _error_matches(err: Any, want: str) -> bool:
    """The stream's error names `want` as its type or code (Anthropic: type; OpenAI: code)."""
    if not isinstance(err, dict):
        return False
    inner = err.get("error") if isinstance(err.get("error"), dict) else {}
    return want in (err.get("type"), err.get("code"), inner.get("type"), inner.get("code"))


# ---- the checks -------------------------------------------------------------------------------

def checks(name: str) -> list[str]:
    _, e = load(name)
    out = ["usage_known"]
    if e.get("billed") is False:
        out.append("billed")
    if e.get("usage_known"):
        out += [f"usage.{k}" for k in e.get("usage") or {}]
    if "other_models" in e:
        out.append("other_models")
    out += [f"rates.{k}" for k in e.get("rates") or {}]
    if name.endswith(".sse"):
        out.append("served_model")
        out += [f"stream.{k}" for k in e.get("stream") or {}]
    return out


def check_one(name: str, check: str, x: Extracted) -> str | None:
    """None when `x` agrees with the expectation, else what is wrong."""
    _, e = load(name)
    if check == "usage_known":
        return None if x.usage_known == e["usage_known"] else f"usage_known is {x.usage_known}"
    if check == "billed":
        if not x.usage_known:
            return "the provider's final word (nothing billed) is not taken as known usage"
        return None if not any(_numbers(x.usage)) else f"charges {x.usage!r} for a response nothing was billed for"
    if check.startswith("usage."):
        kind = check.split(".", 1)[1]
        want = e["usage"][kind]
        if x.usage is None:
            return "no usage extracted"
        got = _kind(x.usage, kind)
        if got is _MISSING:
            return None if want == 0 else f"Usage cannot express {kind!r} (none of {KIND_FIELDS[kind]})"
        return None if got == want else f"{kind} is {got}, expected {want}"
    if check.startswith("rates."):
        key = check.split(".", 1)[1]
        if x.usage is None:
            return "no usage extracted"
        got = _get(x.usage, RATE_FIELDS[key], _MISSING)
        if got is _MISSING:
            return f"Usage cannot express {key!r} (none of {RATE_FIELDS[key]})"
        return None if got == e["rates"][key] else f"{key} is {got!r}, expected {e['rates'][key]!r}"
    if check == "other_models":
        if x.usage is None:
            return "no usage extracted"
        got = _other_models(x.usage)
        if got is None:
            return f"Usage cannot express usage at other models' rates (none of {OTHER_MODELS_FIELD})"
        want = {m: {k: v for k, v in d.items() if v} for m, d in e["other_models"].items()}
        return None if got == want else f"other models {got}, expected {want}"
    assert x.state is not None, check
    if check == "served_model":
        got = _get(x.state, STATE_FIELDS["served_model"], None)
        return None if got == e["served_model"] else f"served model {got!r}, expected {e['served_model']!r}"
    key = check.split(".", 1)[1]
    want = e["stream"][key]
    if key == "done":
        got = _get(x.state, STATE_FIELDS["done"], None)
        return None if got == want else f"done is {got}, expected {want}"
    if key == "error":
        got = _get(x.state, STATE_FIELDS["error"], None)
        return None if _error_matches(got, want) else f"error {got!r}, expected {want!r}"
    if key == "visible_deltas":
        got = _get(x.state, STATE_FIELDS["visible_deltas"], None)
        return None if got == want else f"{got} visible deltas counted, expected {want}"
    if key == "provider_input":
        # a stream cut short: the provider's input count from its first event must be kept for the estimate
        if x.usage is None:
            return "message_start's input count was not kept"
        for kind, n in want.items():
            got = _kind(x.usage, kind)
            if (0 if got is _MISSING else got) != n:
                return f"provider input {kind} is {got}, expected {n}"
        return None
    raise AssertionError(f"unknown check {check}")


def _params():
    out = []
    for name in fixture_names():
        for check in checks(name):
            test_id = f"{_stem(name)}::{check}"
            marks = [pytest.mark.xfail(strict=True, reason=XFAIL[test_id])] if test_id in XFAIL else []
            out.append(pytest.param(name, check, id=test_id, marks=marks))
    return out


@pytest.mark.parametrize(("name", "check"), _params())
def test_wire_fixture(name: str, check: str) -> None:
    problems = []
    for x in extractions(name):
        problem = check_one(name, check, x)
        if problem is not None:
            problems.append(f"{x.how}: {problem}")
    assert not problems, (f"{name} {check}: {problems[0]}" + (f" (and {len(problems) - 1} other feeds)"
                                                                if len(problems) > 1 else ""))


# ---- the fixtures themselves ------------------------------------------------------------------

EXPECT_KEYS = {"provider", "endpoint", "served_model", "usage_known", "billed", "usage", "other_models",
               "top_level", "iterations", "stream", "rates", "why"}
STREAM_KEYS = {"done", "error", "visible_deltas", "provider_input"}


def test_every_fixture_has_an_expectation_and_vice_versa() -> None:
    names = fixture_names()
    assert len(names) >= 30
    stems = {_stem(n) for n in names}
    assert len(stems) == len(names), "a JSON and an SSE fixture share a name"
    expects = {p.name[: -len(".expect.json")] for p in FIXTURES.glob("*.expect.json")}
    assert expects == stems, f"fixtures without .expect.json: {stems - expects}; orphans: {expects - stems}"
    for n in names:
        assert n.endswith(".json") != n.endswith("_stream.sse"), f"{n}: streams are named <case>_stream.sse"


@pytest.mark.parametrize("name", fixture_names())
def test_expectation_is_well_formed(name: str) -> None:
    raw, e = load(name)
    assert set(e) <= EXPECT_KEYS, set(e) - EXPECT_KEYS
    assert e["endpoint"] in APIS
    assert isinstance(e["why"], str) and len(e["why"]) > 40, "say why, citing the doc"
    assert isinstance(e["usage_known"], bool) and e.get("billed") in (True, False, None)
    assert set(e.get("stream") or {}) <= STREAM_KEYS
    if e["usage_known"]:
        assert isinstance(e["usage"], dict)
        assert set(e["usage"]) <= set(KIND_FIELDS), set(e["usage"]) - set(KIND_FIELDS)
        assert all(isinstance(v, int) and v >= 0 for v in e["usage"].values())
    else:
        assert e.get("usage") is None, "unknown usage has no numbers"
    if e.get("billed") is False:
        assert e["usage_known"] and not any(e["usage"].values())
    assert set(e.get("rates") or {}) <= set(RATE_FIELDS), set(e["rates"]) - set(RATE_FIELDS)
    assert all(isinstance(v, str) and v for v in (e.get("rates") or {}).values())
    if name.endswith(".json"):
        assert json.loads(raw).get("model") == e["served_model"]
    else:
        assert raw.endswith(b"\n\n"), "a stream ends with a blank line"


def _sdk_types() -> tuple[dict[str, Any], dict[str, Any]]:
    from anthropic.types.beta import BetaMessage, BetaRawMessageStreamEvent
    from openai.types import CreateEmbeddingResponse
    from openai.types.chat import ChatCompletion, ChatCompletionChunk
    from openai.types.responses import Response, ResponseStreamEvent

    body = {"/v1/chat/completions": ChatCompletion, "/v1/responses": Response,
            "/v1/embeddings": CreateEmbeddingResponse, "/v1/messages": BetaMessage}
    event = {"/v1/chat/completions": ChatCompletionChunk, "/v1/responses": ResponseStreamEvent,
             "/v1/messages": BetaRawMessageStreamEvent}
    return body, event


@pytest.mark.parametrize("name", fixture_names())
def test_fixture_is_a_valid_sdk_object(name: str) -> None:
    """Every body and every stream event validates against the official SDK's type for it: the
    fixtures are real shapes, not something only Tollgate's parsers accept. Exempt: Anthropic's
    `ping` and `error` events (the SDK handles them outside its event union) and Azure's first
    chunk (id, model and object all "", the deviation that fixture is about)."""
    from pydantic import TypeAdapter

    raw, e = load(name)
    body, event = _sdk_types()
    if name.endswith(".json"):
        TypeAdapter(body[e["endpoint"]]).validate_python(json.loads(raw))
        return
    adapter = TypeAdapter(event[e["endpoint"]])
    parser = SSEParser()
    n = 0
    for _, data in parser.feed(raw) + parser.flush():
        if data == b"[DONE]":
            continue
        obj = json.loads(data)
        if e["endpoint"] == "/v1/messages" and obj.get("type") in ("ping", "error"):
            continue
        if e["provider"] == "azure-openai" and obj.get("object") == "":
            continue
        adapter.validate_python(obj)
        n += 1
    assert n > 0


@pytest.mark.parametrize("name", [n for n in fixture_names() if "iterations" in load(n)[1]])
def test_iterations_add_up(name: str) -> None:
    """The hand-computed bill of an Anthropic response with usage.iterations: the top-level fields
    are the sum of the `message` iterations; billed at the served model's rates = top level +
    `compaction` iterations (excluded from the top level); at other models' rates = the
    `advisor_message` iterations, by their model."""
    _, e = load(name)
    kinds = ("input", "cached_input", "cache_write_5m", "cache_write_1h", "output")
    its = e["iterations"]
    assert {k: sum(i[k] for i in its if i["type"] == "message") for k in kinds} == {k: e["top_level"][k] for k in kinds}
    assert {k: e["top_level"][k] + sum(i[k] for i in its if i["type"] == "compaction") for k in kinds} == \
        {k: e["usage"][k] for k in kinds}
    others: dict[str, dict[str, int]] = {}
    for i in its:
        if i["type"] == "advisor_message":
            acc = others.setdefault(i["model"], dict.fromkeys(kinds, 0))
            for k in kinds:
                acc[k] += i[k]
    assert others == e["other_models"]
    assert {i["type"] for i in its} <= {"message", "compaction", "advisor_message"}


def test_xfail_entries_name_real_checks() -> None:
    ids = {f"{_stem(n)}::{c}" for n in fixture_names() for c in checks(n)}
    stale = sorted(set(XFAIL) - ids)
    assert not stale, f"XFAIL entries for checks that do not exist: {stale}"
