"""The checks every LLM request passes before budgets: price, route, model access.

Shared by the request path (extproc/processor.py) and the admin API's dry run, so a dry run
answers exactly what a real request would get.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from . import access
from .attrs import Attrs
from .config import Config
from .errors import GatewayError
from .pricing import ModelPrice
from .providers import Api


@dataclass(slots=True)
class Candidate:
    """A request that passed the checks: where it goes, what it may cost, and how to price fallbacks."""

    model: str
    price: ModelPrice
    provider: str
    cap: int  # output tokens the worst case assumes: the client's cap, else the model's maximum
    cost_fn: Callable[[str, int, int], int | None]  # (model, input, output tokens) -> worst-case nano-USD
    provider_of: Callable[[str], str | None]  # a downgrade fallback's provider, None if not usable


def check(config: Config, api: Api, model: str, output_cap: int | None, attrs: Attrs, path: str,
          choices: int = 1, server_tools: dict[str, int] | None = None,
          advisors: list[tuple[str, int, int | None]] | None = None, *, tier: str | None = None,
          inference_geo: str | None = None, unbounded: Sequence[str] = ()) -> Candidate:
    """Raise GatewayError (400 unpriced, 400 unroutable, 400 unbounded under `gateway.bounds.
    unbounded: refuse`, 403 not allowed) or return the candidate. `choices` (chat's `n`)
    multiplies the output the worst case pays for; `server_tools` (kind -> most calls) adds their
    per-call fees; `tier` / `inference_geo` (what the request asks for, docs/pricing.md) choose
    the rates of the bound and of the candidate's price (a response that says nothing is charged
    at them); `unbounded` names what the bound takes from a policy allowance."""
    prices, rules = config.prices, config.doc.access
    bounds = config.gateway.bounds
    base = prices.lookup(model)
    if base is None:
        raise GatewayError(400, f"The model `{model}` has no price in Tollgate's price table, so it "
                           "cannot be budgeted. Ask your platform team to add it.",
                           code="model_not_found", param="model")
    unbounded = list(unbounded)

    def rated(p: ModelPrice, m: str) -> ModelPrice:
        """`p` at the request's tier and geo; a tier it has no rates for is bounded at the stated
        multiplier over its own rates (and named as unbounded)."""
        r = p.rates(tier, inference_geo)
        if r.tier_priced:
            return r
        if m == model:
            unbounded.append(f"service tier `{tier}` has no rates for `{m}` in the price table "
                             f"(gateway.bounds.unpriced_tier_multiplier: {bounds.unpriced_tier_multiplier})")
        return r.unpriced_scaled(bounds.unpriced_tier_multiplier)

    price = rated(base, model)
    provider = config.route(model, api.wire)
    if provider is None:
        raise GatewayError(400, f"No provider is configured to serve `{model}` on {path}.",
                           code="model_not_routable", param="model")
    if rules and not access.allowed(rules, attrs, model):
        raise access.refusal(rules, attrs, model, prices.names())

    if unbounded and bounds.unbounded == "refuse":
        raise GatewayError(400, "This request has no upper bound on its cost that Tollgate can read from it: "
                           + "; ".join(unbounded) + ". The gateway's policy refuses such requests "
                           "(gateway.bounds.unbounded: refuse).", code="unbounded_request")

    fees = prices.tool_fees_nusd(server_tools or {})
    consulted = []
    for adv, uses, adv_cap in advisors or ():
        adv_price = prices.lookup(adv)
        if adv_price is None:
            raise GatewayError(400, f"The model `{adv}` this request lets the provider run (an advisor, a fallback "
                               "or an image model) has no price in Tollgate's price table, so the request cannot "
                               "be budgeted.", code="model_not_found", param="tools")
        adv_price = rated(adv_price, adv) if tier in adv_price.tiers else adv_price.rates(None, inference_geo)
        consulted.append((adv_price, uses, adv_price.max_output_tokens if adv_cap is None else adv_cap))

    def advice_nusd(input_tokens: int) -> int:
        """Each advisor call reads the conversation (at most the request's input bound plus the
        worker's whole output) and writes up to its cap."""
        return sum(uses * p.worst_case_nusd(input_tokens, min(cap, p.max_output_tokens)) for p, uses, cap in consulted)

    def cost_fn(m: str, input_tokens: int, output_tokens: int) -> int | None:
        """The worst case of `output_tokens` per completion, for each completion asked for, plus
        the fees of every server tool call the request allows."""
        p = prices.lookup(m)
        if p is None:
            return None
        p = rated(p, m)
        return p.worst_case_nusd(input_tokens, min(output_tokens, p.max_output_tokens) * choices) + fees + advice_nusd(
            input_tokens + output_tokens)

    def provider_of(m: str) -> str | None:
        # A fallback must be priced, routable for this wire format, and allowed for this caller.
        if prices.lookup(m) is None or (rules and not access.allowed(rules, attrs, m)):
            return None
        return config.route(m, api.wire)

    cap = (price.max_output_tokens if output_cap is None else output_cap) if api.has_output else 0
    return Candidate(model, price, provider, cap, cost_fn, provider_of)
