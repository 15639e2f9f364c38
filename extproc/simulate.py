"""`tollgate simulate` (what the gateway would do with one request) and `tollgate check`'s summary.

`simulate` answers, for a candidate policy directory against the live budget counters in Redis:
which access rules apply to the identity and whether the model is allowed; which budgets the
request counts against, the limit in force for each (default, tier or override), the counter's
current spent and reserved amounts, and what the request's worst case would do to it; the worst
case itself; and the final decision with the status the gateway would answer.

It runs the gateway's own code, not a copy: `Admitter.preview` (the checks of extproc/decide.py,
then `BudgetEngine.dry_run`, which runs `admit`'s decision logic on read-only counter reads), the
same path the admin API's DryRun takes. The only addition is `_ObservedEngine`, which keeps the
counter reads `dry_run` makes so the report shows the numbers the decision was made on. Nothing
is written to Redis: no lease, no counter, no script load (the reads are HGET/HMGET/ZRANGEBYSCORE).

With Redis unreachable the policy side is still reported, the spend is "unknown", and so is the
decision whenever a budget applies (with what the gateway answers while its store is down).
"""

from __future__ import annotations

import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import access
from .attrs import where_matches
from .budgets import BudgetEngine, RateLimit, StoreError
from .budgets import replies as budget_replies
from .budgets.match import limit_source
from .budgets.money import usd_exact
from .errors import GatewayError
from .policy_yaml import PolicyError, SourceMap, load_yaml
from .providers import api_for_path

if TYPE_CHECKING:
    import redis.asyncio as aredis

    from .budgets.admission import Admission
    from .budgets.policy import Budget
    from .budgets.store import ReserveResult
    from .config import Config

DEFAULT_PATH = "/v1/chat/completions"
ANTHROPIC_PATH = "/v1/messages"
DEFAULT_INPUT_BYTES = 1024
"""The request size assumed when neither --input-bytes nor --input-tokens is given (reported as such)."""

Attrs = dict[str, "str | list[str]"]


# ---- small helpers ------------------------------------------------------------------------------

def usd(nusd: int | None) -> str | None:
    """Exact decimal dollars (budgets/money.py `usd_exact`), None for an unknown amount."""
    return None if nusd is None else usd_exact(nusd)


def parse_as(items: Sequence[str]) -> Attrs:
    """`--as user=alice --as groups=interns --as groups=engineers` -> {"user": "alice", "groups": [...]}.

    `groups` is always a list (as the gateway's identities carry it); any other attribute given
    more than once becomes a list too. Raises ValueError on an item without `=` or a name."""
    out: Attrs = {}
    for item in items:
        k, sep, v = item.partition("=")
        k = k.strip()
        if not sep or not k:
            raise ValueError(f"--as wants ATTR=VALUE, got {item!r}")
        if k == "groups":
            have = out.setdefault("groups", [])
            assert isinstance(have, list)
            have.extend(g for g in (s.strip() for s in v.split(",")) if g)
        elif k in out:
            prev = out[k]
            out[k] = [*prev, v] if isinstance(prev, list) else [prev, v]
        else:
            out[k] = v
    return out


def default_path(config: Config, model: str) -> str:
    """Chat completions, unless only an Anthropic-wire provider serves the model: then /v1/messages."""
    if config.route(model, "openai") is None and config.route(model, "anthropic") is not None:
        return ANTHROPIC_PATH
    return DEFAULT_PATH


def source_map(root: str | Path) -> SourceMap | None:
    """Where each value of a policy directory was written (file:line), merged exactly as
    `load_config` merges the files (its own `_merge`); None if the files do not load."""
    from .config import _merge, policy_files

    root = Path(root)
    merged: dict[str, Any] = {}
    smap = SourceMap(place=str(root))
    try:
        for path in policy_files(root):
            data, fmap = load_yaml(path, str(path))
            if isinstance(data, dict):
                _merge(merged, data, (), fmap, smap)
                smap.merge(fmap)
    except (PolicyError, OSError):
        return None
    return smap


def _where(smap: SourceMap | None, loc: tuple[str | int, ...]) -> str | None:
    hit = smap.lookup(loc) if smap is not None else None
    return f"{hit[0]}:{hit[1]}" if hit else None


