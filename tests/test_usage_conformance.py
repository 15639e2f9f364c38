"""Conformance of the usage registry with the installed SDKs.

Walks the `openai` and `anthropic` SDKs' usage types recursively (and the Responses output items
that carry per-call prices) and collects every field path, e.g.
`openai.CompletionUsage.prompt_tokens_details.cache_write_tokens`. Every path must be in exactly
one table of `extproc/providers/usage_fields.py`: PRICED, NOT_BILLED or NOT_YET_PRICED. A field an
SDK update adds therefore fails this test until someone decides what it costs; a registry entry
whose field the SDK dropped fails it too (stale).

Path syntax: `<sdk>.<Type>.<field>...`; lists and dicts are transparent; a union of models told
apart by a one-value `type` Literal becomes `field[<type>]` (the `type` field itself is then not
listed); a union member with no other field is listed as `field[<type>]`.
"""

from __future__ import annotations

import inspect
import types
import typing
from typing import Annotated, Literal, Union, get_args, get_origin

import anthropic.types as anthropic_types
import openai.types as openai_types
import pytest
from anthropic.types import beta as anthropic_beta
from openai.types import CompletionUsage, CreateEmbeddingResponse
from openai.types.chat import ChatCompletion
from openai.types.responses import Response, ResponseUsage
from openai.types.responses.response_output_item import ResponseOutputItem
from pydantic import BaseModel

from extproc.providers import usage_fields

# Responses output items billed per call (or per container / image): their fields are walked too.
# Every other item type is listed by its `type` only (its content is tokens, already in usage).
PER_CALL_ITEMS = ("web_search_call", "file_search_call", "code_interpreter_call", "image_generation_call")

# (path prefix, model, only these fields or None for all)
ROOTS: list[tuple[str, type, tuple[str, ...] | None]] = [
    ("openai.CompletionUsage", CompletionUsage, None),
    ("openai.ChatCompletion", ChatCompletion, ("service_tier",)),
    ("openai.CreateEmbeddingResponse", CreateEmbeddingResponse, ("usage",)),
    ("openai.responses.ResponseUsage", ResponseUsage, None),
    ("openai.responses.Response", Response, ("tool_usage", "service_tier")),
    ("anthropic.Usage", anthropic_types.Usage, None),
    ("anthropic.MessageDeltaUsage", anthropic_types.MessageDeltaUsage, None),
    ("anthropic.beta.BetaUsage", anthropic_beta.BetaUsage, None),
    ("anthropic.beta.BetaMessageDeltaUsage", anthropic_beta.BetaMessageDeltaUsage, None),
]
OUTPUT_ITEMS = "openai.responses.ResponseOutputItem"

# Usage types that must be reached by the walk (through the roots above): a guard against a walk
# that silently stops descending (a new typing construct, an SDK refactor).
MUST_REACH = [
    openai_types.completion_usage.PromptTokensDetails,
    openai_types.completion_usage.CompletionTokensDetails,
    openai_types.responses.response_usage.InputTokensDetails,
    openai_types.responses.response_usage.InputTokensDetailsCacheWriteTokensDetails,
    openai_types.responses.response_usage.OutputTokensDetails,
    openai_types.create_embedding_response.Usage,
    anthropic_types.ServerToolUsage,
    anthropic_types.CacheCreation,
    anthropic_beta.BetaServerToolUsage,
    anthropic_beta.BetaCacheCreation,
    anthropic_beta.BetaMessageIterationUsage,
    anthropic_beta.BetaCompactionIterationUsage,
    anthropic_beta.BetaAdvisorMessageIterationUsage,
    anthropic_beta.BetaFallbackMessageIterationUsage,
    anthropic_beta.BetaFallbackCreditUsage,
]


class Walk:
    def __init__(self) -> None:
        self.paths: set[str] = set()
        self.visited: set[type] = set()

    def annotation(self, path: str, tp: object, stack: tuple[type, ...]) -> None:
        origin = get_origin(tp)
        if origin is Annotated:
            return self.annotation(path, get_args(tp)[0], stack)
        if origin in (Union, types.UnionType):
            members = [a for a in get_args(tp) if a is not type(None)]
            models = [a for a in members if _is_model(a)]
            if len(models) > 1 and all(_tag(m) for m in models):
                for m in models:
                    self.model(f"{path}[{_tag(m)}]", m, stack, skip="type")
                if len(models) < len(members):
                    self.paths.add(path)
                return None
            for a in members:
                self.annotation(path, a, stack)
            return None
        if origin in (list, tuple, set, frozenset, typing.Sequence):
            return self.annotation(path, get_args(tp)[0], stack)
        if origin is dict:
            return self.annotation(path, get_args(tp)[1], stack)
        if _is_model(tp):
            return self.model(path, tp, stack)
        self.paths.add(path)
        return None

    def model(self, path: str, m: type, stack: tuple[type, ...], skip: str | None = None,
              only: tuple[str, ...] | None = None) -> None:
        self.visited.add(m)
        if m in stack:  # recursive type: list the path, do not loop
            self.paths.add(path)
            return
        before = len(self.paths)
        for name, field in m.model_fields.items():
            if name == skip or (only is not None and name not in only):
                continue
            self.annotation(f"{path}.{name}", field.annotation, (*stack, m))
        if len(self.paths) == before:  # a union member with nothing but its tag
            self.paths.add(path)


