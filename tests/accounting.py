"""The books, checked from the outside: Redis's counters and leases, the attribution stream, and
the fake provider's ledger of what it billed (issue 9).

Reconciliation rule (the one finance uses, docs/budgets.md):

* The Redis stream `{prefix}attribution` holds one entry per record, each with a single field
  `record`: a JSON object. Per `request_id`, the LAST entry in the stream is the final record: a
  lease that expired unsettled is recorded by Redis itself (`"settlement": "lease_expired"`,
  charged its reservation), and a real settle that comes later supersedes it
  (`"settlement": "settled_after_expiry"`).
* For every budget counter `{prefix}b:<budget>:<period>:<per>`, its settled spend (`spent` for a
  calendar window, the sum of its `b:<bucket>` fields for a rolling one) equals the sum of
  `cost_nusd` over the final records that name the budget in `budgets` and carry the counter's
  `per` values (as identity fields or `metadata`).
* Once nothing is in flight, no lease is left anywhere: no `r:<request_id>` field and `reserved`
  0 on every counter hash, no member other than `x:<request_id>` tombstones in any `:leases` zset.
* Nothing served is charged $0: every entry of the fake's ledger with a 2xx status and tokens
  (what the provider billed) has a final record, joined on `envoy_request_id` (Envoy's
  x-request-id, which the fake records as `request_id`), with `cost_nusd > 0`; and where that
  record carries no `estimate`, its cost is exactly the ledger's tokens priced from
  policies/prices.yaml by this module's own pricing (not extproc.pricing: an oracle must not share
  the code it checks).

Synchronous (the `redis` package), so tests can call it after their own event loops have ended.
"""

from __future__ import annotations

import fnmatch
import json
import sqlite3
import time
from datetime import date, datetime, timezone
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from decimal import ROUND_CEILING, Decimal
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import redis
import yaml

REPO = Path(__file__).resolve().parent.parent
PRICES = REPO / "policies" / "prices.yaml"
STREAM = "attribution"


# ---- Redis: records, counters, leases --------------------------------------------------------

def _client(redis_url: str) -> redis.Redis:
    return redis.Redis.from_url(redis_url, socket_timeout=5, socket_connect_timeout=5)


def stream_records(r: redis.Redis, prefix: str = "tollgate:") -> list[dict[str, Any]]:
    """Every record in the attribution stream, oldest first."""
    out: list[dict[str, Any]] = []
    start = "-"
    while True:
        batch = r.xrange(f"{prefix}{STREAM}", min=start, max="+", count=1000)
        if not batch:
            return out
        for entry_id, fields in batch:
            raw = fields.get(b"record")
            assert raw is not None, f"stream entry {entry_id!r} has no `record` field: {fields!r}"
            out.append(json.loads(raw))
        last = batch[-1][0].decode()
        ms, seq = last.split("-")
        start = f"{ms}-{int(seq) + 1}"


def final_records(r: redis.Redis, prefix: str = "tollgate:") -> dict[str, dict[str, Any]]:
    """The last record per request_id (the reconciliation rule)."""
    out: dict[str, dict[str, Any]] = {}
    for rec in stream_records(r, prefix):
        rid = rec.get("request_id")
        assert rid, f"record without request_id: {rec}"
        out.pop(rid, None)  # keep insertion order = order of the final entries
        out[rid] = rec
    return out


def counter_keys(r: redis.Redis, prefix: str = "tollgate:") -> list[str]:
    """Every budget counter hash (not its `:leases` zset)."""
    keys = []
    for k in r.scan_iter(match=f"{prefix}b:*", count=1000):
        key = k.decode()
        if not key.endswith(":leases"):
            keys.append(key)
    return sorted(keys)


def counter_spend(fields: Mapping[bytes, bytes]) -> int:
    """Settled spend of one counter hash: `spent` (calendar) or the sum of `b:<bucket>` (rolling)."""
    total = int(fields.get(b"spent", b"0"))
    total += sum(int(v) for f, v in fields.items() if f.startswith(b"b:"))
    return total


