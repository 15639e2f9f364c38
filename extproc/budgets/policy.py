"""The `budgets:` section of the policy file, as pydantic models (unknown keys are errors).

Semantics, for the user docs:

* `match` decides which requests count against a budget. Every given key must match; an omitted
  key matches everything. `models` / `providers` are fnmatch globs on the requested (candidate)
  model and its provider. `where` maps an attribute name to a glob or a list of globs: a string
  attribute matches if any glob matches it, a list attribute (e.g. `groups`) matches if any element
  matches any glob, and a missing attribute never matches. Matching is case-sensitive.
  `model` and `provider` are attributes too, so `where: {model: ...}` and `per: [model]` work.
* `per` lists attributes that split the budget into one counter per distinct value combination
  (e.g. `per: [user]` = one counter per user). No `per` = one counter shared by every matching
  request. A request without a `per` attribute (or with an empty one) is counted under the value
  `"-"`; a list attribute is counted under its sorted elements joined by `,`.
* `limit_usd` is a number, or `{default, tiers, overrides}`. Precedence, highest first:
  the first matching `overrides` entry, then the first matching `tiers` entry, then `default`.
  Limits are re-read on every request, so a policy reload changes limits immediately.
* `window`: `{calendar: day|week|month, timezone: <IANA name, default UTC>, week_start: monday..sunday}`
  resets at local midnight of the period start (DST-aware); or `{rolling: 24h, bucket: 1h}`
  (units `s`, `m` = minutes, `h`, `d`) sums spend in `bucket`-sized time buckets over the last
  `rolling` period. `bucket` must divide `rolling`; the default is the largest bucket that splits
  the window into at most 24 equal whole-second buckets.
* `action: block` (default) refuses a request that would exceed the limit; `action: downgrade`
  re-routes it to the first of `fallbacks` (required) that fits every budget.
* `warn_at`: fractions in (0, 1]; a request whose reservation brings the counter to or above one of
  them is reported as a warning.
* `mode: shadow` records spend like `enforce` but never blocks; would-be blocks are reported.
* `clamp: true` lowers the request's output-token cap instead of blocking, when some cap still fits.
* `on_store_error`: when Redis is unreachable, `fail_closed` (default) answers store_error (503);
  `fail_open` lets the request through unaccounted. A request is let through only if every
  budget it matches is `fail_open`.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from decimal import Decimal
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationInfo,
    field_validator,
    model_validator,
)

from .money import usd_to_nusd

MAX_ROLLING_BUCKETS = 1000  # one HMGET per check; keeps the Lua call small

_DURATION = re.compile(r"^\s*(\d+)\s*([smhd])\s*$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def policy_name(v: str) -> str:
    """A policy entry's name (budget, rate limit, alert): it becomes part of Redis keys and metrics."""
    if not _NAME.match(v):
        raise ValueError("name must start with a letter or digit and use only letters, digits, '_', '.', '-'")
    return v


def _per_attrs(v: list[str]) -> list[str]:
    if any(not a for a in v):
        raise ValueError("per attributes must be non-empty names")
    if len(set(v)) != len(v):
        raise ValueError("per lists an attribute twice")
    return v


PolicyName = Annotated[str, AfterValidator(policy_name)]
"""The `name` of a budget, rate limit or alert."""
PerAttrs = Annotated[list[str], AfterValidator(_per_attrs)]
"""A `per` list: the attributes that split a budget or rate limit into one counter per value."""


def parse_duration(text: str) -> int:
    """`"24h"` -> 86400 seconds; raises ValueError with a message meant for the policy author."""
    m = _DURATION.match(text) if isinstance(text, str) else None
    if not m or int(m.group(1)) <= 0:
        raise ValueError(f"{text!r} is not a duration; use a positive whole number with s, m (minutes), h or d, e.g. '24h'")
    return int(m.group(1)) * _UNIT_SECONDS[m.group(2)]


def _globs(v: str | list[str]) -> list[str]:
    return [v] if isinstance(v, str) else v


