"""Pricing: exact integer nano-USD, globs, defaults."""

from decimal import Decimal

from extproc.pricing import ModelPrice, PriceTable, Usage


def test_cost_is_exact_and_rounds_up():
    p = ModelPrice(input=Decimal("2.50"), cached_input=Decimal("1.25"), output=Decimal("10"))
    # 1000 in * 2.5 + 1000 cached * 1.25 + 10 out * 10 = 3850 USD/M-tokens units -> 3_850_000 nUSD
    assert p.cost_nusd(Usage(input_tokens=1000, cached_input_tokens=1000, output_tokens=10)) == 3_850_000
    cheap = ModelPrice(input=Decimal("0.0375"), output=Decimal("0"))
    assert cheap.cost_nusd(Usage(input_tokens=1)) == 38  # 37.5 nUSD rounds up


def test_cache_write_and_defaults():
    p = ModelPrice(input=Decimal("3"), output=Decimal("15"), cached_input=Decimal("0.3"), cache_write=Decimal("3.75"))
    assert p.cost_nusd(Usage(cache_write_tokens=1000)) == 3_750_000
    q = ModelPrice(input=Decimal("1"), output=Decimal("2"))
    assert q.cost_nusd(Usage(cached_input_tokens=1000, cache_write_tokens=1000)) == 2_000_000


def test_worst_case_uses_dearest_input_rate():
    p = ModelPrice(input=Decimal("3"), output=Decimal("15"), cache_write=Decimal("3.75"))
    assert p.worst_case_nusd(1000, 100) == 3_750_000 + 1_500_000
    assert p.worst_case_nusd(1000, 100) >= p.cost_nusd(Usage(input_tokens=1000, output_tokens=100))


def test_lookup_exact_then_glob_then_default():
    a, b, c, d = (ModelPrice(input=Decimal(i), output=Decimal(0)) for i in (1, 2, 3, 4))
    t = PriceTable({"claude-x-1": a, "claude-x-*": b, "claude-*": c})
    assert t.lookup("claude-x-1") is a
    assert t.lookup("claude-x-2025") is b
    assert t.lookup("claude-y") is c
    assert t.lookup("gpt") is None
    assert PriceTable({}, default=d).lookup("anything") is d
    assert t.names() == ["claude-x-1"]
    assert [t.entry_name(m) for m in ("claude-x-1", "claude-x-2025", "claude-y", "gpt")] == [
        "claude-x-1", "claude-x-*", "claude-*", None]
    assert PriceTable({}, default=d).entry_name("anything") == "default"


def test_dated_rates_price_a_request_at_those_in_force_that_day() -> None:
    from datetime import date, datetime, timezone

    intro = ModelPrice(input=Decimal("0.75"), output=Decimal("3.75"), until=date(2026, 12, 31), checked=date(2026, 10, 7))
    later = ModelPrice(input=Decimal("1.5"), output=Decimal("7.5"), effective=date(2027, 1, 1))
    glob = ModelPrice(input=Decimal(9), output=Decimal(9))
    now = [datetime(2026, 12, 31, 23, 59, tzinfo=timezone.utc).timestamp()]
    t = PriceTable({"m": [intro, later], "m*": glob, "new": ModelPrice(input=Decimal(1), output=Decimal(1),
                                                                      effective=date(2027, 1, 1))},
                   clock=lambda: now[0])
    assert t.lookup("m") is intro
    now[0] += 120  # past midnight UTC: the cached answer is not reused across days
    assert t.lookup("m") is later
    assert t.lookup("m", at=date(2026, 6, 1)) is intro
    assert t.lookup("new", at=date(2026, 12, 1)) is None  # not yet effective: no price, the request is refused
    assert [n for n, _ in t.entries(date(2026, 12, 1))] == ["m", "m*"]
    assert t.stale(date(2027, 1, 10), 90) == ["m (checked 2026-10-07)", "new (checked never)", "m* (checked never)"]


def test_overlapping_dated_rates_are_a_policy_error(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import shutil

    import pytest

    from extproc.config import load_config
    from extproc.policy_yaml import PolicyError

    for f in ("providers.yaml", "gateway.yaml"):
        shutil.copy(f"policies/{f}", tmp_path / f)
    (tmp_path / "prices.yaml").write_text(
        "prices:\n  models:\n    gpt-4o:\n"
        "      - {input: 1, output: 1, until: 2026-12-31}\n"
        "      - {input: 2, output: 2, effective: 2026-12-15}\n")
    with pytest.raises(PolicyError) as e:
        load_config(tmp_path)
    assert "overlap" in str(e.value.problems) and "prices.yaml:" in str(e.value.problems)
