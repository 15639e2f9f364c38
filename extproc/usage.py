"""Usage rollups: per-day totals by identity and model, written when a request settles.

Every forwarded request adds its tokens and cost to one field group of the day's hash
(`{prefix}usage:{YYYY-MM-DD}`, UTC), keyed by the tuple (user, team, app, groups, model served,
provider, service token). The increments ride in the same Lua call that settles the request's
budget counters (extproc/budgets/lua/settle.lua), which also appends the attribution record to a
bounded Redis Stream. Reports group those tuples by any combination of dimensions without ever
scanning raw records: a day holds one field group per distinct tuple, not per request.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta, timezone
from typing import Any

import orjson
import redis.asyncio as aredis

from .budgets.store import UsageWrite

DIMENSIONS = ("user", "team", "app", "group", "model", "provider", "service_token")
METRICS = ("requests", "input_tokens", "output_tokens", "cached_input_tokens", "cache_write_tokens",
           "cache_write_long_tokens", "reasoning_tokens", "cost_nusd")
# The tuple stored per request; `group` is reported from the `groups` list (one row per group).
_TUPLE = ("user", "team", "app", "groups", "model", "provider", "service_token")
STREAM = "attribution"
RETENTION_DAYS = 400


def usage_key(prefix: str, day: date) -> str:
    return f"{prefix}usage:{day.isoformat()}"


def usage_tuple(record: Mapping[str, Any]) -> str:
    """The rollup tuple of a record: which field group of the day hash it adds to."""
    return orjson.dumps([
        record.get("user") or "", record.get("team") or "", record.get("app") or "",
        sorted(record.get("groups") or []), record.get("model_served") or "", record.get("provider") or "",
        record.get("service_token") or "",
    ]).decode()


STREAM_ENTRY_OVERHEAD = 64
"""Bytes Redis spends per stream entry beyond the record itself (ID, field name, listpack framing), roughly."""


@dataclass(frozen=True)
class StreamBound:
    """How much of the attribution stream Redis keeps: the newest `max_bytes`, none older than `max_age_seconds`."""

    max_bytes: int = 256 * 1024 * 1024
    max_age_seconds: int = 3 * 86400

    def maxlen(self, record_bytes: int) -> int:
        """Entries that fit `max_bytes` if they were all this size (a MAXLEN for XADD)."""
        return max(1, self.max_bytes // (record_bytes + STREAM_ENTRY_OVERHEAD))


def _open_object(record: Mapping[str, Any]) -> bytes:
    """The record as a JSON object without its closing brace: the settle script appends the outcome."""
    return orjson.dumps(record)[:-1]


def usage_write(record: Mapping[str, Any], *, prefix: str = "tollgate:", bound: StreamBound = StreamBound(),
                rollup: bool = True) -> UsageWrite:
    """The attribution writes for one record: its day rollup (when it was forwarded) and the record.

    The record must not carry `settlement`: the script adds what actually happened."""
    day = datetime.fromisoformat(record["ts"]).astimezone(timezone.utc).date()
    increments: tuple[tuple[str, int], ...] = ()
    if rollup:
        tup = usage_tuple(record)
        increments = tuple((f"{m}|{tup}", int(record.get(m) or 0) if m != "requests" else 1) for m in METRICS)
    body = _open_object(record)
    return UsageWrite(
        usage_key=usage_key(prefix, day),
        stream_key=f"{prefix}{STREAM}",
        ttl=RETENTION_DAYS * 86400,
        stream_maxlen=bound.maxlen(len(body)),
        stream_max_age_ms=bound.max_age_seconds * 1000,
        record_json=body,
        increments=increments,
    )


def lease_meta(record: Mapping[str, Any], *, prefix: str = "tollgate:", bound: StreamBound = StreamBound()) -> bytes:
    """What a lease keeps so that, if it expires unsettled (its gateway died), the charge of its
    reservation is still rolled up under the request's identity and recorded (see common.lua):
    the same keys and stream bounds its settle would use."""
    w = usage_write(record, prefix=prefix, bound=bound, rollup=False)
    return "\n".join([w.usage_key, w.stream_key, str(w.stream_maxlen), str(w.stream_max_age_ms),
                      usage_tuple(record)]).encode() + b"\n" + w.record_json


def expired_stream_key(prefix: str = "tollgate:") -> str:
    """The hand-off stream of records Redis writes for expired leases (common.lua appends
    `:expired` to the attribution stream's key); the ext_procs drain it into their sinks."""
    return f"{prefix}{STREAM}:expired"


@dataclass
class UsageRow:
    key: dict[str, str]
    requests: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cached_input_tokens: int = 0
    cache_write_tokens: int = 0
    cache_write_long_tokens: int = 0
    reasoning_tokens: int = 0
    cost_nusd: int = 0

    def add(self, metrics: Mapping[str, int]) -> None:
        for m in METRICS:
            setattr(self, m, getattr(self, m) + metrics.get(m, 0))

    @property
    def cost_usd(self) -> float:
        return self.cost_nusd / 1e9

    def as_dict(self) -> dict[str, Any]:
        return {**self.key, **{m: getattr(self, m) for m in METRICS}, "cost_usd": self.cost_usd}


@dataclass
class UsageReport:
    group_by: list[str]
    start: date
    end: date
    rows: list[UsageRow] = field(default_factory=list)
    totals: UsageRow = field(default_factory=lambda: UsageRow(key={}))


def _days(start: date, end: date) -> Iterable[date]:
    d = start
    while d <= end:
        yield d
        d += timedelta(days=1)


def _tuples(raw: Mapping[bytes, bytes]) -> dict[str, dict[str, int]]:
    """The day hash, regrouped: tuple json -> metric -> value."""
    out: dict[str, dict[str, int]] = {}
    for f, v in raw.items():
        metric, _, tup = f.decode().partition("|")
        out.setdefault(tup, {})[metric] = int(v)
    return out


async def query_usage(redis: aredis.Redis, *, group_by: list[str], start: date, end: date,
                      where: Mapping[str, str] | None = None, prefix: str = "tollgate:") -> UsageReport:
    """Spend and tokens from `start` to `end` (inclusive, UTC days) grouped by `group_by`.

    `where` filters by equality on any dimension (`group` matches when the groups contain it).
    Grouping by `group` gives a row per group a request's caller was in, so those rows can add up
    to more than the totals, which count each request once.
    """
    unknown = [d for d in [*group_by, *(where or {})] if d not in DIMENSIONS]
    if unknown:
        raise ValueError(f"unknown dimension(s) {unknown}; use {', '.join(DIMENSIONS)}")
    if end < start:
        raise ValueError("the end date is before the start date")
    report = UsageReport(group_by=list(group_by), start=start, end=end)
    rows: dict[tuple[str, ...], UsageRow] = {}
    async with redis.pipeline(transaction=False) as pipe:
        days = list(_days(start, end))
        for d in days:
            pipe.hgetall(usage_key(prefix, d))
        results = await pipe.execute()
    for raw in results:
        for tup, metrics in _tuples(raw).items():
            values = dict(zip(_TUPLE, orjson.loads(tup)))
            groups = values.pop("groups") or []
            if where and not all(
                (v in groups) if k == "group" else values.get(k) == v for k, v in where.items()
            ):
                continue
            report.totals.add(metrics)
            for g in (groups or [""]) if "group" in group_by else [None]:
                key = tuple(g if d == "group" else values[d] for d in group_by)
                row = rows.get(key)
                if row is None:
                    row = rows[key] = UsageRow(key=dict(zip(group_by, key)))
                row.add(metrics)
    report.rows = sorted(rows.values(), key=lambda r: (-r.cost_nusd, tuple(r.key.values())))
    return report