Globs = Annotated[str | list[str], AfterValidator(_globs)]
"""One glob or a list of globs; normalised to a list."""

Usd = Annotated[Decimal, Field(ge=0, allow_inf_nan=False)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Match(_Strict):
    """Which requests count against a budget; all given keys must match, omitted = everything."""

    models: Globs | None = None
    providers: Globs | None = None
    where: dict[str, Globs] = Field(default_factory=dict)


class Tier(_Strict):
    """A limit for requests whose attributes match `where` (first matching tier wins)."""

    where: dict[str, Globs] = Field(min_length=1)
    limit_usd: Usd


class LimitSpec(_Strict):
    """A default limit with tiers and per-identity overrides: overrides > tiers > default."""

    default: Usd
    tiers: list[Tier] = Field(default_factory=list)
    overrides: list[Tier] = Field(default_factory=list)


class CalendarWindowSpec(_Strict):
    """Resets at the start of each local day / week / month in `timezone`."""

    calendar: Literal["day", "week", "month"]
    timezone: str = "UTC"
    week_start: Literal["monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday"] = "monday"

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, v: str) -> str:
        try:
            ZoneInfo(v)
        except (ZoneInfoNotFoundError, ValueError) as e:
            raise ValueError(f"unknown IANA time zone {v!r} (e.g. 'Europe/Berlin', 'UTC')") from e
        return v


class RollingWindowSpec(_Strict):
    """Sum of spend over the last `rolling` period, kept in `bucket`-sized time buckets."""

    rolling: str
    bucket: str | None = None

    @field_validator("rolling")
    @classmethod
    def _window(cls, v: str) -> str:
        parse_duration(v)
        return v

    @field_validator("bucket")
    @classmethod
    def _bucket(cls, v: str | None, info: ValidationInfo) -> str | None:
        if v is None:
            return v
        b = parse_duration(v)
        if "rolling" not in info.data:
            return v
        w = parse_duration(info.data["rolling"])
        if b > w or w % b:
            raise ValueError(f"bucket {v!r} must divide the rolling window {info.data['rolling']!r} evenly")
        if w // b > MAX_ROLLING_BUCKETS:
            raise ValueError(f"{w // b} buckets is too many (max {MAX_ROLLING_BUCKETS}); use a bigger bucket")
        return v

    @property
    def window_seconds(self) -> int:
        return parse_duration(self.rolling)

    @property
    def bucket_seconds(self) -> int:
        """The given bucket, else the largest one that splits the window into <= 24 whole-second buckets."""
        if self.bucket is not None:
            return parse_duration(self.bucket)
        w = self.window_seconds
        for n in range(24, 0, -1):
            if w % n == 0:
                return w // n
        return w  # unreachable: n == 1 always divides


def _limit_tag(v: Any) -> str:
    return "tiered" if isinstance(v, (dict, LimitSpec)) else "usd"


LimitUsd = Annotated[
    Annotated[Usd, Tag("usd")] | Annotated[LimitSpec, Tag("tiered")],
    Discriminator(_limit_tag),
]
"""A number of dollars, or `{default, tiers, overrides}`."""


def _window_tag(v: Any) -> str | None:
    if isinstance(v, dict):
        if "calendar" in v:
            return "calendar"
        if "rolling" in v:
            return "rolling"
        return None
    if isinstance(v, CalendarWindowSpec):
        return "calendar"
    if isinstance(v, RollingWindowSpec):
        return "rolling"
    return None


WindowSpec = Annotated[
    Annotated[CalendarWindowSpec, Tag("calendar")] | Annotated[RollingWindowSpec, Tag("rolling")],
    Discriminator(
        _window_tag,
        custom_error_type="window_kind",
        custom_error_message="window needs either `calendar: day|week|month` or `rolling: <duration>`",
    ),
]


