"""Usage rollups: per-day totals by identity and model, written when a request settles.

Every forwarded request adds its tokens and cost to one field group of the day's hash
(`{prefix}usage:{YYYY-MM-DD}`, UTC), keyed by the tuple (user, team, app, groups, model served,
provider, service token). The increments ride in the same Lua call that settles the request's
budget counters (extproc/budgets/lua/settle.lua), which also appends the attribution record to a
bounded Redis Stream. Reports group those tuples by any combination of dimensions without ever
scanning raw records: a day holds one field group per distinct tuple, not per request.

Decisions are rolled up beside the metrics, as `d:<decision>|<tuple>` fields of the same hash: a
settled request adds 1 to `d:allowed`, `d:downgraded` or `d:clamped` (in its settle call, with the
metrics); a request blocked by a budget adds 1 to `d:blocked` (`count_blocked`, off the request
path, one HINCRBY: no key, no stream entry per refusal). A lease that expired into a charge adds
to `requests` and `cost_nusd` only (common.lua), so decision counts can sum to less than requests.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import date, timedelta
from typing import Any

import orjson
import redis.asyncio as aredis

from .attribution import ts_day
from .budgets.store import UsageWrite

log = logging.getLogger("tollgate.usage")

DIMENSIONS = ("user", "team", "app", "group", "model", "provider", "service_token")
METRICS = ("requests", "input_tokens", "output_tokens", "cached_input_tokens", "cache_write_tokens",
           "cache_write_long_tokens", "reasoning_tokens", "cost_nusd")
# The tuple stored per request; `group` is reported from the `groups` list (one row per group).
_TUPLE = ("user", "team", "app", "groups", "model", "provider", "service_token")
STREAM = "attribution"
RETENTION_DAYS = 400
DECISIONS = ("allowed", "downgraded", "clamped", "blocked")
DECISION_FIELD = "d:"
"""Prefix of a decision count's metric name in the day hash: `d:allowed|<tuple>`."""
GROUPABLE = (*DIMENSIONS, "day")
"""What reports group by: the dimensions, and `day` (one row per UTC day)."""
CACHE_METRICS = ("cache_hits", "avoided_cost_nusd")
"""cache: rolled up only by response-cache hits (extproc/cache/): how many, and what they would have cost."""


def usage_key(prefix: str, day: date) -> str:
    return f"{prefix}usage:{day.isoformat()}"


def usage_tuple(record: Mapping[str, Any]) -> str:
    """The rollup tuple of a record: which field group of the day hash it adds to.

    Each forwarded request needs it twice (its lease's meta, its settle) and nearly every request
    repeats the identity and model of an earlier one: the JSON text is kept per distinct tuple
    (a dict lookup instead of a sort and an orjson round trip)."""
    get = record.get
    groups = get("groups") or ()
    key = (get("user") or "", get("team") or "", get("app") or "", tuple(groups), get("model_served") or "",
           get("provider") or "", get("service_token") or "")
    text = _TUPLES.get(key)
    if text is None:
        if len(_TUPLES) >= _TUPLES_MAX:
            _TUPLES.clear()  # many distinct identities: start over rather than grow
        text = _TUPLES[key] = orjson.dumps([*key[:3], sorted(groups), *key[4:]]).decode()
    return text


_TUPLES: dict[tuple[Any, ...], str] = {}
_TUPLES_MAX = 4096


def _fields(tup: str) -> tuple[tuple[str, ...], dict[str, str]]:
    """The day hash's field names of a tuple: one per metric (in METRICS order) and one per
    decision, formatted once per distinct tuple like the tuple itself."""
    hit = _FIELDS.get(tup)
    if hit is None:
        if len(_FIELDS) >= _TUPLES_MAX:
            _FIELDS.clear()
        hit = _FIELDS[tup] = (tuple(f"{m}|{tup}" for m in METRICS),
                              {d: f"{DECISION_FIELD}{d}|{tup}" for d in DECISIONS})
    return hit


_FIELDS: dict[str, tuple[tuple[str, ...], dict[str, str]]] = {}


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


