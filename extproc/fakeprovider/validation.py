"""Request validation as the real APIs do it: the models the fake serves, and the parameter
checks whose refusals (status, error shape, ``param`` / ``code``) tests rely on.

Messages and codes are written from the providers' API references (OpenAI's error codes
``missing_required_parameter``, ``invalid_type``, ``empty_array``, ``integer_below_min_value``,
``integer_above_max_value``, ``unsupported_parameter``, ``model_not_found``; Anthropic's
``invalid_request_error`` / ``not_found_error`` with pydantic-style ``field: problem`` messages).
"""

from __future__ import annotations

import fnmatch
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

CHAT, RESPONSES, EMBEDDINGS, ANTHROPIC = "chat", "responses", "embeddings", "anthropic"

DEFAULT_PRICES = Path(__file__).resolve().parents[2] / "policies" / "prices.yaml"
# Served even without a price table (and listed first by /v1/models).
BUILTIN_MODELS = ("gpt-4o", "gpt-4o-mini", "o3-mini", "text-embedding-3-small", "text-embedding-3-large",
                  "text-embedding-ada-002", "claude-sonnet-4-6", "claude-haiku-4-5", "claude-opus-4-6")
MODELS_ENV = "TOLLGATE_FAKE_MODELS"

# Names in OpenAI's own namespace: on the OpenAI endpoints these must be on the model list. Other
# names are what OpenAI-compatible servers (Workers AI `@cf/...`, vLLM `org/name`, Ollama
# `name:tag`, a gateway test's made-up model) call their own models, and are served.
_OPENAI_NAMESPACE = re.compile(
    r"^(gpt-|chatgpt-|o\d|text-embedding-|davinci|babbage|dall-e|whisper|tts-|omni-moderation|codex-|computer-use-)")
# Reasoning models take `max_completion_tokens` and refuse `max_tokens`.
_REASONING = re.compile(r"^(o1|o3|o4|gpt-5|gpt-6)")
OPENAI_MAX_N = 128
# Embedding models that refuse `dimensions` (only the text-embedding-3 family takes it).
_NO_DIMENSIONS = ("text-embedding-ada-002",)


class ModelList:
    """Exact model names and globs (``claude-sonnet-4-5*``) the fake serves."""

    def __init__(self, names: Iterable[str] = ()) -> None:
        self.exact: list[str] = []
        self.globs: list[str] = []
        self._exact: set[str] = set()
        self._glob_re: re.Pattern[str] | None = None
        for n in names:
            self.add(n)

    def add(self, name: str) -> None:
        name = str(name).strip()
        if not name:
            return
        if any(c in name for c in "*?["):
            if name not in self.globs:
                self.globs.append(name)
                self._glob_re = re.compile("|".join(f"(?:{fnmatch.translate(g)})" for g in self.globs))
        elif name not in self._exact:
            self.exact.append(name)
            self._exact.add(name)

    def known(self, model: str) -> bool:
        return model in self._exact or (self._glob_re is not None and self._glob_re.match(model) is not None)

    def listed(self) -> list[str]:
        """The exact names, for ``GET /v1/models``."""
        return list(self.exact)

    @classmethod
    def load(cls, price_paths: Iterable[str | Path] = (), extra: Iterable[str] = (),
             env: dict[str, str] | None = None) -> ModelList:
        """The built-in models, every model of ``policies/prices.yaml``, of each ``price_paths``
        entry (a price file, or a policy directory whose ``*.yaml`` are read), of
        ``$TOLLGATE_POLICIES`` when set, and the comma-separated names or globs of ``extra`` and
        ``$TOLLGATE_FAKE_MODELS``."""
        env = os.environ if env is None else env
        out = cls(BUILTIN_MODELS)
        paths: list[Path] = [DEFAULT_PRICES]
        if env.get("TOLLGATE_POLICIES"):
            paths.append(Path(env["TOLLGATE_POLICIES"]))
        paths += [Path(p) for p in price_paths]
        for p in paths:
            for f in sorted(p.glob("*.yaml")) if p.is_dir() else [p]:
                for name in _price_models(f):
                    out.add(name)
        for group in [*extra, env.get(MODELS_ENV, "")]:
            for name in group.split(","):
                out.add(name)
        return out


def _price_models(path: Path) -> list[str]:
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return []
    prices = data.get("prices") if isinstance(data, dict) else None
    models = prices.get("models") if isinstance(prices, dict) else None
    return [str(k) for k in models] if isinstance(models, dict) else []


def serves(api: str, model: str, models: ModelList) -> bool:
    """Whether the fake answers ``model`` on ``api`` (else: the provider's unknown-model 404)."""
    if api == ANTHROPIC:  # Anthropic serves its own models only
        return model.startswith("claude") and models.known(model)
    return models.known(model) or not _OPENAI_NAMESPACE.match(model)


def is_reasoning_model(model: str) -> bool:
    """OpenAI reasoning models (o1, o3, o4, gpt-5 and gpt-6 families; not the ``-chat-latest``
    snapshots), which take only ``max_completion_tokens``."""
    return bool(_REASONING.match(model)) and "-chat-latest" not in model