def where_text(where: Mapping[str, Any]) -> str:
    """{groups: [a, b], team: web} -> "groups=a|b team=web"; {} -> "everyone"."""
    if not where:
        return "everyone"
    return " ".join(f"{k}={'|'.join(v) if isinstance(v, list) else v}" for k, v in where.items())


def scope_text(b: Budget) -> str:
    """What a budget matches and how it splits its counters, in one line."""
    parts = []
    if b.match.models is not None:
        parts.append("models " + ",".join(b.match.models))
    if b.match.providers is not None:
        parts.append("providers " + ",".join(b.match.providers))
    if b.match.where:
        parts.append(where_text(b.match.where))
    scope = "; ".join(parts) or "every request"
    return f"{scope}; per {','.join(b.per)}" if b.per else f"{scope}; shared"


# ---- the observed dry run -------------------------------------------------------------------------

@dataclass
class _Peek:
    """One read-only counter read of the dry run: a candidate model's counters and their states."""

    model: str
    provider: str
    counters: list[Any]  # engine._Counter: the budgets' first, then the rate limits'
    cost: int
    amounts: list[int]  # what each counter would hold: the cost, 1 request, or the token worst case
    result: ReserveResult | None
    error: str | None
    now: float


class _ObservedEngine(BudgetEngine):
    """The gateway's budget engine, used for `dry_run` only, keeping every counter read it makes.

    `dry_run` swaps the reserve step for `_peek_reserve` (read-only); this records what each call
    read, so the report shows exactly the counters, limits and amounts the decision was made on."""

    def __init__(self, budgets: list[Budget], redis: aredis.Redis, rate_limits: list[RateLimit]) -> None:
        super().__init__(budgets, redis, rate_limits=rate_limits)
        self.peeks: list[_Peek] = []

    async def _peek_reserve(self, plan, req, amounts, model, provider):  # type: ignore[no-untyped-def]
        counters = plan.counters
        cost = next((a for c, a in zip(counters, amounts) if c.cb.unit == "usd"), 0)
        try:
            res = await super()._peek_reserve(plan, req, amounts, model, provider)
        except StoreError as e:
            self.peeks.append(_Peek(model, provider, list(counters), cost, list(amounts), None, str(e), req.now))
            raise
        self.peeks.append(_Peek(model, provider, list(counters), cost, list(amounts), res, None, req.now))
        return res

    async def admit(self, **kw: Any) -> Admission:  # never: a simulation reserves nothing
        raise RuntimeError("tollgate simulate never reserves")


def _outcome(b: Budget, over: bool | None, warn: float | None, adm: Admission, *, requested: bool,
             model: str) -> str:
    """What this request's worst case does to one counter, given the final decision."""
    if over is None:
        return f"unknown (Redis unreachable; {b.on_store_error})"
    if not over:
        return f"warn (>= {round(100 * warn)}%)" if warn is not None else "allow"
    if b.mode == "shadow":
        return "allow (shadow: would block)"
    if adm.decision == "clamped" or (adm.decision == "downgraded" and not requested and model == adm.model):
        return f"clamp to {adm.max_output_tokens} output tokens"
    if adm.decision == "downgraded" and requested:
        return f"downgrade to {adm.model}"
    if not requested:
        return "over (this fallback does not fit)"
    if b.action == "downgrade":
        return "block (no fallback fits)"
    return "block"


