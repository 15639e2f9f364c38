"""Redis side of alerts: claims that make each event sent once, and counters' hourly spend.

Key layout (under the prefix, default `tollgate:`; budget counters are in budgets/store.py):

* `{prefix}alerts:sent:{alert}:{event}:{counter}` — STRING, set with `SET NX EX`: whoever sets it
  sends the event; every other gateway process finds it set and does not. `{event}` is the
  event's kind, with the threshold for thresholds (`threshold@0.8`); `{counter}` the counter's key
  without the prefix (`b:{budget}:{period}:{per}`), so a new period is a new claim. It expires at
  the end of the counter's calendar period plus a day, or after one window for a rolling one.
  The value says who claimed it and when (`<host>:<pid> <epoch>`), for whoever debugs a delivery.
* `{prefix}alerts:spend:{budget}:{per}:{YYYY-MM-DD}` — HASH, one field per UTC hour of that day
  (`00`..`23`): the settled spend (nano-USD) the gateways saw on the counters of `budget` with
  these `per` values (`{per}` as in the counter's key), across periods. Spike detection reads it.
  Kept `HISTORY_DAYS` days.
* `{prefix}alerts:spend:{budget}:{per}:since` — STRING, the first epoch hour recorded (`SET NX`),
  so a counter with two hours of history is not compared with a week of zeros. Its TTL is pushed
  back on every write.

Only counters of budgets an alert with the `spike` event watches have a history; it starts when
that alert is added.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterable, Mapping
from datetime import datetime, timezone

import redis.asyncio as aredis

from ..budgets.store import BudgetStore, CounterRef, CounterState
from ..budgets.windows import KEY_GRACE_SECONDS

HISTORY_DAYS = 9
"""Days of hourly spend kept: a 7-day spike baseline plus the day in progress, with a margin."""

_WHO = f"{socket.gethostname()}:{os.getpid()}"


def claim_key(prefix: str, alert: str, event: str, counter_key: str) -> str:
    return f"{prefix}alerts:sent:{alert}:{event}:{counter_key[len(prefix):]}"


def history_base(prefix: str, counter_key: str) -> str:
    """`{prefix}alerts:spend:{budget}:{per}` for a counter key `{prefix}b:{budget}:{period}:{per}`."""
    budget, _, per = counter_key[len(prefix) + 2:].split(":", 2)
    return f"{prefix}alerts:spend:{budget}:{per}"


def _day_and_field(hour: int) -> tuple[str, str]:
    """Epoch hour -> (its UTC day, `YYYY-MM-DD`; its hour of that day, `00`..`23`)."""
    t = datetime.fromtimestamp(hour * 3600, timezone.utc)
    return t.date().isoformat(), f"{t.hour:02d}"


def _first_hour(day: str) -> int:
    return int(datetime.fromisoformat(day).replace(tzinfo=timezone.utc).timestamp()) // 3600


class AlertStore:
    """Typed calls over the keys above. Raises redis errors (the monitor counts and retries)."""

    def __init__(self, redis: aredis.Redis, *, prefix: str = "tollgate:") -> None:
        self.redis = redis
        self.prefix = prefix
        self._budgets = BudgetStore(redis, prefix=prefix, grace=KEY_GRACE_SECONDS)

    async def claim(self, keys: list[tuple[str, int]], now: float) -> list[bool]:
        """`SET NX EX` each (key, ttl) in one round trip: True where this process claimed it."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for key, ttl in keys:
                pipe.set(key, f"{_WHO} {now:.3f}", nx=True, ex=ttl)
            return [bool(r) for r in await pipe.execute()]

    async def counters(self, refs: list[CounterRef]) -> list[tuple[CounterState, int | None]]:
        """Each counter's settled spend and live reservations (the budget engine's own read, on
        Redis's clock), with the limit the last reservation on it applied (None: never reserved)."""
        states = await self._budgets.read(refs, now=None)
        async with self.redis.pipeline(transaction=False) as pipe:
            for ref in refs:
                pipe.hget(ref.key, "limit")
            limits = await pipe.execute()
        return [(s, int(lim) if lim is not None else None) for s, lim in zip(states, limits)]

    async def add_spend(self, spend: Mapping[tuple[str, int], int]) -> None:
        """Add `{(history base, epoch hour): nano-USD}` to the hourly history, in one round trip."""
        ttl = HISTORY_DAYS * 86400
        async with self.redis.pipeline(transaction=False) as pipe:
            for (base, hour), nusd in spend.items():
                day, fld = _day_and_field(hour)
                key = f"{base}:{day}"
                pipe.hincrby(key, fld, nusd)
                pipe.expire(key, ttl)
                pipe.set(f"{base}:since", hour, nx=True, ex=ttl)
                pipe.expire(f"{base}:since", ttl)
            await pipe.execute()

    async def history(self, bases: Iterable[str], hour: int,
                      hours: int) -> dict[str, tuple[dict[int, int], int | None]]:
        """For each history base: {epoch hour: nano-USD} over the `hours` up to and including
        `hour`, and the first hour recorded (None: no history)."""
        bases = list(bases)
        days = sorted({_day_and_field(h)[0] for h in range(hour - hours, hour + 1)})
        async with self.redis.pipeline(transaction=False) as pipe:
            for base in bases:
                for day in days:
                    pipe.hgetall(f"{base}:{day}")
                pipe.get(f"{base}:since")
            replies = await pipe.execute()
        out: dict[str, tuple[dict[int, int], int | None]] = {}
        step = len(days) + 1
        for i, base in enumerate(bases):
            chunk = replies[i * step:(i + 1) * step]
            hourly: dict[int, int] = {}
            for day, fields in zip(days, chunk[:-1], strict=True):
                start = _first_hour(day)
                for f, v in fields.items():
                    hourly[start + int(f)] = int(v)
            since = chunk[-1]
            out[base] = (hourly, int(since) if since is not None else None)
        return out
