"""One request's use of the response cache, called from the processor's phases.

    request headers   read_headers   x-tollgate-cache / -ttl / -key (a bad value is a 400); the
                                     processor strips them with every other x-tollgate-* header
    request body      lookup         after identity, model access and the budget reservation: the
                                     rule, the key, one GET. A hit is answered by `answer` (an
                                     ImmediateResponse; the provider is never called)
    response headers  on_response_headers / status   the content type; `x-tollgate-cache`
    response body     feed, store    a miss collects the body as it passes (up to the rule's
                                     max_entry_bytes) and, once settled complete, writes it once

`status` is what the response's `x-tollgate-cache` header and the record's `cache` field say:

    off   no rule enables the cache for this request (the default: no `cache:` section)
    skip  a rule matches, but this request neither reads nor writes: `x-tollgate-cache: skip`,
          an `uncachable` condition, or no attribute for the rule's scope
    miss  looked up, not found: the answer is written if it ends complete
    hit   answered from the cache

The cache never fails a request: a Redis error on the lookup is a miss (metric
`tollgate_redis_errors_total{op="cache_get"}`), one on the write is dropped (`cache_put`).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from fnmatch import fnmatchcase
from typing import TYPE_CHECKING, Any

from .. import messages as msg
from ..attrs import where_matches
from ..budgets import replies as budget_replies
from ..budgets.money import NANO_PER_USD
from ..errors import bad_request
from . import key as cache_key
from . import store
from .policy import CacheRule, uncachable_reason

if TYPE_CHECKING:
    import redis.asyncio as aredis
    from envoy.service.ext_proc.v3.external_processor_pb2 import ProcessingResponse

    from ..budgets.pipe import ScriptPipe
    from ..lifecycle.context import RequestContext
    from ..lifecycle.settler import Settler
    from ..metrics import Metrics

log = logging.getLogger("tollgate.cache")

CACHE_HEADER = "x-tollgate-cache"  # request: `skip`; response: hit | miss | skip | off
TTL_HEADER = "x-tollgate-cache-ttl"
KEY_HEADER = "x-tollgate-cache-key"
MAX_CUSTOM_KEY = 1024
PREFIX = "tollgate:"
# Usage fields an entry keeps of its original response (the hit's record reports them as avoided).
_USAGE_FIELDS = ("input_tokens", "cached_input_tokens", "cache_write_tokens", "cache_write_long_tokens",
                 "output_tokens", "reasoning_tokens")


def select(rules: list[CacheRule] | tuple[CacheRule, ...], attrs: dict[str, Any], *, model: str | None,
           provider: str | None, path: str) -> CacheRule | None:
    """The first rule whose match holds for this request (models / providers: the served ones)."""
    for rule in rules:
        m = rule.match
        if m.models is not None and not (model and any(fnmatchcase(model, g) for g in m.models)):
            continue
        if m.providers is not None and not (provider and any(fnmatchcase(provider, g) for g in m.providers)):
            continue
        if m.paths is not None and not any(fnmatchcase(path, g) for g in m.paths):
            continue
        if where_matches(m.where, attrs):
            return rule
    return None


def _select_for(ctx: RequestContext, rules: list[CacheRule] | tuple[CacheRule, ...]) -> CacheRule | None:
    """`select` for this request, kept per rules, identity, model, provider and path: a request
    without custom metadata has its identity's attributes, and nearly every request repeats the
    identity and model of an earlier one (the rules' globs and conditions cost about 4 us a
    request, most of them for requests no rule applies to)."""
    path = ctx.path.split("?", 1)[0]
    if ctx.metadata:  # custom attributes (x-tollgate-metadata) vary per request
        return select(rules, ctx.attrs(), model=ctx.model_served, provider=ctx.provider, path=path)
    key = (id(rules), id(ctx.identity), ctx.model_served, ctx.provider, path)
    hit = _SELECTED.get(key)
    if hit is not None and hit[0] is rules and hit[1] is ctx.identity:
        return hit[2]
    rule = select(rules, ctx.attrs(), model=ctx.model_served, provider=ctx.provider, path=path)
    if len(_SELECTED) >= _SELECTED_MAX:
        _SELECTED.clear()  # many distinct identities: start over rather than grow
    _SELECTED[key] = (rules, ctx.identity, rule)
    return rule


# Keyed by the rules' and the identity's ids, holding both so their ids cannot be reused.
_SELECTED: dict[tuple[Any, ...], tuple[Any, Any, CacheRule | None]] = {}
_SELECTED_MAX = 4096


class CacheFlow:
    """The cache's part in one request (one per Processor)."""

    __slots__ = (
        "_chunks",
        "_content_type",
        "_custom",
        "_size",
        "_skip",
        "_ttl",
        "key",
        "metrics",
        "reason",
        "redis",
        "rule",
        "status",
    )

    def __init__(self, redis: "aredis.Redis | ScriptPipe | None", metrics: Metrics) -> None:
        self.redis = redis  # the gateway's script pipe when it has one (extproc/cache/store.py)
        self.metrics = metrics
        self.status = "off"
        self.reason: str | None = None  # why `skip`
        self.rule: CacheRule | None = None
        self.key: str | None = None
        self._skip = False
        self._ttl: int | None = None
        self._custom: str | None = None
        self._chunks: list[bytes] | None = None  # a miss collecting its answer; None: not writing
        self._size = 0
        self._content_type = ""

    # ---- request headers ------------------------------------------------------------------
    def read_headers(self, headers: dict[str, str]) -> None:
        """The client's per-request controls; a malformed one is a 400 (the processor strips them
        all, like every x-tollgate-* header, before the request goes anywhere)."""
        v = headers.get(CACHE_HEADER)
        if v is not None:
            if v.strip().lower() != "skip":
                raise bad_request(f"{CACHE_HEADER} accepts `skip` only (got {v!r}).", code="invalid_cache_header",
                                  param=CACHE_HEADER)
            self._skip = True
        v = headers.get(TTL_HEADER)
        if v is not None:
            v = v.strip()
            if not (v.isascii() and v.isdigit() and len(v) <= 9) or int(v) <= 0:
                raise bad_request(f"{TTL_HEADER} must be a whole number of seconds above 0 (got {v!r}).",
                                  code="invalid_cache_header", param=TTL_HEADER)
            self._ttl = int(v)
        v = headers.get(KEY_HEADER)
        if v is not None:
            if not v or len(v) > MAX_CUSTOM_KEY:
                raise bad_request(f"{KEY_HEADER} must be 1 to {MAX_CUSTOM_KEY} characters.",
                                  code="invalid_cache_header", param=KEY_HEADER)
            self._custom = v

    # ---- request body -----------------------------------------------------------------------
    async def lookup(self, ctx: RequestContext) -> store.Entry | None:
        """Once the request is admitted: which rule, which key, and the entry if there is one."""
        rules = ctx.config.doc.cache
        if not rules or self.redis is None or ctx.req is None or ctx.api is None or ctx.provider is None:
            return None
        rule = _select_for(ctx, rules)
        if rule is None or not rule.enabled:
            return None
        self.rule = rule
        entry = await self._lookup(ctx, rule, ctx.attrs())
        ctx.cache = self.status
        return entry

    async def _lookup(self, ctx: RequestContext, rule: CacheRule, attrs: dict[str, Any]) -> store.Entry | None:
        assert ctx.req is not None and ctx.api is not None and ctx.provider is not None
        self.status = "skip"
        if self._skip:
            self.reason = "header"
            return None
        why = uncachable_reason(rule, ctx.req.body)
        if why is not None:
            self.reason = f"uncachable:{why}"
            return None
        scope = cache_key.scope_part(rule.scope, attrs)
        if scope is None:
            self.reason = f"no_{rule.scope}"
            return None
        try:
            digest = cache_key.digest(api=ctx.api.name, provider=ctx.provider, model=ctx.model_served or "",
                                      stream=ctx.req.stream, body=ctx.req.body, custom=self._custom,
                                      ignore=rule.ignore_fields)
        except cache_key.Uncanonical:
            self.reason = "uncanonical_body"
            return None
        self.key = store.redis_key(PREFIX, scope, digest)
        self.status = "miss"
        assert self.redis is not None
        try:
            entry = await store.get(self.redis, self.key)
        except Exception as e:  # noqa: BLE001 - Redis down or slow: a miss (the write then fails as quietly)
            log.debug("cache lookup of %s failed: %s", ctx.request_id, e)
            self.metrics.redis_error("cache_get")
            entry = None
        if entry is not None and entry.stream == ctx.req.stream and 200 <= entry.status < 300:
            self.status = "hit"
            return entry
        self._chunks = []
        return None

    async def answer(self, entry: store.Entry, ctx: RequestContext, settler: Settler, headers: dict[str, str],
                     request_meta: dict[str, Any]) -> ProcessingResponse:
        """Answer a hit: $0, the lease settled at 0 with the record (Settler.cached), and the
        stored body as an ImmediateResponse, exactly as the provider's answer reached the first client."""
        ctx.streamed, ctx.status = entry.stream, entry.status
        ctx.model_served = entry.model or ctx.model_served
        assert self.rule is not None
        record = settler.cached({
            "cache_rule": self.rule.name, "cached_from": entry.request_id,
            "cache_age_seconds": round(max(0.0, time.time() - entry.created), 3),
            "avoided_cost_usd": entry.cost_nusd / NANO_PER_USD, "avoided_cost_nusd": entry.cost_nusd,
            "avoided_usage": dict(entry.usage)})
        out = {**headers, **_released_budget_headers(ctx), "content-type": entry.content_type,
               "x-tollgate-cost-usd": "0", "x-tollgate-cache-avoided-usd": _usd(entry.cost_nusd)}
        meta = msg.metadata({**request_meta, **{k: record[k] for k in ("model_served", "decision", "cost_usd", "status",
                                                                          "cache") if k in record},
                             "avoided_cost_usd": record["avoided_cost_usd"]})
        return msg.immediate(entry.status, entry.body, out, details="tollgate_cache_hit", meta=meta)

    # ---- response ------------------------------------------------------------------------------
    def on_response_headers(self, headers: dict[str, str]) -> None:
        if self._chunks is not None:
            self._content_type = headers.get("content-type", "")

    def feed(self, chunk: bytes) -> None:
        """A piece of a miss's response body, as it passes to the client."""
        if self._chunks is None or not chunk:
            return
        self._size += len(chunk)
        assert self.rule is not None
        if self._size > self.rule.max_entry_bytes:
            self._chunks = None  # too large: served, never cached
            self.metrics.cache_write("too_large")
            return
        self._chunks.append(chunk)

    async def store(self, ctx: RequestContext, record: dict[str, Any]) -> str | None:
        """After a miss has settled: write its answer if it is one to keep. Returns the outcome
        (stored | exists | not_cacheable | error), None when there was nothing to write."""
        chunks, self._chunks = self._chunks, None
        if chunks is None or self.key is None or self.rule is None or self.redis is None:
            return None
        if not (200 <= ctx.status < 300 and record.get("complete") is True and record.get("end") == "completed"
                and record.get("estimate") is None and ctx.gateway_error is None and chunks):
            outcome = "not_cacheable"  # an error, an incomplete or cut stream, a body without usage
        else:
            entry = store.Entry(status=ctx.status, content_type=self._content_type or (
                "text/event-stream" if ctx.streamed else "application/json"), stream=ctx.streamed,
                model=record.get("model_served"), provider=ctx.provider, cost_nusd=int(record.get("cost_nusd") or 0),
                request_id=ctx.request_id, created=time.time(), body=b"".join(chunks),
                usage={f: int(record.get(f) or 0) for f in _USAGE_FIELDS})
            ttl = min(self._ttl, self.rule.max_ttl_seconds) if self._ttl is not None else self.rule.ttl_seconds
            try:
                outcome = "stored" if await store.put(self.redis, self.key, entry, ttl) else "exists"
            except Exception as e:  # noqa: BLE001 - a lost write costs a later miss, never the request
                log.debug("cache write of %s failed: %s", ctx.request_id, e)
                self.metrics.redis_error("cache_put")
                outcome = "error"
        self.metrics.cache_write(outcome)
        return outcome


def _usd(nusd: int) -> str:
    return f"{nusd / NANO_PER_USD:.9f}".rstrip("0").rstrip(".") or "0"


def _released_budget_headers(ctx: RequestContext) -> dict[str, str]:
    """The budget headers as they stand once the hit's reservation is gone (the processor's are
    computed with it held)."""
    adm = ctx.admission
    t = adm.tightest if adm is not None else None
    if adm is None or t is None or not adm.counters:
        return {}
    reserved = max(0, t.reserved_nusd - adm.reserved_nusd)
    t = dataclasses.replace(t, reserved_nusd=reserved,
                            remaining_nusd=max(0, t.limit_nusd - t.spent_nusd - reserved))
    return budget_replies.status_headers(t)


__all__ = ["CACHE_HEADER", "CacheFlow", "select"]
