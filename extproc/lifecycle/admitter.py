"""Admission: the pre-budget checks, then the worst case reserved on every matching budget.

The reserve call runs as its own task and the caller waits on it through a future (protect.py): when
the client goes away mid-admission, grpc.aio cancels the stream's handler, but the reserve (which
may already have run in Redis) finishes, and `Settler.close` releases what it reserved. Without
this, a cancel at that await left the lease pinned until it expired.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .. import decide
from ..budgets import Admission, BudgetEngine
from ..budgets import replies as budget_replies
from ..metrics import Metrics
from .context import RequestContext, State
from .protect import start_protected
from .record import lease_meta_of

if TYPE_CHECKING:
    from ..budgets.engine import CostFn, ProviderOf
    from ..config import Config
    from ..providers import Api

MIN_OUTPUT_TOKENS = 16
"""The smallest output cap a clamp may leave a request."""


class Admitter:
    """Decides whether a parsed request may go upstream, and with which model and output cap."""

    def __init__(self, engine: BudgetEngine | None, metrics: Metrics) -> None:
        self.engine = engine
        self.metrics = metrics

    async def admit(self, ctx: RequestContext) -> bool:
        """Check, reserve, and apply a downgrade or clamp to `ctx.req.body`.

        Returns True when the body changed. Raises GatewayError on a refusal (ctx stays NEW, or
        goes ADMITTING -> REFUSED with nothing held)."""
        api, req = ctx.api, ctx.req
        assert api is not None and req is not None
        attrs = ctx.attrs()
        cand = decide.check(ctx.config, api, req.model, req.output_cap, attrs, ctx.path, req.choices, req.server_tools,
                            req.advisors, tier=req.tier, inference_geo=req.inference_geo, unbounded=req.unbounded)
        ctx.price, ctx.provider, ctx.model_served = cand.price, cand.provider, req.model
        if self.engine is None:
            return False
        ctx.to(State.ADMITTING)
        adm = ctx.admission = await self._reserve(ctx, attrs, cand.cap, cand.cost_fn, cand.provider_of, cand.provider)
        if adm.store_error:
            self.metrics.redis_error("admit")
        if not adm.admitted:
            ctx.to(State.REFUSED)
            if adm.limited is not None:
                raise budget_replies.rate_limited(adm, api)
            if adm.decision == "blocked":
                raise budget_replies.blocked(adm, req.model, cand.cost_fn(req.model, req.input_tokens_upper, cand.cap))
            raise budget_replies.store_unavailable()
        ctx.to(State.RESERVED)
        ctx.decision, ctx.decision_reason = adm.decision, adm.reason or None
        changed = False
        if adm.model != req.model:
            api.set_model(req.body, adm.model)
            ctx.provider, ctx.model_served = adm.provider, adm.model
            ctx.price = ctx.config.prices.lookup(adm.model)
            changed = True
        if api.has_output and adm.max_output_tokens < cand.cap:
            api.set_output_cap(req.body, adm.max_output_tokens)
            changed = True
        return changed

    async def preview(self, config: "Config", api: "Api", model: str, output_cap: int | None,
                      attrs: dict[str, str | list[str]], path: str,
                      input_tokens: int) -> "tuple[decide.Candidate, Admission | None]":
        """What `admit` would decide for such a request, reserving nothing (the admin API's dry
        run): the same checks (GatewayError on a refusal) and the engine's own decision logic on
        read-only counter reads. None when no budget engine runs."""
        cand = decide.check(config, api, model, output_cap, attrs, path)
        if self.engine is None:
            return cand, None
        adm = await self.engine.dry_run(attrs=attrs, model=model, provider=cand.provider, input_tokens=input_tokens,
                                        max_output_tokens=cand.cap, min_output_tokens=min(MIN_OUTPUT_TOKENS, cand.cap),
                                        cost_fn=cand.cost_fn, provider_of=cand.provider_of)
        return cand, adm

    async def _reserve(self, ctx: RequestContext, attrs: dict[str, str | list[str]], cap: int,
                       cost_fn: "CostFn", provider_of: "ProviderOf", provider: str) -> Admission:
        assert self.engine is not None and ctx.req is not None
        gw_conf = ctx.config.gateway
        task, result = start_protected(self.engine.admit(
            request_id=ctx.request_id, attrs=attrs, model=ctx.req.model, provider=provider,
            input_tokens=ctx.req.input_tokens_upper, max_output_tokens=cap,
            min_output_tokens=min(MIN_OUTPUT_TOKENS, cap), cost_fn=cost_fn, provider_of=provider_of,
            lease_seconds=gw_conf.request_timeout_seconds + gw_conf.lease_grace_seconds,
            meta=lambda model, prov, names, reserved: lease_meta_of(
                ctx, model=model, provider=prov, budgets=names, reserved_nusd=reserved)))
        # Kept until the request ends: a cancel can land after the reserve finished but before this
        # coroutine resumed, and Settler.close must still find (and release) what it reserved.
        ctx.pending_admit = task
        return await result
