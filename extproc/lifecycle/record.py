"""The attribution record: one per request, the single source for "who spent what".

Fields are added, never renamed, so log pipelines keep working. Finance reconciles with one rule:
per `request_id`, the last record wins (a lease that expired into a charge is recorded by Redis
as `settlement: lease_expired`; if the real settle comes later, its record supersedes it), and the
sum of `cost_nusd` over those equals the budget counters and the usage rollups.
"""

from __future__ import annotations

import time
from datetime import datetime, timezone
from typing import Any

from typing import TYPE_CHECKING

from ..pricing import NANO_PER_USD, Usage
from ..usage import LeaseMetaTemplate, lease_meta
from .context import RequestContext

if TYPE_CHECKING:
    from ..identity import Identity


_NO_IDENTITY: dict[str, Any] = {"user": None, "email": None, "groups": [], "team": None, "app": None,
                                "service_token": None, "auth_source": None}


def identity_fields(i: "Identity | None") -> tuple[dict[str, Any], dict[str, Any]]:
    """The identity's part of the record, and of the access log's metadata (groups joined):
    worked out once per identity, since nearly every request repeats one an earlier request had
    (an API key's or a cached JWT's Identity object). Callers copy them, never change them.

    Keyed by the object's id, holding the object so its id cannot be reused while cached."""
    if i is None:
        return _NO_IDENTITY, {}
    hit = _BY_IDENTITY.get(id(i))
    if hit is not None and hit[0] is i:
        return hit[1], hit[2]
    record = {"user": i.user, "email": i.email, "groups": list(i.groups), "team": i.team, "app": i.app,
              "service_token": i.service_token, "auth_source": i.source}
    meta = {**record, "groups": ",".join(i.groups)}
    if len(_BY_IDENTITY) >= _BY_IDENTITY_MAX:
        _BY_IDENTITY.clear()  # many distinct identities: start over rather than grow
    _BY_IDENTITY[id(i)] = (i, record, meta)
    return record, meta


_BY_IDENTITY: dict[int, tuple["Identity", dict[str, Any], dict[str, Any]]] = {}
_BY_IDENTITY_MAX = 4096


def now_ts() -> str:
    """Now in UTC as the record's `ts`: what `datetime.now(timezone.utc).isoformat(timespec=
    "milliseconds")` gives, with the date and time up to the second formatted once per second
    (4.2 us against about 1 on the 2-core VM; two records' worth per request)."""
    us = (time.time_ns() + 500) // 1000  # to the microsecond, as datetime rounds
    sec, frac = divmod(us, 1_000_000)
    if sec != _SECOND[0]:
        _SECOND[:] = [sec, datetime.fromtimestamp(sec, timezone.utc).isoformat(timespec="seconds")[:-6]]
    return f"{_SECOND[1]}.{frac // 1000:03d}+00:00"


_SECOND: list[Any] = [None, ""]  # [epoch second, its "YYYY-MM-DDTHH:MM:SS"]


def _priced_as(ctx: RequestContext, model: str | None = None) -> str | None:
    """The price-table entry the admitted model was priced by (a name, a glob, or "default")."""
    if model is None:
        adm = ctx.admission
        model = adm.model if adm is not None and adm.admitted else (ctx.req.model if ctx.req else None)
    return ctx.config.prices.entry_name(model) if model else None


def _request(ctx: RequestContext) -> dict[str, Any]:
    adm = ctx.admission
    return {
        "ts": now_ts(),
        "request_id": ctx.request_id,
        "envoy_request_id": ctx.envoy_request_id,
        "client_request_id": ctx.client_request_id,
        **identity_fields(ctx.identity)[0],
        "metadata": ctx.metadata,
        "api": ctx.api.name if ctx.api else None,
        "provider": ctx.provider,
        "model_requested": ctx.req.model if ctx.req else None,
        "model_served": ctx.model_served,
        "priced_as": _priced_as(ctx),
        "decision": ctx.decision,
        "reason": ctx.decision_reason,
        "budgets": adm.budgets if adm else [],
        "warnings": [w.name for w in adm.warnings] if adm else [],
        "shadow_blocked": [st.name for st in adm.shadow_blocked] if adm else [],
        "reserved_usd": adm.reserved_nusd / NANO_PER_USD if adm else 0.0,
        "budget_store_error": bool(adm and adm.store_error),
        "stream": ctx.streamed,
        "cache": ctx.cache,  # hit | miss | skip | off (extproc/cache/)
    }


def lease_record(ctx: RequestContext, *, model: str, provider: str, budgets: list[str],
                 reserved_nusd: int) -> dict[str, Any]:
    """The record Redis writes if this lease expires unsettled (it adds settlement, end, estimate,
    complete and the cost): built by the engine for the candidate it reserves, since the
    admission (downgraded model, budgets, amount) is not known before the reserve."""
    return {**_request(ctx), "provider": provider, "model_served": model, "priced_as": _priced_as(ctx, model),
            "budgets": budgets,
            "reserved_usd": reserved_nusd / NANO_PER_USD, "status": 0}