def _utc_day(ts: str) -> date:
    """The UTC day of a record's `ts` (extproc/attribution.py `ts_day`, which the record files use too)."""
    day = ts_day(ts)
    if day is None:
        raise ValueError(f"record ts {ts!r} is not an ISO 8601 time")
    d = _DAYS.get(day)
    if d is None:
        if len(_DAYS) >= 64:
            _DAYS.clear()
        d = _DAYS[day] = date.fromisoformat(day)
    return d


_DAYS: dict[str, date] = {}


def _day_keys(prefix: str, ts: str) -> tuple[str, str, bytes]:
    """The rollup and stream keys a record's `ts` writes to (settles and lease metas alike), and
    the two as a lease meta's first lines: kept per prefix and day for a UTC time (`+00:00`, as
    `now_ts` writes every record's), whose day is its first ten characters."""
    utc = ts.endswith("+00:00")
    keys = _KEYS.get((prefix, ts[:10])) if utc else None
    if keys is None:
        day = _utc_day(ts)
        usage, stream = usage_key(prefix, day), f"{prefix}{STREAM}"
        keys = (usage, stream, f"{usage}\n{stream}\n".encode())
        if utc and day.isoformat() == ts[:10]:
            if len(_KEYS) >= 64:
                _KEYS.clear()
            _KEYS[(prefix, ts[:10])] = keys
    return keys


_KEYS: dict[tuple[str, str], tuple[str, str, bytes]] = {}


def usage_write(record: Mapping[str, Any], *, prefix: str = "tollgate:", bound: StreamBound = StreamBound(),
                rollup: bool = True) -> UsageWrite:
    """The attribution writes for one record: its day rollup (when it was forwarded) and the record.

    The record must not carry `settlement`: the script adds what actually happened."""
    keys = _day_keys(prefix, record["ts"])
    increments: tuple[tuple[str, int], ...] = ()
    if rollup:
        tup = usage_tuple(record)
        names, decisions = _fields(tup)
        get = record.get
        # A metric left out reads as 0 (`_tuples`, `Usage.add`): most records have no cache or
        # reasoning tokens, and each HINCRBY the settle script skips is about 1.4 us of Redis.
        inc = [(names[0], 1)]
        for i in range(1, len(METRICS)):
            v = get(METRICS[i])
            if v and (v := int(v)):
                inc.append((names[i], v))
        decision = decisions.get(get("decision"))
        if decision is not None:
            inc.append((decision, 1))
        if get("cache") == "hit":  # cache: a hit costs 0; what it avoided is rolled up beside
            inc += ((f"cache_hits|{tup}", 1), (f"avoided_cost_nusd|{tup}", int(get("avoided_cost_nusd") or 0)))
        increments = tuple(inc)
    body = _open_object(record)
    return UsageWrite(
        usage_key=keys[0],
        stream_key=keys[1],
        ttl=RETENTION_DAYS * 86400,
        stream_maxlen=bound.maxlen(len(body)),
        stream_max_age_ms=bound.max_age_seconds * 1000,
        record_json=body,
        increments=increments,
    )


async def count_blocked(redis: aredis.Redis, record: Mapping[str, Any], *, prefix: str = "tollgate:") -> None:
    """Count a request a budget blocked in its day's rollup (`d:blocked|<tuple>`), for the
    dashboard's decisions chart. Never raises: a lost count must not touch the request."""
    key = usage_key(prefix, _utc_day(record["ts"]))
    try:
        async with redis.pipeline(transaction=False) as pipe:
            pipe.hincrby(key, f"{DECISION_FIELD}blocked|{usage_tuple(record)}", 1)
            pipe.expire(key, RETENTION_DAYS * 86400)
            await pipe.execute()
    except Exception as e:  # noqa: BLE001 - Redis down or slow: the count is lost, nothing else
        log.debug("blocked count not written: %s: %s", type(e).__name__, e)


def lease_meta(record: Mapping[str, Any], *, prefix: str = "tollgate:", bound: StreamBound = StreamBound()) -> bytes:
    """What a lease keeps so that, if it expires unsettled (its gateway died), the charge of its
    reservation is still rolled up under the request's identity and recorded (see common.lua):
    the same keys and stream bounds its settle would use."""
    body = _open_object(record)
    return (f"{usage_key(prefix, _utc_day(record['ts']))}\n{prefix}{STREAM}\n{bound.maxlen(len(body))}\n"
            f"{bound.max_age_seconds * 1000}\n{usage_tuple(record)}\n").encode() + body


