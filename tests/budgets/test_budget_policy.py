"""Policy parsing: valid YAML loads; bad input fails with a pydantic error pointing at the right place."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from extproc.budgets import NANO_PER_USD, load_budgets, nusd_to_usd, usd_to_nusd
from extproc.budgets.match import budget_matches, limit_nusd, per_key, per_values
from extproc.budgets.policy import CalendarWindowSpec, LimitSpec, RollingWindowSpec

FULL = """
budgets:
  - name: per-user-monthly
    match:
      models: ["gpt-4o*", "claude-*"]
      providers: [openai, anthropic]
      where: {team: ml, groups: "eng-*"}
    per: [user]
    limit_usd:
      default: 500
      tiers:
        - where: {groups: senior-engineers}
          limit_usd: 2000
        - where: {groups: [interns, "contract-*"]}
          limit_usd: 50
      overrides:
        - where: {email: alice@example.com}
          limit_usd: 3000
    window: {calendar: month, timezone: Europe/Berlin}
    action: downgrade
    fallbacks: [gpt-4o-mini]
    warn_at: [0.8, 0.95]
    mode: enforce
    clamp: true
    on_store_error: fail_open
  - name: org-daily
    limit_usd: 10000.5
    window: {rolling: 24h, bucket: 1h}
identity: {ignored: here}
"""


def one(**kw: Any) -> dict[str, Any]:
    return {"name": "b", "limit_usd": 1, "window": {"calendar": "day"}, **kw}


def errors(*items: dict[str, Any]) -> list[tuple[tuple[Any, ...], str]]:
    with pytest.raises(ValidationError) as ei:
        load_budgets({"budgets": list(items)})
    return [(e["loc"], e["msg"]) for e in ei.value.errors()]


def test_money_is_exact() -> None:
    assert NANO_PER_USD == 1_000_000_000
    assert usd_to_nusd(0.1) == 100_000_000
    assert usd_to_nusd("0.000000001") == 1
    assert usd_to_nusd(500) == 500 * NANO_PER_USD
    assert nusd_to_usd(1_500_000_000) == 1.5


def test_full_policy_loads() -> None:
    b, org = load_budgets(FULL)
    assert b.match.models == ["gpt-4o*", "claude-*"]
    assert b.match.where == {"team": ["ml"], "groups": ["eng-*"]}
    assert isinstance(b.limit_usd, LimitSpec) and len(b.limit_usd.tiers) == 2
    assert isinstance(b.window, CalendarWindowSpec) and b.window.timezone == "Europe/Berlin"
    assert (b.action, b.fallbacks, b.warn_at, b.clamp, b.on_store_error) == ("downgrade", ["gpt-4o-mini"], [0.8, 0.95], True, "fail_open")
    assert isinstance(org.window, RollingWindowSpec) and org.window.bucket_seconds == 3600
    assert org.default_limit_nusd == 10_000_500_000_000
    assert (org.action, org.mode, org.on_store_error, org.per) == ("block", "enforce", "fail_closed", [])


@pytest.mark.parametrize(
    ("budget", "loc", "needle"),
    [
        (one(bogus=1), ("budgets", 0, "bogus"), "Extra inputs"),
        (one(match={"model": ["x"]}), ("budgets", 0, "match", "model"), "Extra inputs"),
        (one(action="downgrade"), ("budgets", 0, "fallbacks"), "needs at least one fallback"),
        (one(action="downgrade", fallbacks=[]), ("budgets", 0, "fallbacks"), "needs at least one fallback"),
        (one(action="throttle"), ("budgets", 0, "action"), "'block' or 'downgrade'"),
        (one(window={"rolling": "24x"}), ("budgets", 0, "window", "rolling", "rolling"), "not a duration"),
        (one(window={"rolling": "0h"}), ("budgets", 0, "window", "rolling", "rolling"), "not a duration"),
        (one(window={"rolling": "24h", "bucket": "7h"}), ("budgets", 0, "window", "rolling", "bucket"), "divide"),
        (one(window={"rolling": "30d", "bucket": "1m"}), ("budgets", 0, "window", "rolling", "bucket"), "too many"),
        (one(window={"every": "day"}), ("budgets", 0, "window"), "calendar"),
        (one(window={"calendar": "year"}), ("budgets", 0, "window", "calendar", "calendar"), "'day', 'week' or 'month'"),
        (one(window={"calendar": "day", "timezone": "Mars/Olympus"}), ("budgets", 0, "window", "calendar", "timezone"), "unknown IANA"),
        (one(window={"calendar": "week", "week_start": "funday"}), ("budgets", 0, "window", "calendar", "week_start"), "monday"),
        (one(window={"calendar": "day", "rolling": "1h"}), ("budgets", 0, "window", "calendar", "rolling"), "Extra inputs"),
        (one(warn_at=[0.5, 1.5]), ("budgets", 0, "warn_at", 1), "less than or equal to 1"),
        (one(warn_at=[0]), ("budgets", 0, "warn_at", 0), "greater than 0"),
        (one(limit_usd=-5), ("budgets", 0, "limit_usd", "usd"), "greater than or equal to 0"),
        (one(limit_usd={"default": 1, "tiers": [{"where": {}, "limit_usd": 2}]}), ("budgets", 0, "limit_usd", "tiered", "tiers", 0, "where"), "at least 1"),
        (one(limit_usd={"tiers": []}), ("budgets", 0, "limit_usd", "tiered", "default"), "Field required"),
        (one(mode="dry-run"), ("budgets", 0, "mode"), "'enforce' or 'shadow'"),
        (one(on_store_error="retry"), ("budgets", 0, "on_store_error"), "fail_closed"),
        (one(name="has space"), ("budgets", 0, "name"), "letters"),
        (one(per=["user", "user"]), ("budgets", 0, "per"), "twice"),
    ],
)
def test_bad_policies_point_at_the_problem(budget: dict[str, Any], loc: tuple[Any, ...], needle: str) -> None:
    errs = errors(budget)
    assert any(e_loc == loc and needle in msg for e_loc, msg in errs), errs


def test_missing_required_fields_and_duplicate_names() -> None:
    errs = errors({"name": "x"})
    assert {loc for loc, _ in errs} == {("budgets", 0, "limit_usd"), ("budgets", 0, "window")}
    errs = errors(one(), one())
    assert errs[0][0] == ("budgets",) and "used twice" in errs[0][1]


def test_limit_precedence_override_then_tier_then_default() -> None:
    (b,) = load_budgets({"budgets": [one(limit_usd={
        "default": 500,
        "tiers": [{"where": {"groups": "senior-*"}, "limit_usd": 2000}, {"where": {"team": "ml"}, "limit_usd": 1000}],
        "overrides": [{"where": {"email": "alice@example.com"}, "limit_usd": 3000}],
    })]})
    usd = NANO_PER_USD
    assert limit_nusd(b, {"user": "x"}) == 500 * usd
    assert limit_nusd(b, {"groups": ["eng", "senior-engineers"], "team": "ml"}) == 2000 * usd  # first tier wins
    assert limit_nusd(b, {"groups": ["eng"], "team": "ml"}) == 1000 * usd
    assert limit_nusd(b, {"email": "alice@example.com", "groups": ["senior-engineers"]}) == 3000 * usd
    assert limit_nusd(b, {"email": "bob@example.com", "groups": []}) == 500 * usd


def test_matching_models_providers_and_attribute_globs() -> None:
    (b,) = load_budgets({"budgets": [one(match={"models": ["gpt-4o*"], "providers": "openai", "where": {"groups": ["eng-*", "ml"], "team": "a*"}})]})
    ok = {"model": "gpt-4o-mini", "provider": "openai", "groups": ["sales", "eng-infra"], "team": "alpha"}
    assert budget_matches(b, ok)
    assert not budget_matches(b, {**ok, "model": "claude-haiku"})
    assert not budget_matches(b, {**ok, "provider": "azure"})
    assert not budget_matches(b, {**ok, "groups": ["sales"]})  # no element matches
    assert not budget_matches(b, {k: v for k, v in ok.items() if k != "team"})  # missing attribute never matches
    assert not budget_matches(b, {**ok, "team": "Alpha"})  # case-sensitive
    (everything,) = load_budgets({"budgets": [one()]})
    assert budget_matches(everything, {"model": "x", "provider": "y"})


def test_per_values_and_keys() -> None:
    (b,) = load_budgets({"budgets": [one(per=["team", "user", "groups"])]})
    v = per_values(b, {"user": "a:b@x.com", "groups": ["z", "a"], "team": ""})
    assert v == {"team": "-", "user": "a:b@x.com", "groups": "a,z"}
    assert per_key(v) == "team=-,user=a%3Ab@x.com,groups=a%2Cz"
    assert per_key({}) == "_"