_LEASE_VARYING = ("ts", "request_id", "envoy_request_id", "client_request_id", "metadata", "reserved_usd")
"""What a lease's record holds that differs between requests of one identity, model and decision."""


def lease_meta_of(ctx: RequestContext, *, model: str, provider: str, budgets: list[str], reserved_nusd: int) -> bytes:
    """`lease_meta(lease_record(...))`, from a template per identity, policy, model and budgets
    (extproc/usage.py `LeaseMetaTemplate`): only the fields in `_LEASE_VARYING` are encoded per
    request. Before the reservation is known (`ctx.admission` unset, as during every reserve) every
    other field of the lease's record is fixed by the key; otherwise the record is built whole."""
    bound = ctx.config.stream_bound
    if ctx.admission is not None:
        return lease_meta(lease_record(ctx, model=model, provider=provider, budgets=budgets,
                                       reserved_nusd=reserved_nusd), bound=bound)
    key = (id(ctx.identity), id(ctx.config), ctx.api.name if ctx.api else None, ctx.req.model if ctx.req else None,
           model, provider, tuple(budgets), ctx.decision, ctx.decision_reason, ctx.streamed, ctx.cache)
    hit = _LEASE_TEMPLATES.get(key)
    if hit is None or hit[0] is not ctx.identity or hit[1] is not ctx.config:
        if len(_LEASE_TEMPLATES) >= _LEASE_TEMPLATES_MAX:
            _LEASE_TEMPLATES.clear()  # many distinct combinations: start over rather than grow
        record = lease_record(ctx, model=model, provider=provider, budgets=budgets, reserved_nusd=reserved_nusd)
        hit = _LEASE_TEMPLATES[key] = (ctx.identity, ctx.config, LeaseMetaTemplate(record, _LEASE_VARYING, bound=bound))
    return hit[2].render({"ts": now_ts(), "request_id": ctx.request_id, "envoy_request_id": ctx.envoy_request_id,
                          "client_request_id": ctx.client_request_id, "metadata": ctx.metadata,
                          "reserved_usd": reserved_nusd / NANO_PER_USD})


# Keyed by the identity's and the config's ids, holding both so their ids cannot be reused.
_LEASE_TEMPLATES: dict[tuple[Any, ...], tuple[Any, Any, LeaseMetaTemplate]] = {}
_LEASE_TEMPLATES_MAX = 4096


def build_record(ctx: RequestContext, usage: Usage | None, cost_nusd: int, *, complete: bool, end: str,
                 estimate: str | None = None, overrun_nusd: int = 0) -> dict[str, Any]:
    """The record of a request that ended (settled, released or refused). It carries no
    `settlement`: the settle script adds what happened, and the caller adds it for the sinks."""
    u = usage or Usage()
    return {
        **_request(ctx),
        "error_code": ctx.error_code,
        "gateway_error": ctx.gateway_error,
        "complete": complete,
        "end": end,
        "estimate": estimate,
        "overrun_usd": overrun_nusd / NANO_PER_USD,
        "usage_source": "provider" if (usage is not None and estimate is None) else (
            f"estimate:{estimate}" if estimate else None),
        "input_tokens": u.input_tokens,
        "cached_input_tokens": u.cached_input_tokens,
        "cache_write_tokens": u.cache_write_tokens,
        "cache_write_long_tokens": u.cache_write_long_tokens,
        "output_tokens": u.output_tokens,
        "reasoning_tokens": u.reasoning_tokens,
        "tool_calls": dict(u.tool_calls),
        "other_models": [{"model": m, "input_tokens": x.input_tokens, "cached_input_tokens": x.cached_input_tokens,
                          "cache_write_tokens": x.cache_write_tokens,
                          "cache_write_long_tokens": x.cache_write_long_tokens, "output_tokens": x.output_tokens}
                         for m, x in u.other_models],
        # rate modifiers and the kinds billed at their own rates (docs/pricing.md)
        "service_tier": u.tier or (ctx.price.tier_name if ctx.price is not None else None),
        "inference_geo": u.inference_geo,
        "audio_input_tokens": u.audio_input_tokens,
        "audio_output_tokens": u.audio_output_tokens,
        "image_generation": [{"model": i.model, "input_tokens": i.input_tokens, "output_tokens": i.output_tokens}
                             for i in u.image_gen],
        "fallback_credit": u.fallback_credit,
        "cost_usd": cost_nusd / NANO_PER_USD,
        "cost_nusd": cost_nusd,
        "status": ctx.status,
        "latency_ms": round((time.monotonic() - ctx.started) * 1000, 3),
    }