def _budget_rows(engine: _ObservedEngine, peek: _Peek, attrs: Attrs, adm: Admission, smap: SourceMap | None,
                 budgets: list[Budget], *, requested: bool) -> list[dict[str, Any]]:
    eff: Attrs = {**attrs, "model": peek.model, "provider": peek.provider}
    index = {b.name: i for i, b in enumerate(budgets)}
    rows = []
    for i, c in enumerate(peek.counters):
        if c.cb.unit != "usd":  # a rate limit's window: _rate_limit_rows
            continue
        b: Budget = c.cb.budget
        bi = index.get(b.name)
        kind, entry = limit_source(b, eff)
        limit_loc: tuple[str | int, ...] = ("budgets", bi or 0, "limit_usd")
        if entry is not None:
            limit_loc += ("overrides" if kind == "override" else "tiers", entry)
        row: dict[str, Any] = {
            "budget": b.name,
            "source": _where(smap, ("budgets", bi)) if bi is not None else None,
            "mode": b.mode,
            "action": b.action,
            "scope": scope_text(b),
            "counter": dict(c.per),
            "counter_text": ",".join(f"{k}={v}" for k, v in c.per.items()) or "(shared)",
            "key": c.ref.key,
            "window": c.cb.window.describe(),
            "limit_usd": usd(c.limit),
            "limit_nusd": c.limit,
            "limit_from": kind if entry is None else f"{kind} {entry}",
            "limit_source": _where(smap, limit_loc) if bi is not None else None,
            "base_limit_usd": usd(b.default_limit_nusd),
            "this_request_nusd": peek.cost,
            "this_request_usd": usd(peek.cost),
        }
        if kind != "default":
            spec = b.limit_spec()
            row["limit_where"] = (spec.overrides if kind == "override" else spec.tiers)[entry or 0].where
        state = peek.result.states[i] if peek.result is not None else None
        if state is None:
            row.update(spend_known=False, spent_usd=None, spent_nusd=None, reserved_usd=None, reserved_nusd=None,
                       remaining_usd=None, remaining_nusd=None, after_usd=None, after_nusd=None, percent_after=None,
                       resets_at=None, retry_after_seconds=None, over=None)
            row["outcome"] = _outcome(b, None, None, adm, requested=requested, model=peek.model)
        else:
            held = not state.over
            st = engine._status(c, state, peek.now, cost=peek.cost, held=held)
            after = state.spent + state.reserved + peek.cost
            row.update(
                spend_known=True,
                spent_usd=usd(state.spent), spent_nusd=state.spent,
                reserved_usd=usd(state.reserved), reserved_nusd=state.reserved,
                remaining_usd=usd(max(0, c.limit - state.spent - state.reserved)),
                remaining_nusd=max(0, c.limit - state.spent - state.reserved),
                after_usd=usd(after), after_nusd=after,
                percent_after=round(100 * after / c.limit, 2) if c.limit else None,
                resets_at=budget_replies.iso(st.resets_at),
                retry_after_seconds=None if st.retry_after_seconds is None else round(st.retry_after_seconds, 1),
                over=state.over,
            )
            row["outcome"] = _outcome(b, state.over, st.warn_level if held else None, adm, requested=requested,
                                      model=peek.model)
        rows.append(row)
    return rows


def _rate_limit_rows(engine: _ObservedEngine, peek: _Peek, smap: SourceMap | None,
                     names: list[str]) -> list[dict[str, Any]]:
    """The rate-limit windows this request would count against (docs/ratelimits.md)."""
    rows = []
    for i, c in enumerate(peek.counters):
        if c.cb.unit == "usd":
            continue
        amount = peek.amounts[i]
        state = peek.result.states[i] if peek.result is not None else None
        ri = names.index(c.cb.budget.name) if c.cb.budget.name in names else None
        row: dict[str, Any] = {
            "rate_limit": c.cb.budget.name, "unit": c.cb.unit,
            "source": _where(smap, ("rate_limits", ri)) if ri is not None else None,
            "counter_text": ",".join(f"{k}={v}" for k, v in c.per.items()) or "(shared)",
            "key": c.ref.key, "window": c.cb.window.describe(), "limit": c.limit, "this_request": amount,
            "used": None, "over": None, "retry_after_seconds": None,
        }
        if state is not None:
            st = engine._status(c, state, peek.now, cost=amount, held=not state.over)
            row.update(used=state.spent + state.reserved, over=state.over,
                       retry_after_seconds=None if st.retry_after_seconds is None else round(st.retry_after_seconds, 1))
        rows.append(row)
    return rows


# ---- simulate ------------------------------------------------------------------------------------

