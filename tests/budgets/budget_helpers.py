"""Test helpers for the budget engine: prices, a fake clock, policy shorthands (imported by conftest and tests)."""

from __future__ import annotations

from datetime import datetime
from zoneinfo import ZoneInfo

from extproc.budgets import Admission, Budget, BudgetEngine, load_budgets

# Prices in nano-USD per token (gpt-4o-like: $2.50 / $10 per million; mini: $0.15 / $0.60).
PRICES: dict[str, tuple[int, int]] = {
    "gpt-4o": (2_500, 10_000),
    "gpt-4o-mini": (150, 600),
    "claude-sonnet": (3_000, 15_000),
    "claude-haiku": (800, 4_000),
}
PROVIDERS = {"gpt-4o": "openai", "gpt-4o-mini": "openai", "claude-sonnet": "anthropic", "claude-haiku": "anthropic"}


def cost_fn(model: str, input_tokens: int, output_tokens: int) -> int | None:
    """Worst-case cost in nano-USD; None for models without a price."""
    if model not in PRICES:
        return None
    pin, pout = PRICES[model]
    return input_tokens * pin + output_tokens * pout


def provider_of(model: str) -> str | None:
    return PROVIDERS.get(model)


class FakeClock:
    """A settable clock for the engine (epoch seconds)."""

    def __init__(self, t: float = 1_780_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def set(self, iso: str, tz: str = "UTC") -> float:
        self.t = datetime.fromisoformat(iso).replace(tzinfo=ZoneInfo(tz)).timestamp()
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


def budgets(*items: dict) -> list[Budget]:
    return load_budgets({"budgets": list(items)})


async def admit(engine: BudgetEngine, rid: str, *, user: str = "alice", model: str = "gpt-4o",
                input_tokens: int = 0, max_output_tokens: int = 1000, lease_seconds: float = 60,
                min_output_tokens: int = 16, **attrs: str | list[str]) -> Admission:
    """admit() with test defaults; `attrs` adds identity attributes."""
    return await engine.admit(
        request_id=rid,
        attrs={"user": user, **attrs},
        model=model,
        provider=PROVIDERS.get(model, "unknown"),
        input_tokens=input_tokens,
        max_output_tokens=max_output_tokens,
        min_output_tokens=min_output_tokens,
        cost_fn=cost_fn,
        provider_of=provider_of,
        lease_seconds=lease_seconds,
    )


def ts(iso: str, tz: str = "UTC") -> float:
    """Epoch seconds of a local wall time in `tz`."""
    return datetime.fromisoformat(iso).replace(tzinfo=ZoneInfo(tz)).timestamp()
