"""Window math: which calendar period or rolling bucket a moment falls in. Pure functions of `now`.

Time is always passed in (epoch seconds from the engine's injected clock), never read here, so
tests can sit exactly on a boundary. Calendar periods start at local midnight in an IANA zone;
period lengths therefore follow DST (a Berlin day in late March is 23 h long).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from typing import Literal
from zoneinfo import ZoneInfo

from .policy import CalendarWindowSpec, RollingWindowSpec

_KEY_PART = re.compile(r"r(\d+)s(\d+)")  # Rolling.key_part

WEEKDAYS = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")

KEY_GRACE_SECONDS = 2 * 86400
"""Counters outlive their period by this much, so late settles and `status` of the last period still work."""


@dataclass(frozen=True)
class Period:
    """One calendar period: its id in counter keys (e.g. `2026-11`) and its [start, end) in epoch seconds."""

    id: str
    start: float
    end: float


def _local_midnight(d: date, tz: ZoneInfo) -> float:
    """Epoch seconds of local midnight starting day `d`.

    Where midnight falls in a DST gap (e.g. America/Santiago), zoneinfo's fold=0 reading uses the
    offset before the jump, which lands exactly on the transition: the first instant of that day.
    """
    return datetime(d.year, d.month, d.day, tzinfo=tz).timestamp()


@dataclass(frozen=True)
class Calendar:
    """A calendar window: day, week (starting on `week_start`) or month, in time zone `tz`."""

    unit: Literal["day", "week", "month"]
    tz: ZoneInfo
    week_start: int = 0  # 0 = Monday .. 6 = Sunday
    _last: Period | None = field(default=None, init=False, repr=False, compare=False, hash=False)

    @classmethod
    def from_spec(cls, spec: CalendarWindowSpec) -> "Calendar":
        return cls(spec.calendar, ZoneInfo(spec.timezone), WEEKDAYS.index(spec.week_start))

    def period(self, now: float) -> Period:
        """The period containing `now`. Ids: day `2026-11-28`, week `W2026-11-23` (its first day), month `2026-11`.

        Periods are contiguous half-open intervals, so the last one computed answers every `now`
        inside it: the date arithmetic (four datetime conversions) runs once per period, not once
        per request."""
        last = self._last
        if last is not None and last.start <= now < last.end:
            return last
        p = self._compute(now)
        object.__setattr__(self, "_last", p)
        return p

    def _compute(self, now: float) -> Period:
        local = datetime.fromtimestamp(now, self.tz).date()
        if self.unit == "day":
            first, nxt = local, local + timedelta(days=1)
            pid = first.isoformat()
        elif self.unit == "week":
            first = local - timedelta(days=(local.weekday() - self.week_start) % 7)
            nxt = first + timedelta(days=7)
            pid = "W" + first.isoformat()
        else:
            first = local.replace(day=1)
            nxt = date(first.year + 1, 1, 1) if first.month == 12 else date(first.year, first.month + 1, 1)
            pid = f"{first.year:04d}-{first.month:02d}"
        return Period(pid, _local_midnight(first, self.tz), _local_midnight(nxt, self.tz))

    def describe(self) -> str:
        extra = f", week starts {WEEKDAYS[self.week_start]}" if self.unit == "week" else ""
        return f"calendar {self.unit} ({self.tz.key}{extra})"


@dataclass(frozen=True)
class Rolling:
    """A rolling window of `n_buckets` buckets of `bucket_seconds`; bucket i covers [i*b, (i+1)*b).

    The window at `now` is the current bucket plus the n-1 before it, so it spans between
    (n-1)*b and n*b seconds of history: coarser buckets = cheaper but blurrier ageing.
    """

    window_seconds: int
    bucket_seconds: int

    @classmethod
    def from_spec(cls, spec: RollingWindowSpec) -> "Rolling":
        return cls(spec.window_seconds, spec.bucket_seconds)

    @property
    def n_buckets(self) -> int:
        return self.window_seconds // self.bucket_seconds

    def bucket_index(self, now: float) -> int:
        return math.floor(now / self.bucket_seconds)

    @classmethod
    def from_key_part(cls, part: str) -> "Rolling | None":
        """The window a counter key's period part names (inverse of key_part), or None for a calendar one."""
        m = _KEY_PART.fullmatch(part)
        return cls(int(m[1]), int(m[2])) if m else None

    def key_part(self) -> str:
        """Part of the counter key; a changed window or bucket size starts a fresh counter instead of misreading old buckets."""
        return f"r{self.window_seconds}s{self.bucket_seconds}"

    def retry_after(self, now: float, buckets: list[int], reserved: int, cost: int, limit: int) -> float:
        """Seconds until enough old spend ages out that `cost` fits beside `reserved`; the window length if it never will.

        `buckets` are the window's bucket sums, oldest first (as the store returns them). Live
        reservations are assumed to stay (they may settle lower or expire earlier: this is an upper bound).
        """
        idx = self.bucket_index(now)
        total = sum(buckets)
        if total + reserved + cost <= limit:
            return 0.0
        if reserved + cost > limit:
            return float(self.window_seconds)
        dropped = 0
        for k, amount in enumerate(buckets, start=1):
            dropped += amount
            if total - dropped + reserved + cost <= limit:
                # the k oldest buckets have left the window once bucket idx+k starts
                return max(0.0, (idx + k) * self.bucket_seconds - now)
        return float(self.window_seconds)

    def describe(self) -> str:
        return f"rolling {self.window_seconds}s in {self.bucket_seconds}s buckets"


Window = Calendar | Rolling


def window_for(spec: CalendarWindowSpec | RollingWindowSpec) -> Window:
    """The window math object for a validated window spec."""
    if isinstance(spec, CalendarWindowSpec):
        return Calendar.from_spec(spec)
    return Rolling.from_spec(spec)