def _access(config: Config, attrs: Attrs, model: str, smap: SourceMap | None) -> dict[str, Any]:
    rules = config.doc.access
    applying = []
    for i, r in enumerate(rules):
        if not where_matches(r.where, attrs):
            continue
        if access.value_matches(model, r.deny):
            effect = "denies the model"
        elif r.allow is None:
            effect = "allows it (no allow list)"
        elif access.value_matches(model, r.allow):
            effect = "allows the model"
        else:
            effect = "does not list the model"
        applying.append({"index": i, "source": _where(smap, ("access", i)), "where": dict(r.where),
                         "allow": r.allow, "deny": list(r.deny), "effect": effect})
    ok = not rules or access.allowed(rules, attrs, model)
    out: dict[str, Any] = {"rules": applying, "rules_total": len(rules), "model_allowed": ok}
    if not ok:
        out["allowed_models"] = access.refusal(rules, attrs, model, config.prices.names()).extra["allowed_models"]
    return out


async def simulate(config: Config, redis: aredis.Redis, *, attrs: Mapping[str, str | list[str]], model: str,
                   path: str | None = None, max_tokens: int | None = None, input_bytes: int | None = None,
                   input_tokens: int | None = None, stream: bool = False,
                   smap: SourceMap | None = None) -> dict[str, Any]:
    """What the gateway would answer for this request, as a JSON-able report. Writes nothing.

    Raises ValueError on a bad argument (unknown path, negative sizes)."""
    attrs = {k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in attrs.items()}
    path = path or default_path(config, model)
    api = api_for_path(path)
    if api is None:
        raise ValueError(f"path {path!r}: use /v1/chat/completions, /v1/responses, /v1/embeddings or /v1/messages")
    for name, v in (("--max-tokens", max_tokens), ("--input-bytes", input_bytes), ("--input-tokens", input_tokens)):
        if v is not None and v < (1 if name == "--max-tokens" else 0):
            raise ValueError(f"{name} must be {'positive' if name == '--max-tokens' else 'non-negative'}, got {v}")
    assumed = input_bytes is None and input_tokens is None
    if assumed:
        input_bytes = DEFAULT_INPUT_BYTES
    input_upper = int(input_tokens if input_tokens is not None else input_bytes or 0)

    report: dict[str, Any] = {
        "policies": str(config.source),
        "policy_digest": config.digest,  # as the live gateway's tollgate_policy_info{digest}
        "identity": attrs,
        "request": {"model": model, "path": path, "api": api.name, "max_tokens": max_tokens,
                    "input_bytes": input_bytes, "input_tokens": input_tokens, "input_bound_tokens": input_upper,
                    "input_size_assumed": assumed, "stream": stream},
        "access": _access(config, attrs, model, smap),
        "provider": None,
        "output_cap": None,
        "worst_case_usd": None,
        "worst_case_nusd": None,
        "budgets": [],
        "rate_limits": [],
        "fallbacks": [],
        "spend": "not needed",
        "decision": {},
    }

    def refuse(e: GatewayError, stage: str) -> dict[str, Any]:
        report["decision"] = {"decision": "refused", "status": e.status, "code": e.code or e.type,
                              "message": e.message, "stage": stage, "model_served": None}
        if e.extra.get("allowed_models") is not None:
            report["decision"]["allowed_models"] = list(e.extra["allowed_models"])
        return report

    limit = config.gateway.max_request_bytes
    if input_bytes is not None and input_bytes > limit:
        return refuse(GatewayError(413, f"Request body is {input_bytes} bytes; this gateway accepts at most {limit}.",
                                   code="request_too_large"), "size")

    from .lifecycle.admitter import Admitter
    from .metrics import Metrics

    engine = _ObservedEngine(list(config.doc.budgets), redis, list(config.doc.rate_limits))
    try:
        cand, adm = await Admitter(engine, Metrics()).preview(config, api, model, max_tokens, attrs, path, input_upper)
    except GatewayError as e:
        return refuse(e, "access" if e.code == "model_not_allowed" else "price/route")
    assert adm is not None
    worst = cand.cost_fn(model, input_upper, cand.cap) or 0
    report.update(provider=cand.provider, output_cap=cand.cap, worst_case_usd=usd(worst), worst_case_nusd=worst)

    budgets = list(config.doc.budgets)
    seen: list[str] = []
    for peek in engine.peeks:  # the first read per candidate model (a clamp reads again, with a smaller cost)
        if peek.model in seen:
            continue
        seen.append(peek.model)
        rows = _budget_rows(engine, peek, attrs, adm, smap, budgets, requested=peek.model == model)
        if peek.model == model:
            report["budgets"] = rows
            report["rate_limits"] = _rate_limit_rows(engine, peek, smap, [r.name for r in config.doc.rate_limits])
        else:
            report["fallbacks"].append({"model": peek.model, "provider": peek.provider, "worst_case_usd": usd(peek.cost),
                                        "worst_case_nusd": peek.cost, "fits": not any(r["over"] and r["mode"] == "enforce"
                                                                                   for r in rows),
                                        "budgets": rows})
    if adm.decision == "downgraded" and adm.model not in seen:  # a fallback no budget applies to
        fb_worst = cand.cost_fn(adm.model, input_upper, adm.max_output_tokens) or 0
        report["fallbacks"].append({"model": adm.model, "provider": adm.provider, "worst_case_usd": usd(fb_worst),
                                    "worst_case_nusd": fb_worst, "fits": True, "budgets": []})
    if engine.peeks:
        err = next((p.error for p in engine.peeks if p.error), None)
        report["spend"] = f"unknown: Redis unreachable ({err})" if err else "read from Redis"

    d: dict[str, Any] = {"decision": adm.decision, "reason": adm.reason, "model_served": adm.model,
                         "provider": adm.provider, "max_output_tokens": adm.max_output_tokens,
                         "max_output_tokens_clamped": api.has_output and adm.max_output_tokens < cand.cap,
                         "budgets": list(adm.budgets),
                         "warnings": [w.name for w in adm.warnings],
                         "shadow_blocked": [s.name for s in adm.shadow_blocked]}
    if adm.store_error:
        if adm.decision == "store_error":
            e = budget_replies.store_unavailable()
            down = {"status": e.status, "code": e.code, "decision": "refused"}
        else:
            down = {"status": 200, "code": None, "decision": "allowed (fail_open: not accounted)"}
        d.update(decision="unknown", status=None, code=None, model_served=None,
                 message="the spend is unknown (Redis unreachable), so is the decision", if_store_down=down)
    elif adm.decision == "blocked" and adm.limited is not None:
        e = budget_replies.rate_limited(adm, api)
        d.update(status=e.status, code=e.code, message=e.message, rate_limit=adm.limited.name,
                 model_served=None, headers=dict(e.headers))
    elif adm.decision == "blocked":
        e = budget_replies.blocked(adm, model, worst)
        d.update(status=e.status, code=e.code, message=e.message, budget=e.extra.get("budget"),
                 model_served=None, headers=dict(e.headers))
    else:
        served_worst = cand.cost_fn(adm.model, input_upper, adm.max_output_tokens) or 0
        d.update(status=200, code=None, served_worst_case_usd=usd(served_worst), served_worst_case_nusd=served_worst,
                 tightest=adm.tightest.name if adm.tightest else None,
                 headers={"x-tollgate-decision": adm.decision, "x-tollgate-model-served": adm.model,
                          **(budget_replies.status_headers(adm.tightest) if adm.tightest else {})})
    report["decision"] = d
    return report