def live_leases(r: redis.Redis, prefix: str = "tollgate:") -> list[str]:
    """Everything that still pins money: one line per problem, [] when the books are closed."""
    problems = []
    for key in counter_keys(r, prefix):
        h = r.hgetall(key)
        reserved = int(h.get(b"reserved", b"0"))
        if reserved != 0:
            problems.append(f"{key}: reserved={reserved}")
        for f in h:
            if f.startswith(b"r:"):
                problems.append(f"{key}: live lease field {f.decode()}={int(h[f])}")
            elif f.startswith(b"m:") and b"x:" + f[2:] not in h and b"r:" + f[2:] not in h:
                problems.append(f"{key}: lease meta {f.decode()} left without a lease or tombstone")
    for k in r.scan_iter(match=f"{prefix}b:*:leases", count=1000):
        for member in r.zrange(k, 0, -1):
            if not member.startswith(b"x:"):
                problems.append(f"{k.decode()}: live lease member {member.decode()}")
    return problems


def outbox_pending(path: Path | None) -> int:
    """Settles waiting in an ext_proc's SQLite outbox (0 if it has none); given a state directory,
    in every worker's outbox there (`outbox-<port>.sqlite`, and a pre-workers `outbox.sqlite`)."""
    if path is None or not path.exists():
        return 0
    if path.is_dir():
        return sum(outbox_pending(f) for f in sorted(path.glob("outbox*.sqlite")))
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
    try:
        return int(db.execute("SELECT COUNT(*) FROM settles").fetchone()[0])
    except sqlite3.OperationalError:  # created but no table yet
        return 0
    finally:
        db.close()


def wait_closed(redis_url: str, *, prefix: str = "tollgate:", timeout: float = 10.0,
                outbox: Path | None = None) -> list[str]:
    """Wait (bounded) until no lease is live and the outbox is empty; returns what is still open."""
    r = _client(redis_url)
    deadline = time.monotonic() + timeout
    try:
        while True:
            try:
                problems = live_leases(r, prefix)
            except redis.RedisError as e:
                problems = [f"redis: {e}"]
            pending = outbox_pending(outbox)
            if pending:
                problems.append(f"outbox {outbox}: {pending} settles not replayed")
            if not problems or time.monotonic() > deadline:
                return problems
            time.sleep(0.1)
    finally:
        r.close()


@dataclass(frozen=True, eq=False)
class Counter:
    """A family of counters of one budget for one `per` value set (every period of it)."""

    budget: str
    per: Mapping[str, str] = field(default_factory=dict)
    # Also count records that name no budget at all (`budgets: []`) but carry the per values: a
    # looser join, for records that ought to name the budget and do not.
    unnamed: bool = False

    def _id(self) -> tuple[str, tuple[tuple[str, str], ...], bool]:
        return self.budget, tuple(self.per.items()), self.unnamed

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Counter) and self._id() == other._id()

    def __hash__(self) -> int:
        return hash(self._id())

    def key_matches(self, prefix: str, key: str) -> bool:
        start = f"{prefix}b:{self.budget}:"
        if not key.startswith(start):
            return False
        return key.rsplit(":", 1)[-1] == _per_key(self.per)

    def record_matches(self, rec: Mapping[str, Any]) -> bool:
        named = rec.get("budgets") or []
        if self.budget not in named and not (self.unnamed and not named):
            return False
        meta = rec.get("metadata") or {}
        for k, v in self.per.items():
            got = rec.get(k) if rec.get(k) is not None else meta.get(k)
            if isinstance(got, list):
                got = ",".join(sorted(got))
            if got != v:
                return False
        return True


def _per_key(per: Mapping[str, str]) -> str:
    if not per:
        return "_"
    return ",".join(f"{k}={quote(v, safe='@._-+')}" for k, v in per.items())