# --------------------------------------------------------------------------------------------
# the checks
# --------------------------------------------------------------------------------------------

Refusal = tuple[int, dict]


def _json_kind(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "a boolean"
    if isinstance(v, int):
        return "an integer"
    if isinstance(v, float):
        return "a decimal"
    if isinstance(v, str):
        return "a string"
    if isinstance(v, list):
        return "an array"
    return "an object"


def _oai(status: int, message: str, param: str | None, code: str | None) -> Refusal:
    return status, {"error": {"message": message, "type": "invalid_request_error", "param": param, "code": code}}


def _ant(status: int, etype: str, message: str) -> Refusal:
    return status, {"type": "error", "error": {"type": etype, "message": message}}


def _oai_int(body: dict, name: str, lo: int | None = None, hi: int | None = None) -> Refusal | None:
    """OpenAI's integer checks for an optional parameter (null counts as absent)."""
    v = body.get(name)
    if v is None:
        return None
    if not isinstance(v, int) or isinstance(v, bool):
        return _oai(400, f"Invalid type for '{name}': expected an integer, but got {_json_kind(v)} instead.",
                    name, "invalid_type")
    if lo is not None and v < lo:
        return _oai(400, f"Invalid '{name}': integer below minimum value. Expected a value >= {lo}, but got {v} "
                         "instead.", name, "integer_below_min_value")
    if hi is not None and v > hi:
        return _oai(400, f"Invalid '{name}': integer above maximum value. Expected a value <= {hi}, but got {v} "
                         "instead.", name, "integer_above_max_value")
    return None


def _oai_model(api: str, model: str, models: ModelList) -> Refusal | None:
    if serves(api, model, models):
        return None
    return _oai(404, f"The model `{model}` does not exist or you do not have access to it.", None, "model_not_found")


def _chat(body: dict, models: ModelList) -> Refusal | None:
    msgs = body.get("messages")
    if "messages" not in body:
        return _oai(400, "Missing required parameter: 'messages'.", "messages", "missing_required_parameter")
    if not isinstance(msgs, list):
        return _oai(400, f"Invalid type for 'messages': expected an array of objects, but got {_json_kind(msgs)} "
                         "instead.", "messages", "invalid_type")
    if not msgs:
        return _oai(400, "Invalid 'messages': empty array. Expected an array with minimum length 1, but got an "
                         "empty array instead.", "messages", "empty_array")
    refusal = _oai_int(body, "n", 1, OPENAI_MAX_N)
    if refusal is not None:
        return refusal
    refusal = _oai_model(CHAT, body["model"], models)
    if refusal is not None:
        return refusal
    if is_reasoning_model(body["model"]) and body.get("max_tokens") is not None:
        return _oai(400, "Unsupported parameter: 'max_tokens' is not supported with this model. Use "
                         "'max_completion_tokens' instead.", "max_tokens", "unsupported_parameter")
    return None


def _responses(body: dict, models: ModelList) -> Refusal | None:
    return _oai_model(RESPONSES, body["model"], models)


def _embeddings(body: dict, models: ModelList) -> Refusal | None:
    if "input" not in body:
        return _oai(400, "Missing required parameter: 'input'.", "input", "missing_required_parameter")
    refusal = _oai_int(body, "dimensions", 1)
    if refusal is not None:
        return refusal
    refusal = _oai_model(EMBEDDINGS, body["model"], models)
    if refusal is not None:
        return refusal
    if body.get("dimensions") is not None and body["model"] in _NO_DIMENSIONS:
        return _oai(400, "This model does not support specifying dimensions.", None, None)
    return None


def _anthropic(body: dict, models: ModelList, counting: bool) -> Refusal | None:
    if not counting:  # count_tokens takes no max_tokens
        mt = body.get("max_tokens")
        if "max_tokens" not in body:
            return _ant(400, "invalid_request_error", "max_tokens: Field required")
        if not isinstance(mt, int) or isinstance(mt, bool):
            return _ant(400, "invalid_request_error", "max_tokens: Input should be a valid integer")
        if mt < 0:  # 0 is valid: it warms the cache and generates nothing
            return _ant(400, "invalid_request_error", "max_tokens: Input should be greater than or equal to 0")
    msgs = body.get("messages")
    if "messages" not in body:
        return _ant(400, "invalid_request_error", "messages: Field required")
    if not isinstance(msgs, list):
        return _ant(400, "invalid_request_error", "messages: Input should be a valid list")
    if not msgs:
        return _ant(400, "invalid_request_error", "messages: at least one message is required")
    if not serves(ANTHROPIC, body["model"], models):
        return _ant(404, "not_found_error", f"model: {body['model']}")
    return None


def validate(api: str, body: dict, models: ModelList, counting: bool = False) -> Refusal | None:
    """``(status, error body)`` when the real API would refuse ``body`` (which has a ``model``
    string), else None. ``counting``: Anthropic's ``count_tokens`` (no ``max_tokens``)."""
    if api == CHAT:
        return _chat(body, models)
    if api == RESPONSES:
        return _responses(body, models)
    if api == EMBEDDINGS:
        return _embeddings(body, models)
    return _anthropic(body, models, counting)