# ---- rendering -----------------------------------------------------------------------------------

BUDGET_COLUMNS = ["budget", "counter", "window", "limit_usd", "limit_from", "spent_usd", "reserved_usd",
                  "remaining_usd", "this_request_usd", "outcome"]


def _dollars(v: str | None) -> str:
    return "?" if v is None else f"${v}"


def _table(rows: list[dict[str, Any]], title: str) -> str:
    import io

    from rich.console import Console
    from rich.table import Table

    money = {"limit_usd", "spent_usd", "reserved_usd", "remaining_usd", "this_request_usd"}
    table = Table(title=title, title_justify="left")
    for c in BUDGET_COLUMNS:
        table.add_column(c.removesuffix("_usd"), justify="right" if c in money else "left")
    for r in rows:
        table.add_row(*(str(r.get(c, "")) for c in BUDGET_COLUMNS))
    out = io.StringIO()
    Console(file=out, width=200, force_terminal=False).print(table)
    return "\n".join(line.rstrip() for line in out.getvalue().rstrip().splitlines())


def render_text(report: dict[str, Any]) -> str:
    rq, acc, d = report["request"], report["access"], report["decision"]
    who = " ".join(f"{k}={','.join(v) if isinstance(v, list) else v}" for k, v in report["identity"].items())
    size = (f"{rq['input_tokens']} input tokens" if rq["input_tokens"] is not None
            else f"{rq['input_bytes']} body bytes" + (" (assumed; give --input-bytes)" if rq["input_size_assumed"]
                                                       else ""))
    stream = ", stream" if rq["stream"] else ""
    lines = [f"simulate {rq['model']} on {rq['path']} as {who or '(no attributes)'}",
             f"  policies: {report['policies']}   request: {size}, max_tokens {rq['max_tokens'] or 'unset'}{stream}",
             ""]
    if acc["rules"]:
        lines.append(f"access: {len(acc['rules'])} of {acc['rules_total']} rules apply; model "
                     f"{'allowed' if acc['model_allowed'] else 'NOT allowed'}")
        for r in acc["rules"]:
            what = "; ".join(x for x in (f"allow {', '.join(r['allow'])}" if r["allow"] is not None else "",
                                         f"deny {', '.join(r['deny'])}" if r["deny"] else "") if x)
            loc = r["source"] or f"access[{r['index']}]"
            lines.append(f"  {loc}: where {where_text(r['where'])}: {what} "
                         f"-> {r['effect']}")
    else:
        lines.append(f"access: no rule applies ({acc['rules_total']} rules); every priced model is allowed")
    if not acc["model_allowed"]:
        lines.append("  models this identity may use: " + (", ".join(acc["allowed_models"]) or "none"))
    if report["worst_case_usd"] is not None:
        lines.append(f"worst case: {_dollars(report['worst_case_usd'])} ({rq['input_bound_tokens']} input tokens "
                     f"bound, {report['output_cap']} output tokens) via provider {report['provider']}")
    lines.append(f"spend: {report['spend']}")
    if report["budgets"]:
        rows = [{**r, "counter": r["counter_text"],
                 "limit_from": r["limit_from"] + (f" ({where_text(r['limit_where'])})" if r.get("limit_where") else ""),
                 **{k: _dollars(r[k]) for k in ("limit_usd", "spent_usd", "reserved_usd", "remaining_usd",
                                                "this_request_usd")},
                 "budget": r["budget"] + (" [shadow]" if r["mode"] == "shadow" else "")}
                for r in report["budgets"]]
        lines.append(_table(rows, "budgets this request counts against"))
        for r in report["budgets"]:
            if r["source"]:
                lines.append(f"  {r['budget']}: {r['source']} ({r['scope']}; base limit ${r['base_limit_usd']}"
                             + (f", {r['limit_from']} at {r['limit_source']}" if r["limit_from"] != "default" else "")
                             + ")")
    elif report["worst_case_usd"] is not None:
        lines.append("budgets: none applies")
    for r in report.get("rate_limits", []):
        used = "?" if r["used"] is None else r["used"]
        verdict = "unknown" if r["over"] is None else "over: refused" if r["over"] else "fits"
        lines.append(f"rate limit {r['rate_limit']} ({r['counter_text']}): {used} of {r['limit']} {r['unit']} used "
                     f"({r['window']}), this request {r['this_request']} -> {verdict}"
                     + (f"  [{r['source']}]" if r["source"] else ""))
    for fb in report["fallbacks"]:
        over = [r["budget"] for r in fb["budgets"] if r["over"]]
        lines.append(f"fallback {fb['model']} via {fb['provider']}: worst case {_dollars(fb['worst_case_usd'])}, "
                     + (("fits" if fb["budgets"] else "no budget applies") if fb["fits"]
                        else f"over {', '.join(over)}"))
    lines.append("")
    if d["decision"] == "refused":
        lines.append(f"decision: refused -> {d['status']} {d['code']}: {d['message']}")
    elif d["decision"] == "unknown":
        down = d["if_store_down"]
        lines.append(f"decision: unknown ({d['message']}); while its store is down the gateway answers "
                     f"{down['status']}{' ' + down['code'] if down['code'] else ''} ({down['decision']})")
    elif d["decision"] == "blocked":
        lines.append(f"decision: blocked -> {d['status']} {d['code']}: {d['message']}")
    else:
        served = d["model_served"]
        extra = f", model served {served}" if served != rq["model"] else ""
        if d["max_output_tokens_clamped"]:
            extra += f", max_tokens lowered to {d['max_output_tokens']}"
        lines.append(f"decision: {d['decision']} -> 200{extra} ({d['reason']})")
        if d["warnings"]:
            lines.append(f"  warnings: {', '.join(d['warnings'])}")
    if d.get("shadow_blocked"):
        lines.append(f"  shadow budgets that would block: {', '.join(d['shadow_blocked'])}")
    return "\n".join(lines) + "\n"


