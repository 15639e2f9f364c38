"""The price table and the cost of one request, in integer nano-USD.

Prices are USD per million tokens (as providers publish them). A token priced at p USD/M costs
p * 1000 nano-USD, so costs are computed exactly with Decimal and rounded up to a whole nano-USD
once per request: budgets in Redis stay integers and never drift.
"""

from __future__ import annotations

import fnmatch
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, timezone
from decimal import ROUND_CEILING, Decimal

from pydantic import BaseModel, ConfigDict, Field

NANO_PER_USD = 1_000_000_000
_NANO_PER_TOKEN_PER_USD_PER_M = Decimal(1000)  # 1 USD/M tokens = 1000 nano-USD per token


TOOL_KINDS = ("web_search", "web_fetch", "file_search", "code_interpreter", "image_generation")
"""Server-side tools a provider charges per call (besides the tokens their results add)."""


@dataclass(slots=True)
class Usage:
    """What one response billed, normalised across providers.

    `input_tokens` excludes cached reads and cache writes (OpenAI counts both inside
    `prompt_tokens` / `input_tokens`; the parsers subtract them), so each field is priced at its
    own rate. Cache writes come in two TTLs: the provider's short one (Anthropic 5 minutes,
    OpenAI 30 minutes or unspecified) in `cache_write_tokens`, its long one (Anthropic 1 hour,
    OpenAI 12 hours) in `cache_write_long_tokens`. `reasoning_tokens` are part of
    `output_tokens` (billed as output), kept apart for the record. `tool_calls` counts per-call
    priced server tools by kind (TOOL_KINDS). `other_models` holds usage billed at another
    model's rates inside the same response (Anthropic advisor iterations), as (model, Usage).
    """

    input_tokens: int = 0
    cached_input_tokens: int = 0
    cache_write_tokens: int = 0
    output_tokens: int = 0
    cache_write_long_tokens: int = 0
    reasoning_tokens: int = 0
    tool_calls: dict[str, int] = field(default_factory=dict)
    other_models: list[tuple[str, "Usage"]] = field(default_factory=list)

    @property
    def total_input_tokens(self) -> int:
        return self.input_tokens + self.cached_input_tokens + self.cache_write_tokens + self.cache_write_long_tokens

    def add(self, other: "Usage") -> None:
        """Add another usage billed at the same model's rates (e.g. an Anthropic compaction iteration)."""
        self.input_tokens += other.input_tokens
        self.cached_input_tokens += other.cached_input_tokens
        self.cache_write_tokens += other.cache_write_tokens
        self.cache_write_long_tokens += other.cache_write_long_tokens
        self.output_tokens += other.output_tokens
        self.reasoning_tokens += other.reasoning_tokens
        for k, n in other.tool_calls.items():
            self.tool_calls[k] = self.tool_calls.get(k, 0) + n
        self.other_models.extend(other.other_models)


