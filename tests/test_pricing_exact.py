"""The hot path prices tokens in integers (extproc/pricing.py `_nusd_exact`, `worst_case_nusd`):
for every row of the shipped price table, each of its rate tiers, inference geos and long-context
rates, and usages of every kind of token, the integers give exactly the nano-USD the Decimal
arithmetic gives (rounded up once). A rate with more decimals than the integers keep is priced in
Decimal, and still exactly."""

from __future__ import annotations

import random
from decimal import Decimal
from pathlib import Path

from extproc.config import load_config
from extproc.pricing import ModelPrice, PriceTable, Usage, _nusd

REPO = Path(__file__).resolve().parent.parent


def _variants(p: ModelPrice) -> list[ModelPrice]:
    out = [p]
    out += [p.rates(t) for t in p.tiers]
    out += [p.rates(None, g) for g in p.inference_geo]
    out += [p.rates(t, g) for t in p.tiers for g in p.inference_geo]
    return out + [v.long_context for v in out if v.long_context is not None]


def _usages(rng: random.Random, n: int) -> list[Usage]:
    out = [Usage(), Usage(input_tokens=1), Usage(output_tokens=1), Usage(cached_input_tokens=3)]
    for _ in range(n):
        big = rng.random() < 0.3  # past the long-context thresholds (200K, 272K) too
        top = 400_000 if big else 5_000
        inp, out_ = rng.randrange(top), rng.randrange(top // 4)
        out.append(Usage(input_tokens=inp, cached_input_tokens=rng.randrange(top), output_tokens=out_,
                         cache_write_tokens=rng.choice([0, rng.randrange(top)]),
                         cache_write_long_tokens=rng.choice([0, rng.randrange(top)]),
                         audio_input_tokens=rng.choice([0, rng.randrange(inp + 1)]),
                         audio_output_tokens=rng.choice([0, rng.randrange(out_ + 1)])))
    return out


def _rows(prices: PriceTable) -> list[ModelPrice]:
    rows = [p for ps in prices._exact.values() for p in ps] + [p for _, ps in prices._globs for p in ps]
    return rows + ([prices.default] if prices.default is not None else [])


def test_integers_price_every_shipped_row_as_decimal_does() -> None:
    prices = load_config(REPO / "policies").prices
    rng = random.Random(14)
    usages = _usages(rng, 60)
    checked = 0
    for row in _rows(prices):
        for p in _variants(row):
            assert p._int_rates() is not None, p  # every shipped rate is exact at nine decimals
            for u in usages:
                assert p._nusd_exact(u) == _nusd(p.tier(u.total_input_tokens)._usd_m(u)), (p, u)
                checked += 1
            for inp, out in ((0, 0), (1, 1), (199_999, 64), (200_001, 64), (300_000, 128_000)):
                worst = p.tier(inp)
                d_in = max([worst.input, worst._cache_write, worst._cache_write_long,
                            *(r for r in (p.audio_input, p.image_input) if r is not None)])
                d_out = max([worst.output, *(r for r in (p.audio_output, p.image_output) if r is not None)])
                assert p.worst_case_nusd(inp, out) == _nusd(inp * d_in + out * d_out), (p, inp, out)
    assert checked > 5_000


def test_a_rate_finer_than_the_integers_is_priced_in_decimal() -> None:
    fine = ModelPrice(input=Decimal("0.1234567891"), output=Decimal("1.00000000001"))
    table = PriceTable({"fine": fine})
    assert fine._int_rates() is None
    u = Usage(input_tokens=1_000_003, output_tokens=7)
    assert table.cost_nusd(fine, u) == _nusd(fine._usd_m(u)) == fine.cost_nusd(u)
    assert fine.worst_case_nusd(1_000_003, 7) == _nusd(1_000_003 * fine.input + 7 * fine.output)