def run_cli(config: Config, args: Any) -> int:
    """`tollgate simulate`: 0 with a report (whatever the decision), 2 on a bad argument."""
    import logging
    import sys

    import orjson
    import redis.asyncio as aioredis

    try:
        attrs = parse_as(args.identity)
    except ValueError as e:
        print(f"tollgate: {e}", file=sys.stderr)
        return 2

    async def run() -> dict[str, Any]:
        client = aioredis.Redis.from_url(args.redis_url, socket_connect_timeout=2, socket_timeout=5)
        try:
            return await simulate(config, client, attrs=attrs, model=args.model, path=args.path,
                                  max_tokens=args.max_tokens, input_bytes=args.input_bytes,
                                  input_tokens=args.input_tokens, stream=args.stream,
                                  smap=source_map(config.source))
        finally:
            await client.aclose()

    import asyncio

    engine_log = logging.getLogger("extproc.budgets.engine")
    was = engine_log.disabled
    engine_log.disabled = True  # "budget store unavailable" is reported in the output, not logged
    try:
        report = asyncio.run(run())
    except ValueError as e:
        print(f"tollgate: {e}", file=sys.stderr)
        return 2
    finally:
        engine_log.disabled = was
    if args.format == "json":
        sys.stdout.write(orjson.dumps(report, option=orjson.OPT_INDENT_2).decode() + "\n")
    else:
        sys.stdout.write(render_text(report))
    return 0


