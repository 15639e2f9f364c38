"""The price table and the cost of one request, in integer nano-USD.

Prices are USD per million tokens (as providers publish them). A token priced at p USD/M costs
p * 1000 nano-USD, so costs are computed exactly with Decimal and rounded up to a whole nano-USD
once per request: budgets in Redis stay integers and never drift.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from decimal import ROUND_CEILING, Decimal

from pydantic import BaseModel, ConfigDict, Field

NANO_PER_USD = 1_000_000_000
_NANO_PER_TOKEN_PER_USD_PER_M = Decimal(1000)  # 1 USD/M tokens = 1000 nano-USD per token


@dataclass(slots=True)
class Usage:
    """Tokens of one response, normalised across providers.

    `input_tokens` excludes cached reads and cache writes (OpenAI counts cached tokens inside
    `prompt_tokens`; the parsers subtract them), so each field is priced at its own rate.
    """

    input_tokens: int = 0
    cached_input_tokens: int = 0
    cache_write_tokens: int = 0
    output_tokens: int = 0

    @property
    def total_input_tokens(self) -> int:
        return self.input_tokens + self.cached_input_tokens + self.cache_write_tokens


class ModelPrice(BaseModel):
    """USD per million tokens for one model (or a glob of models)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    input: Decimal = Field(ge=0)
    output: Decimal = Field(ge=0)
    cached_input: Decimal | None = Field(default=None, ge=0, description="defaults to `input`")
    cache_write: Decimal | None = Field(default=None, ge=0, description="defaults to `input`")
    max_output_tokens: int = Field(default=4096, gt=0, description="worst case when a request sets no cap")

    def cost_nusd(self, usage: Usage) -> int:
        """Exact cost of `usage`, rounded up to a whole nano-USD."""
        usd_m = (
            usage.input_tokens * self.input
            + usage.cached_input_tokens * (self.input if self.cached_input is None else self.cached_input)
            + usage.cache_write_tokens * (self.input if self.cache_write is None else self.cache_write)
            + usage.output_tokens * self.output
        )
        return int((usd_m * _NANO_PER_TOKEN_PER_USD_PER_M).to_integral_value(ROUND_CEILING))

    def worst_case_nusd(self, input_tokens: int, output_tokens: int) -> int:
        """Upper bound: every input token at the dearest input rate, every output token paid."""
        dearest_in = max(self.input, self.cache_write or 0)
        usd_m = input_tokens * dearest_in + output_tokens * self.output
        return int((usd_m * _NANO_PER_TOKEN_PER_USD_PER_M).to_integral_value(ROUND_CEILING))


class PriceTable:
    """Model name -> price. Exact names win, then globs in file order, then the optional default."""

    def __init__(self, models: dict[str, ModelPrice], default: ModelPrice | None = None) -> None:
        self._exact = {k: v for k, v in models.items() if not _is_glob(k)}
        self._globs = [(k, v) for k, v in models.items() if _is_glob(k)]
        self.default = default
        self._cache: dict[str, ModelPrice | None] = {}

    def __contains__(self, model: str) -> bool:
        return self.lookup(model) is not None

    def names(self) -> list[str]:
        """Priced model names, exact ones only (for `/v1/models`)."""
        return list(self._exact)

    def lookup(self, model: str) -> ModelPrice | None:
        try:
            return self._cache[model]
        except KeyError:
            pass
        price = self._exact.get(model)
        if price is None:
            price = next((p for pat, p in self._globs if fnmatch.fnmatchcase(model, pat)), self.default)
        if len(self._cache) < 10_000:
            self._cache[model] = price
        return price


def _is_glob(name: str) -> bool:
    return any(c in name for c in "*?[")


def nusd_to_usd(nusd: int) -> float:
    return nusd / NANO_PER_USD