class Budget(_Strict):
    """One budget: which requests count, how they are split into counters, the limit and what to do at it."""

    name: PolicyName
    match: Match = Field(default_factory=Match)
    per: PerAttrs = Field(default_factory=list)
    limit_usd: LimitUsd
    window: WindowSpec
    action: Literal["block", "downgrade"] = "block"
    fallbacks: list[str] = Field(default_factory=list, validate_default=True)
    warn_at: list[Annotated[float, Field(gt=0, le=1)]] = Field(default_factory=list)
    mode: Literal["enforce", "shadow"] = "enforce"
    clamp: bool = False
    on_store_error: Literal["fail_closed", "fail_open"] = "fail_closed"

    @field_validator("fallbacks")
    @classmethod
    def _fallbacks(cls, v: list[str], info: ValidationInfo) -> list[str]:
        if info.data.get("action") == "downgrade" and not v:
            raise ValueError("action 'downgrade' needs at least one fallback model")
        return v

    def limit_spec(self) -> LimitSpec:
        """The limit as a LimitSpec, whether it was written as a number or a mapping."""
        if isinstance(self.limit_usd, LimitSpec):
            return self.limit_usd
        return LimitSpec(default=self.limit_usd)

    @property
    def default_limit_nusd(self) -> int:
        return usd_to_nusd(self.limit_spec().default)


def unique_names(what: str) -> Callable[[list[Any]], list[Any]]:
    """An AfterValidator for a policy list whose entries have a `name` (budgets, rate limits,
    alerts, cache rules): a name used twice is an error naming the kind of entry."""

    def check(items: list[Any]) -> list[Any]:
        seen: set[str] = set()
        for x in items:
            if x.name in seen:
                raise ValueError(f"{what} name {x.name!r} is used twice; names must be unique")
            seen.add(x.name)
        return items

    return check


BudgetList = Annotated[list[Budget], AfterValidator(unique_names("budget"))]
"""Use this type for the `budgets:` field of the top-level policy model (checks unique names)."""


class BudgetsSection(BaseModel):
    """Just the `budgets:` section; other top-level sections of the policy file are ignored here."""

    model_config = ConfigDict(extra="ignore")

    budgets: BudgetList = Field(default_factory=list)


class RateLimit(_Strict):
    """Requests and/or tokens per sliding window, counted like a budget (docs/ratelimits.md).

    `requests` counts every admitted request; `tokens` reserves the request's worst case (input
    upper bound plus output cap) and settles to what the provider reported (all input kinds plus
    output). Both are checked in the same Redis call as the budgets' reservation, all or nothing.
    """

    name: PolicyName
    match: Match = Field(default_factory=Match)
    per: PerAttrs = Field(default_factory=list)
    requests: int | None = Field(default=None, gt=0)
    tokens: int | None = Field(default=None, gt=0)
    window: str = "1m"
    bucket: str | None = None

    @field_validator("window")
    @classmethod
    def _window(cls, v: str) -> str:
        parse_duration(v)
        return v

    @model_validator(mode="after")
    def _complete(self) -> "RateLimit":
        if self.requests is None and self.tokens is None:
            raise ValueError("a rate limit needs `requests`, `tokens`, or both")
        self.window_spec()  # a bucket that does not divide the window is this entry's error
        return self

    def window_spec(self) -> "RollingWindowSpec":
        """The sliding window, as a rolling budget window (validates `bucket` against `window`)."""
        return RollingWindowSpec(rolling=self.window, bucket=self.bucket)

    def as_budget(self) -> Budget:
        """The budget-shaped view the engine matches and keys counters with (its limit is not dollars)."""
        return Budget(name=self.name, match=self.match, per=self.per, limit_usd=Decimal(0), window=self.window_spec(),
                      on_store_error="fail_open")


RateLimitList = Annotated[list[RateLimit], AfterValidator(unique_names("rate limit"))]
"""Use this type for the `rate_limits:` field of the top-level policy model."""


def load_budgets(data: Any) -> list[Budget]:
    """Budgets from a parsed policy document (a mapping with a `budgets:` key) or YAML text."""
    if isinstance(data, str):
        import yaml

        data = yaml.safe_load(data) or {}
    return BudgetsSection.model_validate(data).budgets
