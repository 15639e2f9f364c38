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
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_validator

NANO_PER_USD = 1_000_000_000
_NANO_PER_TOKEN_PER_USD_PER_M = Decimal(1000)  # 1 USD/M tokens = 1000 nano-USD per token
# Rates in USD per million tokens times this are whole numbers for any rate with up to nine
# decimals: a token count times them sums exactly in ints, and _EXACT_PER_NANO of them make one
# nano-USD. The hot path prices in these (Decimal arithmetic cost 2.5-2.8 us a call).
_EXACT = Decimal(10**9)
_EXACT_PER_NANO = 10**9 // 1000


TOOL_KINDS = ("web_search", "web_fetch", "file_search", "code_interpreter", "image_generation", "shell")
"""Server-side tools a provider charges per call (besides the tokens their results add); `code_interpreter`
and `shell` (hosted shell) are billed per container session."""

STANDARD_TIER = "standard"
"""The rate tier a row's own rates are: OpenAI `service_tier: default`, Anthropic `speed: standard`."""


@dataclass(slots=True)
class ImageGenUsage:
    """Image generation tokens of one response (OpenAI `Response.tool_usage.image_gen`), billed at
    the image model's own rates: text and image input, their cached reads, image and text output.
    Each field excludes the others (cached reads are taken out of the input they were part of)."""

    model: str
    text_input_tokens: int = 0
    image_input_tokens: int = 0
    cached_text_input_tokens: int = 0
    cached_image_input_tokens: int = 0
    image_output_tokens: int = 0
    text_output_tokens: int = 0

    @property
    def input_tokens(self) -> int:
        return (self.text_input_tokens + self.image_input_tokens + self.cached_text_input_tokens
                + self.cached_image_input_tokens)

    @property
    def output_tokens(self) -> int:
        return self.image_output_tokens + self.text_output_tokens


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
    model's rates inside the same response (Anthropic advisor iterations, the hops of a
    server-side fallback, SVG authoring), as (model, Usage).

    `audio_input_tokens` / `audio_output_tokens` are the audio part of `input_tokens` /
    `output_tokens`, priced at the row's audio rates instead of its text ones. `image_gen` is what
    an image generation tool billed at the image model's rates. `tier` is the rate tier the
    provider says it billed (OpenAI `service_tier`, Anthropic `speed`; STANDARD_TIER for the row's
    own rates) and `inference_geo` where it ran (Anthropic: `us` costs more on the models the
    table says); None means the response did not say, and the rates the request was admitted at
    apply. `fallback_credit` is Anthropic's `usage.fallback_credit.status.type`, for the record.
    """

    input_tokens: int = 0
    cached_input_tokens: int = 0
    cache_write_tokens: int = 0
    output_tokens: int = 0
    cache_write_long_tokens: int = 0
    reasoning_tokens: int = 0
    tool_calls: dict[str, int] = field(default_factory=dict)
    other_models: list[tuple[str, "Usage"]] = field(default_factory=list)
    audio_input_tokens: int = 0
    audio_output_tokens: int = 0
    image_gen: list[ImageGenUsage] = field(default_factory=list)
    tier: str | None = None
    inference_geo: str | None = None
    fallback_credit: str | None = None

    @property
    def total_input_tokens(self) -> int:
        return self.input_tokens + self.cached_input_tokens + self.cache_write_tokens + self.cache_write_long_tokens

    @property
    def image_gen_input_tokens(self) -> int:
        return sum(i.input_tokens for i in self.image_gen)

    @property
    def image_gen_output_tokens(self) -> int:
        return sum(i.output_tokens for i in self.image_gen)

    def add(self, other: "Usage") -> None:
        """Add another usage billed at the same model's rates (e.g. an Anthropic compaction iteration)."""
        self.input_tokens += other.input_tokens
        self.cached_input_tokens += other.cached_input_tokens
        self.cache_write_tokens += other.cache_write_tokens
        self.cache_write_long_tokens += other.cache_write_long_tokens
        self.output_tokens += other.output_tokens
        self.reasoning_tokens += other.reasoning_tokens
        self.audio_input_tokens += other.audio_input_tokens
        self.audio_output_tokens += other.audio_output_tokens
        for k, n in other.tool_calls.items():
            self.tool_calls[k] = self.tool_calls.get(k, 0) + n
        self.other_models.extend(other.other_models)
        self.image_gen.extend(other.image_gen)

    def take(self, other: "Usage") -> None:
        """Remove the tokens of `other` (billed elsewhere, e.g. at another model's rates), never below 0."""
        for f in ("input_tokens", "cached_input_tokens", "cache_write_tokens", "cache_write_long_tokens",
                  "output_tokens"):
            setattr(self, f, max(0, getattr(self, f) - getattr(other, f)))
        self.reasoning_tokens = min(self.reasoning_tokens, self.output_tokens)


