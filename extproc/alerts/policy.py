"""The `alerts:` section of the policy: webhooks, what they watch, which events they want.

Pydantic models (frozen, unknown keys are errors), so a wrong field is reported with its file and
line like every other section; `alert_problems` adds the checks that need the budgets too
(unknown budget names, `where` attributes no watched budget splits its counters by). Semantics,
for docs/alerts.md:

* `url`: where the JSON payload is POSTed (http or https). `${NAME}` reads it from the
  environment, which is where a Slack or Teams webhook URL (a secret) belongs.
* `budgets`: names or globs of the budgets watched; omitted, every budget. A name that is no
  budget, or a glob that matches none, is an error (a typo would silence the alert).
* `where`: globs on the counter's `per` values (`{team: ml}` watches team ml's counter of a
  `per: [team]` budget); omitted, every counter of the watched budgets.
* `events`: any of EVENTS; omitted, all of them.
"""

from __future__ import annotations

import fnmatch
from decimal import Decimal
from typing import TYPE_CHECKING, Annotated, Literal
from urllib.parse import urlsplit

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator

from ..budgets.policy import Globs, PolicyName, Usd, parse_duration, unique_names

if TYPE_CHECKING:
    from ..budgets.policy import Budget
    from ..policy_yaml import SourceMap

EventKind = Literal["threshold", "exhausted", "downgrade", "forecast", "spike"]
EVENTS: tuple[EventKind, ...] = ("threshold", "exhausted", "downgrade", "forecast", "spike")
"""threshold: settled spend crossed one of the budget's `warn_at` fractions; exhausted: the
counter's first blocked request; downgrade: its first downgraded request; forecast: projected to
run out before its calendar period ends; spike: the current hour's spend over `spike.factor` x the
counter's usual hourly spend."""

MAX_BASELINE_HOURS = 7 * 24
"""Spike baselines read the counter's hourly history, which is kept 9 days (alerts/store.py)."""

class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SpikeSpec(_Strict):
    """When spend counts as a spike: the current UTC hour's spend on a counter is more than
    `factor` x its mean hourly spend over the `baseline` before it, and at least `min_usd`."""

    factor: Decimal = Field(default=Decimal(5), gt=1, allow_inf_nan=False)
    baseline: str = Field(default="24h", description="how much history the usual hourly rate is the mean of "
                                                     "(whole hours, at most 7d)")
    min_usd: Usd = Field(default=Decimal(1), description="an hour below this is never a spike (a new counter's "
                                                         "first dollars are not a runaway)")

    @field_validator("baseline")
    @classmethod
    def _hours(cls, v: str) -> str:
        s = parse_duration(v)
        if s % 3600 or not 3600 <= s <= MAX_BASELINE_HOURS * 3600:
            raise ValueError(f"baseline {v!r} must be whole hours from 1h to 7d")
        return v

    @property
    def baseline_hours(self) -> int:
        return parse_duration(self.baseline) // 3600


class Alert(_Strict):
    """One webhook and what it is told about."""

    name: PolicyName
    url: str = Field(description="http(s) URL the payload is POSTed to; use ${ENV} for a secret URL")
    budgets: list[str] | None = Field(default=None, description="budget names or globs; omitted: every budget")
    where: dict[str, Globs] = Field(default_factory=dict, description="globs on the counter's per values")
    events: list[EventKind] = Field(default_factory=lambda: list(EVENTS), min_length=1)
    spike: SpikeSpec = SpikeSpec()
    headers: dict[str, str] = Field(default_factory=dict, description="extra request headers (e.g. a token)")
    timeout_seconds: float = Field(default=5.0, gt=0, le=60, description="per attempt")
    retries: int = Field(default=5, ge=0, le=20, description="attempts after the first, on 5xx, 408, 429 or no answer")
    backoff_seconds: float = Field(default=1.0, gt=0, le=300,
                                   description="wait before the first retry; doubles each time, at most 5 minutes")

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        u = urlsplit(v)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise ValueError("must be an http:// or https:// URL with a host (an unset ${VAR} leaves it empty)")
        return v

    @field_validator("events")
    @classmethod
    def _events(cls, v: list[EventKind]) -> list[EventKind]:
        if len(set(v)) != len(v):
            raise ValueError("an event is listed twice")
        return v

    @property
    def host(self) -> str:
        """Where it goes, without the path: webhook URLs carry their secret in the path or query."""
        u = urlsplit(self.url)
        return f"{u.scheme}://{u.netloc.rpartition('@')[2]}"

    def watches(self, budget: str) -> bool:
        return self.budgets is None or any(fnmatch.fnmatchcase(budget, g) for g in self.budgets)

    def in_scope(self, per: dict[str, str]) -> bool:
        """Does a counter with these `per` values fall under `where`? A missing attribute never matches."""
        return all(k in per and any(fnmatch.fnmatchcase(per[k], g) for g in globs)
                   for k, globs in self.where.items())


AlertList = Annotated[list[Alert], AfterValidator(unique_names("alert"))]
"""The type of the top-level `alerts:` field (checks unique names)."""


def alert_problems(alerts: list[Alert], budgets: "list[Budget]", smap: "SourceMap") -> list[str]:
    """Checks that need the budgets: every name or glob in `budgets` finds a budget, and every
    `where` attribute is a `per` attribute of some watched budget (else it can never match)."""
    names = [b.name for b in budgets]
    problems = []
    for i, a in enumerate(alerts):
        for j, pattern in enumerate(a.budgets or []):
            if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
                what = "glob matches no budget" if any(c in pattern for c in "*?[") else "unknown budget"
                problems.append(smap.describe(("alerts", i, "budgets", j), f"{what} {pattern!r}"))
        watched = [b for b in budgets if a.watches(b.name)]
        for attr in a.where:
            if not any(attr in b.per for b in watched):
                problems.append(smap.describe(("alerts", i, "where", attr), f"no watched budget has {attr!r} in "
                                              "its `per`, so this never matches a counter"))
    return problems
