"""What the engine answers: an Admission per request, with BudgetStatus snapshots of the counters involved."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from .store import CounterRef

Decision = Literal["allowed", "clamped", "downgraded", "blocked", "store_error"]
Mode = Literal["enforce", "shadow"]


@dataclass(slots=True)
class BudgetStatus:
    """One counter of one budget at one moment, in nano-USD.

    `spent_nusd` is settled spend in the current window, `reserved_nusd` the live leases (including
    this request's when it was admitted; excluding it when it was blocked). `remaining_nusd` is
    limit - spent - reserved, never below 0. `resets_at` (epoch seconds): calendar = next period
    start; rolling = now + retry_after_seconds when something ages out to make room, else None.
    `retry_after_seconds`: calendar = seconds until the reset; rolling = seconds until enough old
    spend ages out for the request's cost to fit (window length if it never will; 0 if it fits now).
    `warn_level` is the highest `warn_at` fraction reached, if any.

    A plain slotted dataclass, like the other values built for every request (CounterState,
    ReserveResult, UsageWrite, the engine's _Request, decide's Candidate): a frozen one's
    `__init__` sets each field through `object.__setattr__`, which measured twice the cost
    (8.3 against 4.1 us for these 13 fields on the 2-core VM), for two or more per request.
    """

    name: str
    key: str
    per: dict[str, str]
    spent_nusd: int
    reserved_nusd: int
    limit_nusd: int
    remaining_nusd: int
    resets_at: float | None
    retry_after_seconds: float | None
    mode: Mode
    window: str
    warn_level: float | None = None
    unit: str = "usd"  # "requests" / "tokens": a rate limit's counter; its *_nusd fields then count those


@dataclass
class Admission:
    """The decision for one request, and the handle (`request_id`, `counters`) settle/release need.

    `model` / `provider` / `max_output_tokens` are what the request may be sent with (changed by
    downgrade / clamp). `reserved_nusd` is the worst-case cost held on every counter in `counters`.
    `store_error` is True when Redis failed: decision "store_error" (answer 503), or "allowed" when
    every matching budget is fail_open (then nothing is reserved or accounted).
    """

    decision: Decision
    model: str
    provider: str
    max_output_tokens: int
    reserved_nusd: int = 0
    blocking: BudgetStatus | None = None
    tightest: BudgetStatus | None = None
    warnings: list[BudgetStatus] = field(default_factory=list)
    shadow_blocked: list[BudgetStatus] = field(default_factory=list)
    reason: str = ""
    store_error: bool = False
    request_id: str = ""
    budgets: list[str] = field(default_factory=list)  # names of the budgets this request counts against
    counters: tuple[CounterRef, ...] = ()
    # Rate limits: the counters this request counts against (after its reservation), and on a
    # refusal the one it exceeded (then `blocking` is None and the decision "blocked").
    rate_limits: list[BudgetStatus] = field(default_factory=list)
    limited: BudgetStatus | None = None

    @property
    def admitted(self) -> bool:
        return self.decision in ("allowed", "clamped", "downgraded")


SettleOutcome = Literal["settled", "settled_after_expiry", "recorded", "duplicate", "nothing", "queued", "store_error"]
"""settled = charged now; settled_after_expiry = its lease had expired into a charge of the
reservation, corrected now to the real cost; recorded = no counters, attribution written;
duplicate = this request_id was already settled; nothing = no counters; queued = Redis failed, the
settle waits in the outbox; store_error = Redis failed and there is no outbox (logged, lost)."""

ReleaseOutcome = Literal["released", "nothing", "store_error"]
