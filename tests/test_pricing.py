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