@dataclass
class Books:
    records: dict[str, dict[str, Any]]  # final record per request_id
    spend: dict[Counter, int]  # settled spend per named counter family
    charged: dict[Counter, int]  # sum of cost_nusd of the final records of each

    def of(self, counter: Counter) -> list[dict[str, Any]]:
        return [r for r in self.records.values() if counter.record_matches(r)]


def assert_books_balance(redis_url: str, *, prefix: str = "tollgate:", counters: Iterable[Counter] = (),
                         wait: float = 10.0, outbox: Path | None = None) -> Books:
    """No live lease anywhere (after waiting up to `wait` s for in-flight settles and the outbox),
    and for each named counter family, its spend equals the final records' `cost_nusd`."""
    open_ = wait_closed(redis_url, prefix=prefix, timeout=wait, outbox=outbox)
    assert not open_, "leases left after the requests ended:\n  " + "\n  ".join(open_[:50])
    r = _client(redis_url)
    try:
        records = final_records(r, prefix)
        keys = counter_keys(r, prefix)
        spend: dict[Counter, int] = {}
        charged: dict[Counter, int] = {}
        for c in counters:
            spend[c] = sum(counter_spend(r.hgetall(k)) for k in keys if c.key_matches(prefix, k))
            mine = [rec for rec in records.values() if c.record_matches(rec)]
            charged[c] = sum(int(rec.get("cost_nusd") or 0) for rec in mine)
            assert spend[c] == charged[c], (
                f"counter {c.budget} {dict(c.per)}: spend {spend[c]} nUSD != {charged[c]} nUSD over "
                f"{len(mine)} final records "
                f"(settlements: {_tally(rec.get('settlement') for rec in mine)})")
    finally:
        r.close()
    return Books(records, spend, charged)


def _tally(values: Iterable[Any]) -> dict[str, int]:
    out: dict[str, int] = {}
    for v in values:
        out[str(v)] = out.get(str(v), 0) + 1
    return out


# ---- the oracle: the fake provider's ledger, priced independently --------------------------

