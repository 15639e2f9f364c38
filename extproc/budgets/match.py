"""Which budgets a request counts against, which counter it lands in, and which limit applies.

Pure functions over a request's attributes (`Mapping[str, str | list[str]]`, with `model` and
`provider` of the candidate included), so they are cheap and testable without Redis.
"""

from __future__ import annotations

from collections.abc import Mapping
from urllib.parse import quote, unquote

from ..attrs import Attrs, value_matches, where_matches
from .money import usd_to_nusd
from .policy import Budget, LimitSpec


MISSING = "-"
"""Counter value for a `per` attribute the request does not have (or has empty)."""


def budget_matches(budget: Budget, attrs: Attrs, *, ignore_missing_model: bool = False) -> bool:
    """Does this request count against `budget`? `attrs` must carry `model` and `provider`.

    With `ignore_missing_model` (used by status queries), a model/provider filter is skipped when
    the attrs have no model/provider, so "what is left for me" lists every identity budget.
    """
    m = budget.match
    for attr, globs in (("model", m.models), ("provider", m.providers)):
        if globs is None:
            continue
        if ignore_missing_model and attrs.get(attr) is None:
            continue
        if not value_matches(attrs.get(attr), [globs] if isinstance(globs, str) else globs):
            return False
    return where_matches(m.where, attrs)


def per_values(budget: Budget, attrs: Attrs) -> dict[str, str]:
    """The counter a request lands in: one value per `per` attribute (`-` if missing, sorted+joined lists)."""
    out: dict[str, str] = {}
    for attr in budget.per:
        v = attrs.get(attr)
        if isinstance(v, list):
            v = ",".join(sorted(v))
        out[attr] = v if v else MISSING
    return out


def per_key(values: Mapping[str, str]) -> str:
    """`user=alice%40x.com,team=ml`, or `_` for a shared counter; quoting keeps `:` `,` `=` out of keys."""
    if not values:
        return "_"
    return ",".join(f"{k}={quote(v, safe='@._-+')}" for k, v in values.items())


def parse_per_key(text: str) -> dict[str, str]:
    """The inverse of `per_key`: `user=alice%40x.com` -> {"user": "alice@x.com"}; `_` -> {}."""
    if text == "_":
        return {}
    return {k: unquote(v) for k, _, v in (p.partition("=") for p in text.split(","))}


def limit_source(budget: Budget, attrs: Attrs) -> tuple[str, int | None]:
    """Which entry sets the limit for these attrs: the first matching override, else the first
    matching tier, else the default: ("override", i), ("tier", i) or ("default", None)."""
    spec: LimitSpec = budget.limit_spec()
    for kind, entries in (("override", spec.overrides), ("tier", spec.tiers)):
        for i, entry in enumerate(entries):
            if where_matches(entry.where, attrs):
                return kind, i
    return "default", None


def limit_nusd(budget: Budget, attrs: Attrs) -> int:
    """The limit for this request, from the entry `limit_source` picks."""
    spec: LimitSpec = budget.limit_spec()
    kind, i = limit_source(budget, attrs)
    if i is None:
        return usd_to_nusd(spec.default)
    return usd_to_nusd((spec.overrides if kind == "override" else spec.tiers)[i].limit_usd)
