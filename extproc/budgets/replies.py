"""What a client is told about budgets: the 429 on a block, the 503 on a dead store, headers.

Kept apart from the engine (which decides) and the processor (which talks to Envoy).
"""

from __future__ import annotations

import functools
import math
from datetime import datetime, timezone
from typing import Any

from typing import TYPE_CHECKING

from ..errors import GatewayError
from .admission import Admission, BudgetStatus
from .money import nusd_to_usd

if TYPE_CHECKING:
    from ..providers import Api


def usd(nusd: int) -> str:
    """Dollars for headers and messages: up to 6 decimals, no trailing zeros, at least cents."""
    text = f"{nusd_to_usd(nusd):.6f}".rstrip("0")
    whole, _, frac = text.partition(".")
    return f"{whole}.{frac.ljust(2, '0')}"


@functools.lru_cache(maxsize=256)
def iso(epoch: float | None) -> str | None:
    """A reset time for headers and messages; cached, since nearly every request of a window
    carries the same one (its period's end)."""
    if epoch is None:
        return None
    return datetime.fromtimestamp(epoch, timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def budget_object(st: BudgetStatus) -> dict[str, Any]:
    return {
        "name": st.name,
        "counter": st.per or None,
        "window": st.window,
        "mode": st.mode,
        "limit_usd": nusd_to_usd(st.limit_nusd),
        "spent_usd": nusd_to_usd(st.spent_nusd),
        "reserved_usd": nusd_to_usd(st.reserved_nusd),
        "remaining_usd": nusd_to_usd(st.remaining_nusd),
        "resets_at": iso(st.resets_at),
        "retry_after_seconds": None if st.retry_after_seconds is None else math.ceil(st.retry_after_seconds),
    }


def status_headers(st: BudgetStatus) -> dict[str, str]:
    fixed, left = status_header_parts(st)
    return {**fixed, **left}


def status_header_parts(st: BudgetStatus) -> tuple[dict[str, str], dict[str, str]]:
    """The budget headers in two parts: the budget's own (name, limit), and what this request
    found (spent, remaining, and the reset: a rolling window's moves with every request)."""
    left = {"x-tollgate-budget-spent-usd": usd(st.spent_nusd), "x-tollgate-budget-remaining-usd": usd(st.remaining_nusd)}
    if st.resets_at is not None:
        left["x-tollgate-budget-resets-at"] = iso(st.resets_at) or ""
    return {"x-tollgate-budget-name": st.name, "x-tollgate-budget-limit-usd": _usd_cached(st.limit_nusd)}, left


_usd_cached = functools.lru_cache(maxsize=256)(usd)  # limits repeat; amounts spent do not


def blocked(adm: Admission, model: str, needed_nusd: int | None = None) -> GatewayError:
    st = adm.blocking
    if st is None:  # defensive: the engine always names the budget
        return GatewayError(429, f"A budget refused this request for `{model}`.", type="budget_exceeded",
                            code="budget_exceeded")
    who = ", ".join(f"{k}={v}" for k, v in st.per.items())
    retry = math.ceil(st.retry_after_seconds) if st.retry_after_seconds else None
    when = f" It resets at {iso(st.resets_at)}." if st.resets_at else ""
    if retry and not st.resets_at:
        when = f" Enough spend ages out in {retry} s."
    reserved = f" (plus ${usd(st.reserved_nusd)} held by requests in flight)" if st.reserved_nusd else ""
    tried = " No fallback model fits either." if adm.reason and "fallback" in adm.reason else ""
    needs = f"; this request could cost up to ${usd(needed_nusd)}" if needed_nusd else ""
    message = (f"Budget '{st.name}'{f' for {who}' if who else ''} cannot afford this request for `{model}`: "
               f"spent ${usd(st.spent_nusd)} of ${usd(st.limit_nusd)} ({st.window}){reserved}{needs}.{tried}{when}")
    headers = status_headers(st)
    if retry:
        headers["retry-after"] = str(retry)
    return GatewayError(429, message, type="budget_exceeded", code="budget_exceeded", headers=headers,
                        extra={"budget": budget_object(st)})


def rate_limited(adm: Admission, api: "Api") -> GatewayError:
    """The 429 of a rate limit, in the provider's own words: OpenAI's `rate_limit_exceeded` (type
    `requests` or `tokens`), Anthropic's `rate_limit_error`, with Retry-After and the provider's
    rate-limit headers (the exceeded limit's remaining is what is left before this request)."""
    st = adm.limited
    assert st is not None
    who = ", ".join(f"{k}={v}" for k, v in st.per.items())
    retry = max(1, math.ceil(st.retry_after_seconds or 1))
    message = (f"Rate limit '{st.name}'{f' for {who}' if who else ''} reached: {st.spent_nusd + st.reserved_nusd} "
               f"of {st.limit_nusd} {st.unit} used ({st.window}). Try again in {retry} s.")
    headers = {**api.rate_limit_headers([st]), "retry-after": str(retry), "x-tollgate-rate-limit-name": st.name}
    return GatewayError(429, message, type="rate_limit_error", openai_type=st.unit, code="rate_limit_exceeded",
                        headers=headers)


def store_unavailable() -> GatewayError:
    return GatewayError(503, "The budget store is unreachable, and this request's budgets fail closed. "
                        "Try again shortly.", type="budget_store_unavailable", code="budget_store_unavailable",
                        headers={"retry-after": "1"})
