"""The `cache:` section of the policy: which requests the response cache serves, for how long,
shared with whom. Frozen pydantic models (unknown keys are errors, reported with file:line by
extproc/config.py like every other section).

Semantics, for docs/cache.md:

* `cache` is a list of rules; a request uses the **first** rule whose `match` holds (like
  `routes`), and no rule at all means the cache is off for it. `enabled: false` on a rule turns
  the cache off for what it matches (put such carve-outs first).
* `match` is a budget's `match` (`models`, `providers`, `where` over identity attributes and
  trusted metadata) plus `paths`. `models` and `providers` are globs on the model and provider
  that serve the request, after any downgrade: the same ones its key is made of.
* `ttl_seconds` is how long an entry lives; a client may ask for another with
  `x-tollgate-cache-ttl`, up to `max_ttl_seconds`.
* `max_entry_bytes` bounds one entry (the response body plus a small header): a larger response
  is served normally and not cached.
* `scope`: `team` (default), `user` or `global`: who shares entries. A request without the
  scope's attribute is not cached (`x-tollgate-cache: skip`), so team-less callers never share.
* `uncachable`: conditions on the request body; a request matching any of them is neither read
  from nor written to the cache (`skip`). Each condition maps body fields (dots reach into
  objects: `stream_options.include_usage`) to a test, all of which must hold: `present`,
  `absent`, `nonzero` (present and not 0 / false / empty), `{in: [values]}`, `{gt: number}`.
* `ignore_fields`: top-level body fields left out of the key (say `user`, `metadata`): requests
  that differ only there share an entry.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)

from ..budgets.policy import Globs, Match, unique_names

MAX_ENTRY_BYTES = 16 * 1024 * 1024
"""The largest `max_entry_bytes` a rule may set: a hit is one ext_proc ImmediateResponse."""
MAX_TTL_SECONDS = 30 * 86400

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_KEYWORDS = ("present", "absent", "nonzero")
Scope = Literal["team", "user", "global"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CacheMatch(Match):
    """A budget's `match` (models, providers, where) plus request paths."""

    paths: Globs | None = None


class FieldTest(_Strict):
    """`{in: [...]}` or `{gt: N}` on one body field (exactly one of them)."""

    in_: list[Any] | None = Field(default=None, alias="in")
    gt: float | None = None

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    @model_validator(mode="after")
    def _one(self) -> FieldTest:
        if (self.in_ is None) == (self.gt is None):
            raise ValueError("give exactly one of `in` (a list of values) or `gt` (a number)")
        return self


Test = Annotated[str | FieldTest, Field(union_mode="left_to_right")]


def _known_keyword(cond: dict[str, Any]) -> dict[str, Any]:
    if not cond:
        raise ValueError("an uncachable condition needs at least one field")
    for field, test in cond.items():
        if not field or any(not part for part in field.split(".")):
            raise ValueError(f"{field!r} is not a field path (names joined by dots)")
        if isinstance(test, str) and test not in _KEYWORDS:
            raise ValueError(f"{field}: {test!r} is not a test; use present, absent, nonzero, {{in: [...]}} "
                             "or {gt: N}")
    return cond


Condition = Annotated[dict[str, Test], AfterValidator(_known_keyword)]


class CacheRule(_Strict):
    """One `cache:` rule: what it matches and how the cache treats those requests."""

    name: str = Field(description="names the rule in records (`cache_rule`) and logs")
    match: CacheMatch = CacheMatch()
    enabled: bool = True
    ttl_seconds: int = Field(default=3600, gt=0, le=MAX_TTL_SECONDS)
    max_ttl_seconds: int = Field(default=86400, gt=0, le=MAX_TTL_SECONDS,
                                 description="the longest x-tollgate-cache-ttl a client may ask for")
    max_entry_bytes: int = Field(default=1024 * 1024, gt=0, le=MAX_ENTRY_BYTES)
    scope: Scope = "team"
    uncachable: list[Condition] = Field(default_factory=list)
    ignore_fields: list[str] = Field(default_factory=list)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _NAME.match(v):
            raise ValueError(f"{v!r}: a cache rule name is letters, digits, '.', '_' and '-'")
        return v

    @model_validator(mode="after")
    def _ttl(self) -> CacheRule:
        if self.max_ttl_seconds < self.ttl_seconds:
            raise ValueError(f"max_ttl_seconds ({self.max_ttl_seconds}) is below ttl_seconds ({self.ttl_seconds})")
        return self


CacheList = Annotated[list[CacheRule], AfterValidator(unique_names("cache rule"))]
"""The type of the top-level `cache:` section (checks unique names)."""


_MISSING = object()


def _lookup(body: Any, path: str) -> Any:
    v = body
    for part in path.split("."):
        if not isinstance(v, dict) or part not in v:
            return _MISSING
        v = v[part]
    return _MISSING if v is None else v


def _holds(test: str | FieldTest, v: Any) -> bool:
    if test == "absent":
        return v is _MISSING
    if v is _MISSING:
        return False
    if test == "present":
        return True
    if test == "nonzero":
        return bool(v) if not isinstance(v, (int, float)) or isinstance(v, bool) else v != 0
    assert isinstance(test, FieldTest)
    if test.in_ is not None:
        return any(v == x and type(v) is type(x) or (_num(v) and _num(x) and v == x) for x in test.in_)
    return _num(v) and test.gt is not None and v > test.gt


def _num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def uncachable_reason(rule: CacheRule, body: dict[str, Any]) -> str | None:
    """The first uncachable condition `body` meets, written out (`temperature=nonzero,seed=absent`), or None."""
    for cond in rule.uncachable:
        if all(_holds(test, _lookup(body, field)) for field, test in cond.items()):
            return ",".join(f"{f}={t if isinstance(t, str) else ('in' if t.in_ is not None else 'gt')}"
                            for f, t in cond.items())
    return None


def describe_rule(rule: CacheRule) -> str:
    """One line for `tollgate check`: what the rule matches and what it does."""
    m = rule.match
    parts = [f"{k} {', '.join(v)}" for k, v in (("models", m.models), ("providers", m.providers),
                                                 ("paths", m.paths)) if v]
    parts += [f"{k}={','.join(v) if isinstance(v, list) else v}" for k, v in m.where.items()]
    what = "; ".join(parts) or "every request"
    if not rule.enabled:
        return f"{rule.name}: {what}: off"
    extra = [f"{len(rule.uncachable)} uncachable conditions"] if rule.uncachable else []
    if rule.ignore_fields:
        extra.append(f"key ignores {', '.join(rule.ignore_fields)}")
    return (f"{rule.name}: {what}: ttl {rule.ttl_seconds}s (at most {rule.max_ttl_seconds}s), entries up to "
            f"{rule.max_entry_bytes} bytes, per {rule.scope if rule.scope != 'global' else 'gateway (global)'}"
            + (f"; {'; '.join(extra)}" if extra else ""))