class ModelPrice(BaseModel):
    """USD per million tokens for one model (or a glob of models)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    input: Decimal = Field(ge=0)
    output: Decimal = Field(ge=0)
    cached_input: Decimal | None = Field(default=None, ge=0, description="defaults to `input`")
    cache_write: Decimal | None = Field(default=None, ge=0, description="short-TTL cache writes; defaults to `input`")
    cache_write_long: Decimal | None = Field(
        default=None, ge=0, description="long-TTL cache writes (Anthropic 1 h, OpenAI 12 h); defaults to `cache_write`")
    max_output_tokens: int = Field(default=4096, gt=0, description="worst case when a request sets no cap")
    hidden_reasoning: bool = Field(
        default=False, description="bills reasoning tokens it never streams (OpenAI reasoning models): a stream "
                                   "cut before its usage is charged its output cap, not the deltas seen")
    long_context: "LongContextPrice | None" = Field(
        default=None, description="the rates of the whole request once its input passes a threshold")
    effective: date | None = Field(default=None, description="first day (UTC) these rates apply; none = always")
    until: date | None = Field(default=None, description="last day (UTC) they apply, e.g. an introductory price")
    checked: date | None = Field(default=None, description="when someone last checked them against the provider")

    def in_force(self, day: date) -> bool:
        return (self.effective is None or self.effective <= day) and (self.until is None or day <= self.until)

    def tier(self, input_tokens: int) -> "ModelPrice":
        """The rates that apply to a request with this many input tokens (all kinds together)."""
        lc = self.long_context
        return lc if lc is not None and input_tokens > lc.above_input_tokens else self

    @property
    def _cache_write(self) -> Decimal:
        return self.input if self.cache_write is None else self.cache_write

    @property
    def _cache_write_long(self) -> Decimal:
        return self._cache_write if self.cache_write_long is None else self.cache_write_long

    def cost_nusd(self, usage: Usage) -> int:
        """Exact token cost of `usage` at this model's rates, rounded up to a whole nano-USD
        (per-call tool fees and other models' usage are added by PriceTable.cost_nusd)."""
        return _nusd(self._usd_m(usage))

    def _usd_m(self, usage: Usage) -> Decimal:
        p = self.tier(usage.total_input_tokens)
        if p is not self:
            return p._usd_m(usage)
        return (
            usage.input_tokens * self.input
            + usage.cached_input_tokens * (self.input if self.cached_input is None else self.cached_input)
            + usage.cache_write_tokens * self._cache_write
            + usage.cache_write_long_tokens * self._cache_write_long
            + usage.output_tokens * self.output
        )

    def worst_case_nusd(self, input_tokens: int, output_tokens: int) -> int:
        """Upper bound: every input token at the dearest input rate of the tier this many input
        tokens fall in, every output token paid."""
        p = self.tier(input_tokens)
        dearest_in = max(p.input, p._cache_write, p._cache_write_long)
        return _nusd(input_tokens * dearest_in + output_tokens * p.output)


class LongContextPrice(ModelPrice):
    """Rates for requests whose input (cached and cache writes included) passes `above_input_tokens`
    (e.g. OpenAI over 272K, Gemini Pro and Claude Sonnet 4.x over 200K): they apply to the whole request."""

    above_input_tokens: int = Field(gt=0)


ModelPrice.model_rebuild()


def _nusd(usd_m: Decimal) -> int:
    return int((usd_m * _NANO_PER_TOKEN_PER_USD_PER_M).to_integral_value(ROUND_CEILING))


class PriceTable:
    """Model name -> price. Exact names win, then globs in file order, then the optional default."""

    def __init__(self, models: Mapping[str, "ModelPrice | Sequence[ModelPrice]"], default: ModelPrice | None = None,
                 tools: dict[str, Decimal] | None = None, clock: Callable[[], float] = time.time) -> None:
        """`models` maps a name or glob to its rates, or to a list of dated rates (`effective` /
        `until`): a request is priced at the rates in force on the day (UTC) it runs."""
        dated = {k: (list(v) if isinstance(v, (list, tuple)) else [v]) for k, v in models.items()}
        self._exact = {k: v for k, v in dated.items() if not _is_glob(k)}
        self._globs = [(k, v) for k, v in dated.items() if _is_glob(k)]
        self.default = default
        self.tools = dict(tools or {})  # USD per call, by tool kind
        self._clock = clock
        self._cache: dict[str, tuple[str | None, ModelPrice | None]] = {}
        self._cache_day: date | None = None

    def _tools_usd_m(self, calls: Mapping[str, int]) -> Decimal:
        """Per-call fees in the unit token costs are summed in (USD x 10^6 per million tokens)."""
        return sum((n * self.tools.get(kind, Decimal(0)) * 1_000_000 for kind, n in calls.items()), Decimal(0))

    def tool_fees_nusd(self, calls: Mapping[str, int]) -> int:
        """Per-call fees of server tool calls, rounded up."""
        return _nusd(self._tools_usd_m(calls))

    def cost_nusd(self, price: ModelPrice, usage: Usage) -> int:
        """What the provider bills for `usage`: its tokens at `price`, per-call tool fees from the
        table, and usage billed at other models' rates at theirs (an unpriced one at `price`'s:
        never $0). One rounding, up, at the end."""
        usd_m = price._usd_m(usage) + self._tools_usd_m(usage.tool_calls)
        for model, u in usage.other_models:
            usd_m += (self.lookup(model) or price)._usd_m(u)
        return _nusd(usd_m)

    def __contains__(self, model: str) -> bool:
        return self.lookup(model) is not None

    def names(self) -> list[str]:
        """Priced model names, exact ones only (for `/v1/models`)."""
        return list(self._exact)

    def lookup(self, model: str, at: date | None = None) -> ModelPrice | None:
        """The rates of `model` in force on `at` (default: today, UTC). A name whose rates are
        all out of force (not yet effective, or expired) has none that day: the next match is used."""
        return self._match(model, at)[1]

    def entry_name(self, model: str) -> str | None:
        """The table entry that prices `model` today: its own name, the glob that matched it, or
        "default". Metrics label by this, so client-chosen names a glob prices add no series."""
        return self._match(model, None)[0]

    def _match(self, model: str, at: date | None) -> tuple[str | None, ModelPrice | None]:
        if at is not None:
            return self._find(model, at)
        today = datetime.fromtimestamp(self._clock(), timezone.utc).date()
        if today != self._cache_day:
            self._cache, self._cache_day = {}, today
        try:
            return self._cache[model]
        except KeyError:
            pass
        found = self._find(model, today)
        if len(self._cache) < 10_000:
            self._cache[model] = found
        return found

    def _find(self, model: str, day: date) -> tuple[str | None, ModelPrice | None]:
        candidates = self._exact.get(model)
        entries = ([(model, candidates)] if candidates else []) + [
            (pat, v) for pat, v in self._globs if fnmatch.fnmatchcase(model, pat)]
        for name, rates in entries:
            price = next((p for p in rates if p.in_force(day)), None)
            if price is not None:
                return name, price
        return ("default", self.default) if self.default is not None else (None, None)

    def entries(self, at: date) -> list[tuple[str, ModelPrice]]:
        """Every name and glob with the rates in force on `at`, in table order (exact names first)."""
        out = []
        for name, rates in [*self._exact.items(), *self._globs]:
            price = next((p for p in rates if p.in_force(at)), None)
            if price is not None:
                out.append((name, price))
        return out

    def stale(self, today: date, max_age_days: int = 90) -> list[str]:
        """Names whose rates were last checked more than `max_age_days` ago (or never)."""
        out = []
        for name, rates in [*self._exact.items(), *self._globs]:
            checked = max((p.checked for p in rates if p.checked is not None), default=None)
            if checked is None or (today - checked).days > max_age_days:
                out.append(f"{name} (checked {checked or 'never'})")
        return out


def _is_glob(name: str) -> bool:
    return any(c in name for c in "*?[")


def nusd_to_usd(nusd: int) -> float:
    return nusd / NANO_PER_USD
