"""What is worth telling someone about a budget counter: pure functions of numbers and `now`.

Nothing here reads Redis or the clock. The monitor (alerts/monitor.py) reads a counter, its
hourly history and its forecast, and asks these functions which events hold; deduplication and
delivery happen elsewhere. Amounts are integer nano-USD throughout; dollars appear only in the
payload's strings (budgets/money.py).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from decimal import ROUND_HALF_EVEN, Decimal
from typing import TYPE_CHECKING, Any

from ..budgets.match import parse_per_key
from ..budgets.money import usd_exact, usd_to_nusd
from ..budgets.windows import Rolling
from .policy import EventKind, SpikeSpec

if TYPE_CHECKING:
    from ..budgets.admission import BudgetStatus
    from ..forecast import Forecast

DEDUP_GRACE_SECONDS = 86400
"""A calendar counter's claims outlive its period by this much (gateways with skewed clocks may
still evaluate the period just ended); the period id is in the claim's key anyway."""


@dataclass(frozen=True)
class Counter:
    """One budget counter at one moment, as the evaluator sees it."""

    key: str  # the counter's Redis key, prefix included: {prefix}b:{budget}:{period}:{per}
    budget: str
    period: str  # calendar period id (2026-11-28, W2026-11-23, 2026-11) or rolling marker (r3600s60)
    per: Mapping[str, str]
    spent_nusd: int
    reserved_nusd: int
    limit_nusd: int
    window: str  # described, e.g. "calendar day (UTC)"
    period_end: float | None = None  # calendar: when it resets (epoch seconds); rolling: None
    window_seconds: int = 0  # rolling: the window's length

    @classmethod
    def parse(cls, key: str, prefix: str, *, spent_nusd: int, reserved_nusd: int, limit_nusd: int, window: str,
              period_end: float | None) -> "Counter":
        """A counter from its key (budget names hold no ':'; see budgets/store.py for the layout)."""
        budget, period, per = key[len(prefix) + 2:].split(":", 2)
        rolling = Rolling.from_key_part(period)
        return cls(key=key, budget=budget, period=period, per=parse_per_key(per), spent_nusd=spent_nusd,
                   reserved_nusd=reserved_nusd, limit_nusd=limit_nusd, window=window,
                   period_end=None if rolling else period_end,
                   window_seconds=rolling.window_seconds if rolling else 0)

    @classmethod
    def from_status(cls, st: "BudgetStatus", prefix: str) -> "Counter":
        """The counter a blocked or downgraded request's admission reported (its numbers as the
        reserve script saw them, without the refused request)."""
        return cls.parse(st.key, prefix, spent_nusd=st.spent_nusd, reserved_nusd=st.reserved_nusd,
                         limit_nusd=st.limit_nusd, window=st.window, period_end=st.resets_at)

    @property
    def rolling(self) -> bool:
        return self.period_end is None

    @property
    def scope(self) -> str:
        """`team=ml`, `user=a,model=gpt-4o`, or `(shared)`: how `tollgate budgets` names it."""
        return ",".join(f"{k}={v}" for k, v in self.per.items()) or "(shared)"

    @property
    def period_label(self) -> str:
        return f"rolling {self.window_seconds}s" if self.rolling else self.period

    def claim_ttl(self, now: float) -> int:
        """How long an event of this counter stays sent: to the end of its calendar period, or
        one window length for a rolling one (after which the same event may be sent again)."""
        if self.period_end is None:
            return max(1, self.window_seconds)
        return max(1, math.ceil(self.period_end - now)) + DEDUP_GRACE_SECONDS


@dataclass(frozen=True)
class Event:
    """One thing that happened to one counter. `variant` tells apart events of one kind that are
    each sent once (the threshold crossed: "0.8")."""

    kind: EventKind
    counter: Counter
    at: float
    text: str
    detail: Mapping[str, Any] = field(default_factory=dict)
    variant: str = ""

    @property
    def name(self) -> str:
        """The event as deduplicated: `exhausted`, `threshold@0.8`."""
        return f"{self.kind}@{self.variant}" if self.variant else self.kind