class Prices:
    """policies/prices.yaml read on its own: exact names win, then globs in file order."""

    def __init__(self, path: Path = PRICES) -> None:
        doc = yaml.safe_load(path.read_text())["prices"]
        models = doc["models"]
        self.tools = {k: Decimal(str(v)) for k, v in (doc.get("tools") or {}).items()}  # USD per call
        self._exact: dict[str, dict[str, Decimal]] = {}
        self._globs: list[tuple[str, dict[str, Decimal]]] = []
        today = datetime.now(timezone.utc).date()
        for name, entry in models.items():
            if isinstance(entry, list):  # dated rates: the row in force today (UTC)
                live = [e for e in entry if (e.get("effective") or date.min) <= today <= (e.get("until") or date.max)]
                if not live:
                    continue
                entry = live[0]
            rates = self._rates(entry)
            # rate tiers (`service_tier` flex / priority, Anthropic speed fast): their own rates,
            # the row's long-context tier unless they give one; inference_geo: a multiplier
            rates["tiers"] = {}
            for tier, t in (entry.get("tiers") or {}).items():
                tr = self._rates(t)
                if "long_context" not in tr and "long_context" in rates:
                    tr["long_context"] = rates["long_context"]
                rates["tiers"][tier] = tr
            rates["geo"] = {g: Decimal(str(m)) for g, m in (entry.get("inference_geo") or {}).items()}
            if any(ch in name for ch in "*?["):
                self._globs.append((name, rates))
            else:
                self._exact[name] = rates

    @staticmethod
    def _rates(entry: Mapping[str, Any]) -> dict[str, Any]:
        rates: dict[str, Any] = {k: Decimal(str(v)) for k, v in entry.items() if isinstance(v, (int, float))
                                 and not isinstance(v, bool)}
        if isinstance(entry.get("long_context"), dict):  # the rates past a prompt-size threshold
            rates["long_context"] = {k: Decimal(str(v)) for k, v in entry["long_context"].items()}
        return rates

    def rates(self, model: str) -> dict[str, Decimal]:
        if model in self._exact:
            return self._exact[model]
        for pattern, rates in self._globs:
            if fnmatch.fnmatchcase(model, pattern):
                return rates
        raise KeyError(f"no price for {model!r} in {PRICES}")

    def usd_m(self, model: str, *, input_tokens: int = 0, cached: int = 0, cache_write: int = 0,
              cache_write_1h: int = 0, output_tokens: int = 0, audio_input: int = 0, audio_output: int = 0,
              tier: str | None = None, geo: str | None = None) -> Decimal:
        """Tokens times USD per million tokens (short-TTL cache writes at `cache_write`, long-TTL at
        `cache_write_long`, each defaulting as the table's header says; the audio part of the input
        and output at `audio_input` / `audio_output`), at `tier`'s rates when the row has that tier
        (OpenAI's `default` and Anthropic's `standard` are the row's own), times the row's
        multiplier for `geo`."""
        row = self.rates(model)
        p = row["tiers"].get(tier, row) if tier else row
        lc = p.get("long_context")
        if lc is not None and input_tokens + cached + cache_write + cache_write_1h > lc["above_input_tokens"]:
            p = lc
        write = p.get("cache_write", p["input"])
        audio_in, audio_out = min(audio_input, input_tokens), min(audio_output, output_tokens)
        usd = ((input_tokens - audio_in) * p["input"] + audio_in * row.get("audio_input", p["input"])
               + cached * p.get("cached_input", p["input"]) + cache_write * write
               + cache_write_1h * p.get("cache_write_long", write)
               + (output_tokens - audio_out) * p["output"] + audio_out * row.get("audio_output", p["output"]))
        return usd * row["geo"].get(geo, Decimal(1)) if geo else usd

    def image_usd_m(self, ig: Mapping[str, Any]) -> Decimal:
        """An image generation tool's tokens at the image model's rates: text input / cached at
        `input` / `cached_input`, image input / cached at `image_input` / `cached_image_input`,
        image output at `image_output`, text output at `output`."""
        p = self.rates(ig["model"])
        cached = p.get("cached_input", p["input"])
        return (ig["text_input"] * p["input"] + ig["cached_text_input"] * cached
                + ig["image_input"] * p.get("image_input", p["input"])
                + ig["cached_image_input"] * p.get("cached_image_input", cached)
                + ig["image_output"] * p.get("image_output", p["output"]) + ig["text_output"] * p["output"])

    def cost_nusd(self, model: str, **tokens: int) -> int:
        """USD per million tokens = 1000 nano-USD per token; rounded up to a whole nano-USD."""
        return int((self.usd_m(model, **tokens) * 1000).to_integral_value(ROUND_CEILING))

    def ledger_cost(self, entry: Mapping[str, Any]) -> int:
        """What the fake billed for one ledger entry: its top-level tokens at the model's rates
        (cache writes by TTL: Anthropic 5 m / 1 h, OpenAI 30 m / 12 h; compaction included),
        each `other_models` entry at that model's rates, and per-call tool fees."""
        long = entry.get("cache_write_1h", 0) + entry.get("cache_write_12h", 0)
        tier, geo = entry.get("service_tier"), entry.get("inference_geo")
        usd_m = self.usd_m(entry["model"], input_tokens=entry["input_tokens"], cached=entry["cached"],
                           cache_write=entry["cache_write"] - long, cache_write_1h=long,
                           output_tokens=entry["output_tokens"], audio_input=entry.get("audio_input_tokens", 0),
                           audio_output=entry.get("audio_output_tokens", 0), tier=tier, geo=geo)
        for other in entry.get("other_models") or ():  # same geo; the tier where that model has it
            usd_m += self.usd_m(other["model"], input_tokens=other["input_tokens"], cached=other.get("cached", 0),
                                cache_write=other.get("cache_write_5m", 0), cache_write_1h=other.get("cache_write_1h", 0),
                                output_tokens=other["output_tokens"], tier=tier, geo=geo)
        if entry.get("image_gen"):
            usd_m += self.image_usd_m(entry["image_gen"])
        for kind, n in (entry.get("tool_calls") or {}).items():
            usd_m += n * self.tools.get(kind, Decimal(0)) * 1_000_000
        return int((usd_m * 1000).to_integral_value(ROUND_CEILING))