class LeaseMetaTemplate:
    """`lease_meta` for leases whose records differ only in the `varying` fields: the record's
    JSON encoded once, with a marker in place of each varying value, and split there; each lease
    then encodes only those values. Byte for byte what `lease_meta` gives the whole record
    (tests/test_usage_lease_meta.py checks it on records that differ in every varying field).

    Measured in process, one request at a time: the lease's record and its encoding cost 15 us of
    a forwarded request's 283 (the record's 27 fields rebuilt from the context, then dumped)."""

    __slots__ = ("_bound", "_order", "_parts", "_prefix", "_tail")

    def __init__(self, record: Mapping[str, Any], varying: Iterable[str], *, prefix: str = "tollgate:",
                 bound: StreamBound = StreamBound()) -> None:
        markers = {k: f"{_MARKER}{k}" for k in varying}
        body = _open_object({**record, **markers})
        found = sorted((body.index(orjson.dumps(m)), k) for k, m in markers.items())  # in the record's order
        self._order = tuple(k for _, k in found)
        parts, rest = [], body
        for k in self._order:
            before, _, rest = rest.partition(orjson.dumps(markers[k]))
            parts.append(before)
        parts.append(rest)
        self._parts = tuple(parts)
        self._tail = f"{bound.max_age_seconds * 1000}\n{usage_tuple(record)}\n".encode()  # max age, rollup tuple
        self._prefix, self._bound = prefix, bound

    def render(self, values: Mapping[str, Any]) -> bytes:
        """The lease meta of the record with `values` (every varying field, `ts` among them)."""
        parts = self._parts
        chunks = [parts[0]]
        for k, part in zip(self._order, parts[1:]):
            chunks += (orjson.dumps(values[k]), part)
        body = b"".join(chunks)
        keys = _day_keys(self._prefix, values["ts"])[2]
        return b"".join((keys, b"%d\n" % self._bound.maxlen(len(body)), self._tail, body))


# Per process and unguessable, so that no identity or policy value can contain it.
_MARKER = f"\x1ftollgate-varying-{os.urandom(8).hex()}:"


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
    decisions: dict[str, int] = field(default_factory=dict)  # allowed / downgraded / clamped / blocked
    cache_hits: int = 0  # cache: answered from the response cache, at $0
    avoided_cost_nusd: int = 0  # cache: what those hits' answers cost when the provider gave them

    def add(self, metrics: Mapping[str, int]) -> None:
        for m in METRICS + CACHE_METRICS:
            setattr(self, m, getattr(self, m) + metrics.get(m, 0))
        for m, v in metrics.items():
            if m.startswith(DECISION_FIELD):
                d = m[len(DECISION_FIELD):]
                self.decisions[d] = self.decisions.get(d, 0) + v

    @property
    def cost_usd(self) -> float:
        return self.cost_nusd / 1e9

    @property
    def avoided_cost_usd(self) -> float:
        return self.avoided_cost_nusd / 1e9

    def as_dict(self) -> dict[str, Any]:
        return {**self.key, **{m: getattr(self, m) for m in METRICS}, "cost_usd": self.cost_usd,
                "cache_hits": self.cache_hits, "avoided_cost_usd": self.avoided_cost_usd}  # cache


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


def _tuples(raw: Mapping[bytes, bytes]) -> dict[bytes, dict[str, int]]:
    """The day hash, regrouped: tuple json (bytes: decoded once per tuple, by orjson, not once
    per field) -> metric -> value."""
    out: dict[bytes, dict[str, int]] = {}
    for f, v in raw.items():
        metric, _, tup = f.partition(b"|")
        d = out.get(tup)
        if d is None:
            d = out[tup] = {}
        d[metric.decode()] = int(v)
    return out


@dataclass(frozen=True)
class RollupDay:
    """One UTC day's rollup hash, decoded: (tuple values with `groups` as a list, metrics) pairs."""

    day: date
    tuples: list[tuple[dict[str, Any], dict[str, int]]]


async def read_raw_rollups(redis: aredis.Redis, start: date, end: date, *,
                           prefix: str = "tollgate:") -> list[tuple[date, Mapping[bytes, bytes]]]:
    """The day hashes from `start` to `end` (inclusive) as Redis returns them, one pipelined
    HGETALL each, oldest first (`decode_rollups` turns them into RollupDays)."""
    async with redis.pipeline(transaction=False) as pipe:
        days = list(_days(start, end))
        for d in days:
            pipe.hgetall(usage_key(prefix, d))
        results = await pipe.execute()
    return list(zip(days, results))