_RATE_FIELDS = ("input", "output", "cached_input", "cache_write", "cache_write_long", "audio_input", "audio_output",
                "image_input", "cached_image_input", "image_output")


class TierPrice(BaseModel):
    """A model's rates in another rate tier (OpenAI `flex` / `priority`, Anthropic fast mode):
    they replace the row's own; a rate left out defaults as the row's header says, from these."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    input: Decimal = Field(ge=0)
    output: Decimal = Field(ge=0)
    cached_input: Decimal | None = Field(default=None, ge=0)
    cache_write: Decimal | None = Field(default=None, ge=0)
    cache_write_long: Decimal | None = Field(default=None, ge=0)
    long_context: "LongContextPrice | None" = Field(
        default=None, description="this tier past a prompt-size threshold; none = the row's own long_context")


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
    audio_input: Decimal | None = Field(default=None, ge=0, description="audio input tokens; defaults to `input`")
    audio_output: Decimal | None = Field(default=None, ge=0, description="audio output tokens; defaults to `output`")
    image_input: Decimal | None = Field(
        default=None, ge=0, description="image models: image input tokens (`input` is text); defaults to `input`")
    cached_image_input: Decimal | None = Field(
        default=None, ge=0, description="image models: cached image input; defaults to `cached_input`")
    image_output: Decimal | None = Field(
        default=None, ge=0, description="image models: image output tokens (`output` is text); defaults to `output`")
    tiers: dict[str, TierPrice] = Field(
        default_factory=dict, description="rate tier name (OpenAI service_tier `flex` / `priority`, Anthropic speed "
                                          "`fast`) -> its rates, which replace the row's own")
    inference_geo: dict[str, Decimal] = Field(
        default_factory=dict, description="where inference runs (Anthropic `us`) -> multiplier on every rate")
    effective: date | None = Field(default=None, description="first day (UTC) these rates apply; none = always")
    until: date | None = Field(default=None, description="last day (UTC) they apply, e.g. an introductory price")
    checked: date | None = Field(default=None, description="when someone last checked them against the provider")

    @field_validator("tiers")
    @classmethod
    def _tier_names(cls, v: dict[str, TierPrice]) -> dict[str, TierPrice]:
        if STANDARD_TIER in v or "default" in v:
            raise ValueError(f"`{STANDARD_TIER}` / `default` are the row's own rates, not a tier")
        return v

    @field_validator("inference_geo")
    @classmethod
    def _multipliers(cls, v: dict[str, Decimal]) -> dict[str, Decimal]:
        if any(m <= 0 for m in v.values()):
            raise ValueError("an inference_geo multiplier must be positive")
        return v

    _variants: dict[tuple[str | None, str | None], "ModelPrice"] = PrivateAttr(default_factory=dict)
    _base: "ModelPrice | None" = PrivateAttr(default=None)
    _tier: str | None = PrivateAttr(default=None)
    _geo: str | None = PrivateAttr(default=None)
    _priced: bool = PrivateAttr(default=True)
    # worst_case_nusd's rates, once worked out: (input, output), then both times `_EXACT` as ints if exact
    _dearest: tuple[Any, ...] | None = PrivateAttr(default=None)
    # `_int_rates`, once worked out: False when one of them is not a whole number at `_EXACT`.
    _ints: tuple[int, ...] | bool | None = PrivateAttr(default=None)

    def rates(self, tier: str | None = None, geo: str | None = None) -> "ModelPrice":
        """These rates in rate tier `tier` (None: the one these already are, the row's own for a
        row) for inference in `geo` (None: likewise). A tier the row does not price, and a geo
        it names no multiplier for, leave its own rates (`priced` says whether the tier was found).

        Called for every candidate model of every request: the private attributes are read from
        pydantic's private dict directly (through attribute access each read went through
        BaseModel.__getattr__, about 10 a request)."""
        priv = self.__pydantic_private__
        assert priv is not None
        base = priv["_base"] or self
        tier = priv["_tier"] if tier is None else tier
        geo = priv["_geo"] if geo is None else geo
        if tier == STANDARD_TIER:
            tier = None
        if tier is None and geo is None:
            return base
        key = (tier, geo)
        found = base.__pydantic_private__["_variants"].get(key)
        if found is not None:
            return found
        update: dict[str, object] = {"tiers": {}, "inference_geo": {}}
        t = base.tiers.get(tier) if tier is not None else None
        if t is not None:
            update.update({f: getattr(t, f) for f in ("input", "output", "cached_input", "cache_write",
                                                      "cache_write_long")})
            if t.long_context is not None:
                update["long_context"] = t.long_context
        mult = base.inference_geo.get(geo) if geo is not None else None
        p = base.model_copy(update=update)
        if mult is not None:
            p = p._scaled(mult)
        p._base, p._tier, p._geo, p._priced = base, tier, geo, tier is None or t is not None
        if len(base._variants) < 64:
            base._variants[key] = p
        return p

    @property
    def tier_name(self) -> str | None:
        """The rate tier these rates are (None: the row's own)."""
        return self.__pydantic_private__["_tier"]  # type: ignore[index]

    @property
    def tier_priced(self) -> bool:
        """False when these are a tier the row has no rates for (its own rates stand in)."""
        return self.__pydantic_private__["_priced"]  # type: ignore[index]

    def _scaled(self, m: Decimal) -> "ModelPrice":
        """Every rate times `m` (long-context ones too): a data-residency multiplier."""
        update: dict[str, object] = {f: getattr(self, f) * m for f in _RATE_FIELDS if getattr(self, f) is not None}
        if self.long_context is not None:
            update["long_context"] = self.long_context._scaled(m)
        return self.model_copy(update=update)

    def unpriced_scaled(self, m: Decimal) -> "ModelPrice":
        """A stand-in for a rate tier the table has no rates for: these rates times `m` (the
        policy's stated allowance), for the worst case only."""
        p = self._scaled(m)
        p._base, p._tier, p._geo, p._priced = self._base or self, self._tier, self._geo, False
        return p

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

    @property
    def _cached_input(self) -> Decimal:
        return self.input if self.cached_input is None else self.cached_input

    def cost_nusd(self, usage: Usage) -> int:
        """Exact token cost of `usage` at this model's rates (in the tier and geo it says it was
        billed at), rounded up to a whole nano-USD (per-call tool fees, image generation and other
        models' usage are added by PriceTable.cost_nusd)."""
        return self.rates(usage.tier, usage.inference_geo)._token_nusd(usage)

    def _token_nusd(self, usage: Usage) -> int:
        """`usage`'s tokens at these rates, rounded up: in integers when the rates are exact at
        `_EXACT` (PriceTable.cost_nusd 2.8 -> 1.3 us warm), else in Decimal
        (tests/test_pricing_exact.py checks both agree on every shipped row)."""
        n = self._nusd_exact(usage)
        return n if n is not None else _nusd(self._usd_m(usage))

    def _int_rates(self) -> tuple[int, ...] | None:
        """input, audio input, cached input, cache write, long cache write, output, audio output
        (the rates `_usd_m` uses) times `_EXACT`, as ints; None when one of them has more decimals
        than that scale keeps (then the Decimal path prices it)."""
        ints = self.__pydantic_private__["_ints"]  # type: ignore[index]
        if ints is None:
            rates = (self.input, self.input if self.audio_input is None else self.audio_input, self._cached_input,
                     self._cache_write, self._cache_write_long, self.output,
                     self.output if self.audio_output is None else self.audio_output)
            exact = [_exact_int(r) for r in rates]
            ints = tuple(exact) if None not in exact else False  # type: ignore[arg-type]
            self._ints = ints
        return ints or None

    def _nusd_exact(self, usage: Usage) -> int | None:
        """`_nusd(self._usd_m(usage))` in integers; None when the rates are not exact at `_EXACT`."""
        p = self.tier(usage.total_input_tokens)
        r = p._int_rates()
        if r is None:
            return None
        audio_in = min(usage.audio_input_tokens, usage.input_tokens)
        audio_out = min(usage.audio_output_tokens, usage.output_tokens)
        total = ((usage.input_tokens - audio_in) * r[0] + audio_in * r[1] + usage.cached_input_tokens * r[2]
                 + usage.cache_write_tokens * r[3] + usage.cache_write_long_tokens * r[4]
                 + (usage.output_tokens - audio_out) * r[5] + audio_out * r[6])
        return -(-total // _EXACT_PER_NANO)  # rounded up, as _nusd

    def _usd_m(self, usage: Usage) -> Decimal:
        p = self.tier(usage.total_input_tokens)
        if p is not self:
            return p._usd_m(usage)
        audio_in = min(usage.audio_input_tokens, usage.input_tokens)
        audio_out = min(usage.audio_output_tokens, usage.output_tokens)
        return (
            (usage.input_tokens - audio_in) * self.input
            + audio_in * (self.input if self.audio_input is None else self.audio_input)
            + usage.cached_input_tokens * self._cached_input
            + usage.cache_write_tokens * self._cache_write
            + usage.cache_write_long_tokens * self._cache_write_long
            + (usage.output_tokens - audio_out) * self.output
            + audio_out * (self.output if self.audio_output is None else self.audio_output)
        )

    def _image_usd_m(self, ig: ImageGenUsage) -> Decimal:
        """An image generation tool's tokens at this (image) model's rates: `input` / `cached_input`
        are its text rates, `image_input` / `cached_image_input` / `image_output` its image ones."""
        image_in = self.input if self.image_input is None else self.image_input
        cached_image = self._cached_input if self.cached_image_input is None else self.cached_image_input
        return (ig.text_input_tokens * self.input + ig.cached_text_input_tokens * self._cached_input
                + ig.image_input_tokens * image_in + ig.cached_image_input_tokens * cached_image
                + ig.image_output_tokens * (self.output if self.image_output is None else self.image_output)
                + ig.text_output_tokens * self.output)

    def worst_case_nusd(self, input_tokens: int, output_tokens: int) -> int:
        """Upper bound: every input token at the dearest input rate of the tier this many input
        tokens fall in (cache writes, audio and image input included), every output token at the
        dearest output rate (audio or image output where the row has one)."""
        p = self.tier(input_tokens)
        dearest = self.__pydantic_private__["_dearest"] if p is self else None  # type: ignore[index]
        if dearest is None:
            dearest = (max([p.input, p._cache_write, p._cache_write_long,
                            *(r for r in (self.audio_input, self.image_input) if r is not None)]),
                       max([p.output, *(r for r in (self.audio_output, self.image_output) if r is not None)]))
            exact = (_exact_int(dearest[0]), _exact_int(dearest[1]))
            if None not in exact:
                dearest += exact
            if p is self:
                self._dearest = dearest
        if len(dearest) == 4:  # both exact as integers: the same rounding up, in ints
            return -(-(input_tokens * dearest[2] + output_tokens * dearest[3]) // _EXACT_PER_NANO)
        return _nusd(input_tokens * dearest[0] + output_tokens * dearest[1])


class LongContextPrice(ModelPrice):
    """Rates for requests whose input (cached and cache writes included) passes `above_input_tokens`
    (e.g. OpenAI over 272K, Gemini Pro and Claude Sonnet 4.x over 200K): they apply to the whole request."""

    above_input_tokens: int = Field(gt=0)

    @model_validator(mode="after")
    def _plain(self) -> "LongContextPrice":
        if self.tiers or self.inference_geo:
            raise ValueError("a long_context tier takes rates only: put `tiers` / `inference_geo` on the row "
                             "(a rate tier may have its own long_context)")
        return self


TierPrice.model_rebuild()
ModelPrice.model_rebuild()


_ZERO = Decimal(0)


def _exact_int(rate: Decimal) -> int | None:
    """`rate` times `_EXACT` as an int, None when that is not a whole number."""
    scaled = rate * _EXACT
    return int(scaled) if scaled == scaled.to_integral_value() else None


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
        self._cache_from, self._cache_until = 0.0, 0.0  # the cache's UTC day, as epoch seconds

    def _tools_usd_m(self, calls: Mapping[str, int]) -> Decimal:
        """Per-call fees in the unit token costs are summed in (USD x 10^6 per million tokens)."""
        if not calls:
            return _ZERO
        return sum((n * self.tools.get(kind, Decimal(0)) * 1_000_000 for kind, n in calls.items()), Decimal(0))

    def tool_fees_nusd(self, calls: Mapping[str, int]) -> int:
        """Per-call fees of server tool calls, rounded up."""
        return _nusd(self._tools_usd_m(calls))

    def cost_nusd(self, price: ModelPrice, usage: Usage) -> int:
        """What the provider bills for `usage`: its tokens at `price` in the rate tier and geo the
        usage says (else those `price` already is), per-call tool fees from the table, image
        generation at the image model's rates, and usage billed at other models' rates at theirs
        (an unpriced one at `price`'s: never $0; in the same geo, and in the same tier where that
        model has it). One rounding, up, at the end."""
        p = price.rates(usage.tier, usage.inference_geo)
        if not (usage.tool_calls or usage.other_models or usage.image_gen):  # tokens only (in integers, mostly)
            return p._token_nusd(usage)
        usd_m = p._usd_m(usage) + self._tools_usd_m(usage.tool_calls)
        for model, u in usage.other_models:
            usd_m += self._other(model, p, u)._usd_m(u)
        for ig in usage.image_gen:
            usd_m += (self.lookup(ig.model) or p).rates(STANDARD_TIER)._image_usd_m(ig)
        return _nusd(usd_m)

    def _other(self, model: str, main: ModelPrice, u: Usage) -> ModelPrice:
        other = self.lookup(model)
        if other is None:
            return main
        tier = u.tier if u.tier is not None else (main.tier_name if main.tier_name in other.tiers else STANDARD_TIER)
        return other.rates(tier, u.inference_geo if u.inference_geo is not None else main._geo)

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
        now = self._clock()
        if not self._cache_from <= now < self._cache_until:  # a new UTC day (several lookups a request)
            today = datetime.fromtimestamp(now, timezone.utc).date()
            if today != self._cache_day:
                self._cache, self._cache_day = {}, today
            self._cache_from = datetime(today.year, today.month, today.day, tzinfo=timezone.utc).timestamp()
            self._cache_until = self._cache_from + 86400
        today = self._cache_day
        assert today is not None
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