def fake_ledger(fake_port: int, **filters: str) -> list[dict[str, Any]]:
    r = httpx.get(f"http://127.0.0.1:{fake_port}/_fake/ledger", params=filters, timeout=10)
    r.raise_for_status()
    return r.json()


def clear_fake_ledger(fake_port: int) -> None:
    httpx.delete(f"http://127.0.0.1:{fake_port}/_fake/ledger", timeout=10).raise_for_status()


def _billed(entry: Mapping[str, Any]) -> bool:
    tokens = entry["input_tokens"] + entry["output_tokens"] + entry["cached"] + entry["cache_write"]
    return 200 <= entry["status"] < 300 and tokens > 0


def assert_served_were_charged(records: Mapping[str, Mapping[str, Any]], ledger: Iterable[Mapping[str, Any]],
                               prices: Prices | None = None) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """Every ledger entry the provider billed has a final record charging more than $0; where the
    record has no `estimate`, it charges exactly the ledger's tokens. Returns (entry, record) pairs."""
    prices = prices or Prices()
    by_envoy: dict[str, list[Mapping[str, Any]]] = {}
    for rec in records.values():
        if rec.get("envoy_request_id"):
            by_envoy.setdefault(rec["envoy_request_id"], []).append(rec)
    pairs = []
    uncharged, wrong = [], []
    for entry in ledger:
        if not _billed(entry):
            continue
        recs = by_envoy.get(entry["request_id"], [])
        assert len(recs) <= 1, f"one provider request, several request_ids: {recs}"
        rec = recs[0] if recs else None
        if rec is None or int(rec.get("cost_nusd") or 0) <= 0:
            uncharged.append((entry, rec))
            continue
        if rec.get("estimate") is None:
            want = prices.ledger_cost(entry)
            if int(rec["cost_nusd"]) != want:
                wrong.append((entry, rec, want))
        pairs.append((dict(entry), dict(rec)))
    assert not uncharged, (f"{len(uncharged)} requests the provider billed were charged $0 (or never recorded); "
                           f"first: ledger {uncharged[0][0]} record {uncharged[0][1]}")
    assert not wrong, (f"{len(wrong)} records without an estimate charge other than the provider's usage; first: "
                       f"ledger {wrong[0][0]} priced {wrong[0][2]} nUSD, record {wrong[0][1]}")
    return pairs


def books_and_ledger(redis_url: str, fake_port: int, *, counters: Iterable[Counter], prefix: str = "tollgate:",
                     wait: float = 10.0, outbox: Path | None = None, ledger_filter: Mapping[str, str] | None = None,
                     hook: tuple[str, str] | None = None) -> tuple[Books, list[dict[str, Any]]]:
    """Both checks at once: the books balance, and the ledger's billed requests (optionally only those
    sent with fake hook header `hook` = (name, value)) were charged."""
    books = assert_books_balance(redis_url, prefix=prefix, counters=counters, wait=wait, outbox=outbox)
    ledger = fake_ledger(fake_port, **(ledger_filter or {}))
    if hook is not None:
        ledger = [e for e in ledger if e.get("hooks", {}).get(hook[0]) == hook[1]]
    assert_served_were_charged(books.records, ledger)
    return books, ledger