def decode_rollups(raw: Iterable[tuple[date, Mapping[bytes, bytes]]]) -> list[RollupDay]:
    """Raw day hashes as RollupDays. Pure CPU (a month for 1,000 users is ~600,000 fields): the
    admin API runs it in a thread, so the ext_proc's event loop keeps serving requests."""
    return [RollupDay(d, [(dict(zip(_TUPLE, orjson.loads(tup))), metrics) for tup, metrics in _tuples(h).items()])
            for d, h in raw]


async def read_rollups(redis: aredis.Redis, start: date, end: date, *, prefix: str = "tollgate:") -> list[RollupDay]:
    """The day hashes from `start` to `end` (inclusive), decoded, oldest first."""
    return decode_rollups(await read_raw_rollups(redis, start, end, prefix=prefix))


async def recent_rollups(redis: aredis.Redis, today: date, days: int = 7, *,
                         prefix: str = "tollgate:") -> list[RollupDay]:
    """The last `days` UTC days up to `today`, without the leading days that hold no rollup at all
    (the gateway was not recording yet): what forecasts read."""
    out = await read_rollups(redis, today - timedelta(days=days - 1), today, prefix=prefix)
    while len(out) > 1 and not out[0].tuples:
        out.pop(0)
    return out


def aggregate(rollups: Iterable[RollupDay], *, group_by: list[str], where: Mapping[str, str] | None = None,
              blocked_only_rows: bool = False) -> UsageReport:
    """Group decoded rollup days by `group_by` (any of GROUPABLE), filtered by `where` (equality on
    the dimensions; `group` matches when the groups contain it). A tuple holding only blocked
    counts (no request reached a provider) makes a row only with `blocked_only_rows`."""
    unknown = [d for d in group_by if d not in GROUPABLE] + [d for d in (where or {}) if d not in DIMENSIONS]
    if unknown:
        raise ValueError(f"unknown dimension(s) {unknown}; use {', '.join(DIMENSIONS)} (and `day` to group by)")
    days = list(rollups)
    report = UsageReport(group_by=list(group_by), start=days[0].day if days else date.min,
                         end=days[-1].day if days else date.min)
    rows: dict[tuple[str, ...], UsageRow] = {}
    for rd in days:
        for tup_values, metrics in rd.tuples:
            values = dict(tup_values)
            groups = values.pop("groups") or []
            if where and not all(
                (v in groups) if k == "group" else values.get(k) == v for k, v in where.items()
            ):
                continue
            report.totals.add(metrics)
            if "requests" not in metrics and not blocked_only_rows:
                continue
            values["day"] = rd.day.isoformat()
            for g in (groups or [""]) if "group" in group_by else [None]:
                key = tuple(g if d == "group" else values[d] for d in group_by)
                row = rows.get(key)
                if row is None:
                    row = rows[key] = UsageRow(key=dict(zip(group_by, key)))
                row.add(metrics)
    report.rows = sorted(rows.values(), key=lambda r: (-r.cost_nusd, tuple(r.key.values())))
    return report


async def query_usage(redis: aredis.Redis, *, group_by: list[str], start: date, end: date,
                      where: Mapping[str, str] | None = None, prefix: str = "tollgate:") -> UsageReport:
    """Spend and tokens from `start` to `end` (inclusive, UTC days) grouped by `group_by`.

    `where` filters by equality on any dimension (`group` matches when the groups contain it).
    Grouping by `group` gives a row per group a request's caller was in, so those rows can add up
    to more than the totals, which count each request once. `day` groups by UTC day.
    """
    unknown = [d for d in group_by if d not in GROUPABLE] + [d for d in (where or {}) if d not in DIMENSIONS]
    if unknown:
        raise ValueError(f"unknown dimension(s) {unknown}; use {', '.join(DIMENSIONS)}")
    if end < start:
        raise ValueError("the end date is before the start date")
    report = aggregate(await read_rollups(redis, start, end, prefix=prefix), group_by=group_by, where=where)
    report.start, report.end = start, end
    return report