# ---- `tollgate check`: what a policy directory defines --------------------------------------------

def _key_status(p: Any) -> str:
    if p.key is None:
        return "no key: the client's own provider key is passed through" if p.pass_client_key else "no key"
    where = f"env {p.key.env}" if p.key.env is not None else f"file {p.key.file}"
    if p.key.read() is not None:
        return f"key from {where}: present"
    return f"key from {where}: MISSING" + (" (key_missing: refuse -> requests routed here get 503)"
                                           if p.key_missing == "refuse" else "")


def _n(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _wrap(items: Sequence[str], indent: str = "    ") -> list[str]:
    return textwrap.wrap(", ".join(items), width=100, initial_indent=indent, subsequent_indent=indent) or [indent]


def policy_summary(config: Config, *, stale: Sequence[str] = (), today: date | None = None) -> str:
    """What a validated policy directory defines, for `tollgate check`: providers (and whether
    each one's key reads), routes, priced models, budgets, access rules, identity sources, admin
    rules, and the count of warnings (printed apart, on stderr)."""
    from .budgets.windows import window_for

    doc = config.doc
    smap = source_map(config.source)
    today = today or datetime.now(UTC).date()
    out = [f"providers ({len(doc.providers)}):"]
    for name, p in doc.providers.items():
        out.append(f"  {name}: {p.url} [{','.join(p.wires)}]; {_key_status(p)}")
    out.append(f"routes ({len(doc.routes)}, first match wins):")
    for r in doc.routes:
        out.append(f"  {', '.join(r.models)} -> {r.provider}")
    entries = [name for name, _ in config.prices.entries(today)]
    exact = [n for n in entries if not any(ch in n for ch in "*?[")]
    globs = [n for n in entries if n not in exact]
    out.append(f"priced models in force today ({len(entries)}: {len(exact)} exact, {len(globs)} globs)"
               + ("; unpriced models are priced as `default`" if doc.prices.default else
                  "; unpriced models are refused"))
    out.append("  exact:")
    out.extend(_wrap(exact))
    if globs:
        out.append("  globs:")
        out.extend(_wrap(globs))
    out.append(f"budgets ({len(doc.budgets)}):")
    for i, b in enumerate(doc.budgets):
        spec = b.limit_spec()
        limit = f"${spec.default}"
        if spec.tiers or spec.overrides:
            limit += f" ({_n(len(spec.tiers), 'tier')}, {_n(len(spec.overrides), 'override')})"
        act = b.action + (f" to {', '.join(b.fallbacks)}" if b.action == "downgrade" else "")
        flags = [x for x in ("clamp" if b.clamp else "", "shadow" if b.mode == "shadow" else "",
                             f"warn at {', '.join(f'{round(100 * w)}%' for w in b.warn_at)}" if b.warn_at else "",
                             "fail_open" if b.on_store_error == "fail_open" else "") if x]
        loc = _where(smap, ("budgets", i))
        out.append(f"  {b.name}: {scope_text(b)}; {window_for(b.window).describe()}; limit {limit}; {act}"
                   + (f"; {', '.join(flags)}" if flags else "") + (f"  [{loc}]" if loc else ""))
    if doc.rate_limits:
        out.append(f"rate limits ({len(doc.rate_limits)}):")
        for i, rl in enumerate(doc.rate_limits):
            what = ", ".join(x for x in (f"{rl.requests} requests" if rl.requests else "",
                                         f"{rl.tokens} tokens" if rl.tokens else "") if x)
            loc = _where(smap, ("rate_limits", i))
            out.append(f"  {rl.name}: {scope_text(rl.as_budget())}; {what} per {rl.window} (sliding, "
                       f"{window_for(rl.window_spec()).bucket_seconds}s buckets)" + (f"  [{loc}]" if loc else ""))
    out.append(f"access rules ({len(doc.access)}):")
    for i, r in enumerate(doc.access):
        what = "; ".join(x for x in (f"allow {', '.join(r.allow)}" if r.allow is not None else "",
                                     f"deny {', '.join(r.deny)}" if r.deny else "") if x)
        loc = _where(smap, ("access", i))
        out.append(f"  where {where_text(r.where)}: {what or 'no effect'}" + (f"  [{loc}]" if loc else ""))
    ident = doc.identity
    out.append("identity sources:")
    out.append(f"  jwt issuers ({len(ident.jwt)})" + (":" if ident.jwt else ""))
    for j in ident.jwt:
        out.append(f"    {j.name}: {', '.join(j.issuers)} (header {j.header})")
    out.append(f"  api keys: {len(ident.api_keys.keys) if ident.api_keys else 0}")
    out.append(f"  service tokens: {len(ident.service_tokens.tokens) if ident.service_tokens else 0}")
    out.append(f"  anonymous: {'as ' + ident.anonymous.user if ident.anonymous else 'off'}")
    out.append(f"admin rules ({len(doc.admin)}, any match grants):")
    for i, a in enumerate(doc.admin):
        out.append(f"  where {where_text(a.where)}")
    from .cache.policy import describe_rule  # cache: the response cache's rules (docs/cache.md)

    out.append(f"cache rules ({len(doc.cache)}, first match wins)" + (":" if doc.cache else ": the cache is off"))
    for i, c in enumerate(doc.cache):
        loc = _where(smap, ("cache", i))
        out.append(f"  {describe_rule(c)}" + (f"  [{loc}]" if loc else ""))
    out.append(f"alerts ({len(doc.alerts)})" + (":" if doc.alerts else ": none"))  # alerts (docs/alerts.md)
    for i, al in enumerate(doc.alerts):
        watched = ", ".join(al.budgets) if al.budgets is not None else "every budget"
        scope = f" where {where_text(al.where)}" if al.where else ""
        loc = _where(smap, ("alerts", i))
        out.append(f"  {al.name}: {', '.join(al.events)} of {watched}{scope} -> {al.host}"
                   + (f"  [{loc}]" if loc else ""))
    out.append(f"warnings: {len(stale)} stale prices (listed on stderr)" if stale else "warnings: none")
    return "\n".join(out)


__all__ = ["DEFAULT_PATH", "parse_as", "policy_summary", "render_text", "run_cli", "simulate", "source_map"]