# ---- the events ------------------------------------------------------------------------------

def thresholds_reached(c: Counter, warn_at: list[float]) -> list[float]:
    """The `warn_at` fractions settled spend has reached, highest first (exact: no float ratio)."""
    if c.limit_nusd <= 0:
        return sorted(warn_at, reverse=True) if c.spent_nusd > 0 else []
    return sorted((w for w in warn_at if c.spent_nusd >= Decimal(str(w)) * c.limit_nusd), reverse=True)


def threshold(c: Counter, level: float, now: float) -> Event:
    return Event("threshold", c, now, variant=f"{level:g}", detail={"threshold": level}, text=(
        f"{_who(c)} has spent {_usd(c.spent_nusd)} of {_usd(c.limit_nusd)} ({_pct(c)}), past its "
        f"{level * 100:g}% warning; {_resets(c)}."))


def exhausted(c: Counter, now: float, request: Mapping[str, Any]) -> Event:
    model = request.get("model_requested")
    return Event("exhausted", c, now, detail={"request": _request(request)}, text=(
        f"{_who(c)} is exhausted: a request{f' for {model}' if model else ''} was refused (429); spent "
        f"{_usd(c.spent_nusd)} + reserved {_usd(c.reserved_nusd)} of {_usd(c.limit_nusd)}; {_resets(c)}."))


def downgrade(c: Counter, now: float, request: Mapping[str, Any]) -> Event:
    asked, served = request.get("model_requested"), request.get("model_served")
    return Event("downgrade", c, now, detail={"request": _request(request), "model_requested": asked,
                                              "model_served": served}, text=(
        f"{_who(c)} can no longer afford {asked}: requests are being downgraded to {served}; spent "
        f"{_usd(c.spent_nusd)} + reserved {_usd(c.reserved_nusd)} of {_usd(c.limit_nusd)}; {_resets(c)}."))


def forecast(c: Counter, fc: "Forecast", sentence: str, now: float) -> Event | None:
    """Projected to run out before the period ends (and not run out yet: that is `exhausted`).
    `sentence` is forecast.py's own wording, so the alert reads like the dashboard."""
    if fc.exhausts_on is None or c.spent_nusd >= c.limit_nusd or c.rolling:
        return None
    return Event("forecast", c, now, detail={
        "exhausts_on": fc.exhausts_on.isoformat(), "projected_usd": usd_exact(fc.projected_nusd),
        "projected_nusd": fc.projected_nusd, "low_usd": usd_exact(fc.low_nusd), "high_usd": usd_exact(fc.high_nusd),
        "rate_usd_per_day": usd_exact(fc.rate_nusd_per_day), "method": fc.method,
    }, text=(f"{_who(c)} is forecast to run out: {sentence} (about {_usd(fc.rate_nusd_per_day)} a day; spent "
             f"{_usd(c.spent_nusd)} of {_usd(c.limit_nusd)}, projected {_usd(fc.projected_nusd)} by the period's "
             f"end); {_resets(c)}."))


def usual_hourly(hourly: Mapping[int, int], *, since_hour: int | None, hour: int, baseline_hours: int) -> int | None:
    """The counter's mean spend per hour over the `baseline_hours` before `hour` (hours with no
    spend count as 0), from when its history began if that is later; None with no full hour of
    history yet. `hourly` maps epoch hours (epoch seconds // 3600) to nano-USD."""
    if since_hour is None:
        return None
    first = max(since_hour, hour - baseline_hours)
    if first >= hour:
        return None
    return sum(hourly.get(h, 0) for h in range(first, hour)) // (hour - first)