def _is_model(tp: object) -> bool:
    return inspect.isclass(tp) and issubclass(tp, BaseModel)


def _tag(m: type) -> str | None:
    field = m.model_fields.get("type")
    if field is None:
        return None
    args = get_args(field.annotation)
    return args[0] if get_origin(field.annotation) is Literal and len(args) == 1 else None


def _output_item_models() -> list[type]:
    union = ResponseOutputItem
    while get_origin(union) is Annotated:
        union = get_args(union)[0]
    return [m for m in get_args(union) if _is_model(m)]


def sdk_walk() -> Walk:
    w = Walk()
    for prefix, model, only in ROOTS:
        for name in only or ():
            assert name in model.model_fields, f"{prefix}.{name} is gone from the SDK: update ROOTS"
        w.model(prefix, model, (), only=only)
    for m in _output_item_models():
        tag = _tag(m)
        assert tag, f"output item {m.__name__} has no `type` tag"
        w.paths.add(f"{OUTPUT_ITEMS}[{tag}]")
        if tag in PER_CALL_ITEMS:
            w.model(f"{OUTPUT_ITEMS}[{tag}]", m, (), skip="type")
    return w


@pytest.fixture(scope="module")
def walk() -> Walk:
    return sdk_walk()


def registry() -> dict[str, tuple[str, str]]:
    out: dict[str, tuple[str, str]] = {}
    for table in ("PRICED", "NOT_BILLED", "NOT_YET_PRICED"):
        for path, why in getattr(usage_fields, table).items():
            out.setdefault(path, (table, why))
    return out


# ---- the walk itself ------------------------------------------------------------------------

def test_walk_reaches_every_usage_type(walk: Walk) -> None:
    missing = [t.__module__ + "." + t.__qualname__ for t in MUST_REACH if t not in walk.visited]
    assert not missing, f"the SDK walk no longer reaches {missing}: fix Walk or ROOTS"
    # a few paths that must exist in any SDK version this project supports
    for path in ("openai.CompletionUsage.prompt_tokens", "openai.responses.ResponseUsage.input_tokens",
                 "anthropic.Usage.cache_read_input_tokens", "anthropic.MessageDeltaUsage.output_tokens",
                 f"{OUTPUT_ITEMS}[web_search_call]", f"{OUTPUT_ITEMS}[message]"):
        assert path in walk.paths, path


def test_every_per_call_item_exists(walk: Walk) -> None:
    tags = {_tag(m) for m in _output_item_models()}
    assert set(PER_CALL_ITEMS) <= tags, f"per-call output items gone from the SDK: {set(PER_CALL_ITEMS) - tags}"


# ---- the registry against the SDK -----------------------------------------------------------

def test_every_sdk_usage_field_is_registered(walk: Walk) -> None:
    known = registry()
    unknown = sorted(p for p in walk.paths if p not in known)
    assert not unknown, (
        f"{len(unknown)} usage field(s) in the installed SDKs that Tollgate neither prices nor lists as not "
        "billed. Add each to extproc/providers/usage_fields.py (PRICED, NOT_BILLED with the reason, or "
        "NOT_YET_PRICED with the issue item):\n  " + "\n  ".join(unknown))


def test_no_stale_registry_entries(walk: Walk) -> None:
    stale = sorted(p for p in registry() if p not in walk.paths)
    assert not stale, (
        f"{len(stale)} registry path(s) no longer exist in the installed SDKs (renamed or removed): "
        "update extproc/providers/usage_fields.py:\n  " + "\n  ".join(stale))


def test_registry_tables_are_disjoint_and_explained() -> None:
    tables = {t: getattr(usage_fields, t) for t in ("PRICED", "NOT_BILLED", "NOT_YET_PRICED")}
    seen: dict[str, str] = {}
    for name, table in tables.items():
        assert isinstance(table, dict), name
        for path, why in table.items():
            assert path not in seen, f"{path} is in both {seen[path]} and {name}"
            seen[path] = name
            assert isinstance(why, str) and why.strip(), f"{name}[{path!r}] needs a reason"


def test_nothing_left_unpriced() -> None:
    pending = usage_fields.NOT_YET_PRICED
    lines = [f"{p}: {why}" for p, why in sorted(pending.items())]
    assert not pending, f"{len(pending)} billed usage field(s) not priced yet:\n  " + "\n  ".join(lines)
