"""Money as integer nano-USD, so counters add up exactly in Redis and in Lua (doubles are exact to ~$9M)."""

from __future__ import annotations

from decimal import ROUND_HALF_EVEN, Decimal

NANO_PER_USD = 1_000_000_000


def usd_to_nusd(x: float | int | str | Decimal) -> int:
    """Dollars to nano-USD, via Decimal so that 0.1 becomes exactly 100_000_000 (not 100_000_000.00000001)."""
    return int((Decimal(str(x)) * NANO_PER_USD).to_integral_value(rounding=ROUND_HALF_EVEN))


def usd_exact(nusd: int) -> str:
    """Exact decimal dollars from nano-USD, for reports and the admin API: 210000 -> "0.00021",
    0 -> "0" (no float on the way)."""
    return format((Decimal(int(nusd)) / Decimal(NANO_PER_USD)).normalize(), "f")


def nusd_to_usd(n: int) -> float:
    """Nano-USD to dollars, for display and headers only (never for accounting)."""
    return n / NANO_PER_USD