def spike(c: Counter, spec: SpikeSpec, hourly: Mapping[int, int], *, since_hour: int | None,
          now: float) -> Event | None:
    """This UTC hour's spend so far is over `factor` x the usual hourly spend, and over `min_usd`."""
    hour = int(now // 3600)
    current = hourly.get(hour, 0)
    usual = usual_hourly(hourly, since_hour=since_hour, hour=hour, baseline_hours=spec.baseline_hours)
    if usual is None or current < usd_to_nusd(spec.min_usd) or current <= spec.factor * usual:
        return None
    times = f"{Decimal(current) / usual:.1f}x" if usual else "from nothing, above"
    return Event("spike", c, now, detail={
        "hour_started": _iso(hour * 3600), "hour_usd": usd_exact(current), "hour_nusd": current,
        "usual_hourly_usd": usd_exact(usual), "usual_hourly_nusd": usual, "factor": str(spec.factor),
        "baseline": spec.baseline,
    }, text=(f"Spend spike on {_who(c, lower=True)}: {_usd(current)} since {_iso(hour * 3600)[11:16]} UTC, "
             f"{times} its usual {_usd(usual)} an hour (mean of the last {spec.baseline}); spent "
             f"{_usd(c.spent_nusd)} of {_usd(c.limit_nusd)}; {_resets(c)}."))


# ---- the payload -----------------------------------------------------------------------------

def payload(alert: str, e: Event) -> dict[str, Any]:
    """What the webhook gets: `text` (a sentence: Slack and Microsoft Teams incoming webhooks
    post it as it is) and the structured fields. Amounts are exact decimal strings beside integer
    nano-USD, as in the admin API."""
    c = e.counter
    return {
        "text": e.text,
        "event": e.kind,
        "alert": alert,
        "id": f"{alert}:{e.name}:{c.key}",
        "ts": _iso(e.at, ms=True),
        "budget": c.budget,
        "scope": dict(c.per),
        "counter": c.scope,
        "period": c.period_label,
        "window": c.window,
        "spent_usd": usd_exact(c.spent_nusd),
        "reserved_usd": usd_exact(c.reserved_nusd),
        "limit_usd": usd_exact(c.limit_nusd),
        "spent_nusd": c.spent_nusd,
        "reserved_nusd": c.reserved_nusd,
        "limit_nusd": c.limit_nusd,
        "percent": float(round(Decimal(100 * c.spent_nusd) / c.limit_nusd, 2)) if c.limit_nusd else None,
        "resets_at": _iso(c.period_end) if c.period_end is not None else None,
        **e.detail,
    }


def _who(c: Counter, lower: bool = False) -> str:
    return f"{'b' if lower else 'B'}udget {c.budget}" + ("" if not c.per else f" for {c.scope}")


def _usd(nusd: int) -> str:
    """$0.00042 exactly below a dollar; $1,234.57 (to the cent) above."""
    exact = usd_exact(nusd)
    if abs(nusd) < usd_to_nusd(1):
        return f"${exact}"
    return f"${Decimal(exact).quantize(Decimal('0.01'), rounding=ROUND_HALF_EVEN):,}"


def _pct(c: Counter) -> str:
    if not c.limit_nusd:
        return "of a zero limit"
    return f"{Decimal(100 * c.spent_nusd) / c.limit_nusd:.0f}%"


def _resets(c: Counter) -> str:
    if c.period_end is None:
        return f"{c.window}, spend ages out as it gets older"
    return f"{c.window}, resets at {_iso(c.period_end)}"


def _iso(epoch: float, ms: bool = False) -> str:
    t = datetime.fromtimestamp(epoch, timezone.utc)
    return t.isoformat(timespec="milliseconds" if ms else "seconds").replace("+00:00", "Z")


def _request(r: Mapping[str, Any]) -> dict[str, Any]:
    """The request that showed the event: who, which model, its id (to find its record)."""
    return {k: r.get(k) for k in ("request_id", "user", "team", "app", "service_token", "model_requested",
                                  "model_served", "ts")}
