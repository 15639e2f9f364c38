"""The Admin gRPC service: usage reports, budget status and dry runs, served by the ext_proc process.

Every call is authenticated with the gateway's own Authenticator from the gRPC metadata (Envoy's
gRPC-JSON transcoder forwards the HTTP headers as metadata), so the same API keys, JWTs and
service tokens work here. Authorization:

* no or bad credential -> UNAUTHENTICATED (HTTP 401 through the transcoder);
* usage, and budget status or dry runs for another identity, need an `admin:` policy rule
  (`where` rules over the caller's attributes; any match grants) -> else PERMISSION_DENIED (403);
* a caller may always read its own budget status and dry-run its own requests;
* the dashboard (`GetDashboard`) shows an admin everything, anyone else their own usage (filtered
  to their `user`) and their own budget counters; its page (`GetDashboardPage`) holds no data and
  is served to anyone (extproc/dashboard/, docs/dashboard.md).

Nothing here reserves, settles or writes a budget counter: status and dry runs only read.
Every call, granted or refused, leaves one line in the admin access log (`access_log.py`,
`<state dir>/admin-access.jsonl`, docs/admin-api.md): who called, whose data it read, the outcome.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import math
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import grpc
from google.api import httpbody_pb2

from .. import dashboard
from ..attrs import where_matches
from ..budgets import BudgetStatus, StoreError
from ..budgets import replies as budget_replies
from ..budgets.money import usd_exact as usd
from ..dashboard import data as dashboard_data
from ..errors import GatewayError
from ..identity import AuthError, Identity
from ..providers import api_for_path
from ..reports import budget_counters, counter_forecasts, status_row
from ..usage import decode_rollups, read_raw_rollups
from .access_log import AdminAccessLog, logged, note_caller, note_subject
from .build import ensure_generated

ensure_generated()  # a fresh clone: compile the proto on first import

from ._gen import admin_pb2 as pb  # noqa: E402
from ._gen import admin_pb2_grpc as pb_grpc  # noqa: E402

if TYPE_CHECKING:
    from ..app import Gateway

log = logging.getLogger("tollgate.admin")

USAGE_DIMENSIONS = ("user", "team", "app", "group", "model", "provider", "service_token")
MAX_USAGE_DAYS = 400
DEFAULT_PATH = "/v1/chat/completions"
READ_TIMEOUT_SECONDS = 30.0


def counter_pb(st: BudgetStatus) -> pb.BudgetCounter:
    used = st.spent_nusd + st.reserved_nusd
    return pb.BudgetCounter(
        name=st.name,
        counter=dict(st.per),
        window=st.window,
        mode=st.mode,
        limit_usd=usd(st.limit_nusd),
        spent_usd=usd(st.spent_nusd),
        reserved_usd=usd(st.reserved_nusd),
        remaining_usd=usd(st.remaining_nusd),
        resets_at=budget_replies.iso(st.resets_at) or "",
        retry_after_seconds=0 if st.retry_after_seconds is None else math.ceil(st.retry_after_seconds),
        percent_used=round(100.0 * used / st.limit_nusd, 4) if st.limit_nusd > 0 else (0.0 if used == 0 else 100.0),
        limit_nusd=st.limit_nusd,
        spent_nusd=st.spent_nusd,
        reserved_nusd=st.reserved_nusd,
        remaining_nusd=st.remaining_nusd,
    )


def forecast_pb(fc: Any, text: str) -> pb.Forecast:
    """A forecast (extproc/forecast.py) and its sentence, as the API's message."""
    return pb.Forecast(
        rate_usd_per_day=usd(fc.rate_nusd_per_day), band_usd_per_day=usd(fc.band_nusd_per_day),
        projected_usd=usd(fc.projected_nusd), low_usd=usd(fc.low_nusd), high_usd=usd(fc.high_nusd),
        exhausts_on=fc.exhausts_on.isoformat() if fc.exhausts_on else "",
        period_end=budget_replies.iso(fc.period_end.timestamp()) if fc.period_end else "",
        method=fc.method, sentence=text, rate_nusd_per_day=fc.rate_nusd_per_day, projected_nusd=fc.projected_nusd,
        low_nusd=fc.low_nusd, high_nusd=fc.high_nusd,
    )


def counter_row_pb(row: Mapping[str, Any], modes: Mapping[str, str]) -> pb.BudgetCounter:
    """A `reports.budget_counters` row (any identity's live counter, read from Redis) as a BudgetCounter."""
    spent, reserved, limit = row["spent_nusd"], row["reserved_nusd"], row["limit_nusd"]
    used = spent + reserved
    resets = row["resets_at"]
    return pb.BudgetCounter(
        name=row["budget"], counter=dict(row["per"]), window=row.get("window", ""),
        mode=row.get("mode") or modes.get(row["budget"], ""),
        limit_usd=usd(limit), spent_usd=usd(spent), reserved_usd=usd(reserved), remaining_usd=usd(max(0, limit - used)),
        resets_at=budget_replies.iso(dt.datetime.fromisoformat(resets).timestamp()) if resets and resets != "rolling"
        else "",
        percent_used=round(100.0 * used / limit, 4) if limit > 0 else (0.0 if used == 0 else 100.0),
        limit_nusd=limit, spent_nusd=spent, reserved_nusd=reserved, remaining_nusd=max(0, limit - used),
    )


def identity_pb(attrs: Mapping[str, str | list[str]]) -> pb.Identity:
    core = {"user", "email", "groups", "team", "app", "service_token"}
    groups = attrs.get("groups") or []
    return pb.Identity(
        user=str(attrs.get("user") or ""),
        email=str(attrs.get("email") or ""),
        groups=[groups] if isinstance(groups, str) else list(groups),
        team=str(attrs.get("team") or ""),
        app=str(attrs.get("app") or ""),
        service_token=str(attrs.get("service_token") or ""),
        attributes={k: (",".join(v) if isinstance(v, list) else str(v)) for k, v in attrs.items() if k not in core},
    )


def selector_attrs(sel: pb.Identity) -> dict[str, str | list[str]]:
    """The attributes an Identity message names (empty fields omitted)."""
    out: dict[str, str | list[str]] = {}
    for f in ("user", "email", "team", "app", "service_token"):
        v = getattr(sel, f)
        if v:
            out[f] = v
    if sel.groups:
        out["groups"] = list(sel.groups)
    for k, v in sel.attributes.items():
        if k not in out and k != "groups":
            out[k] = v
    return out


def consistent(given: Mapping[str, str | list[str]], caller: Mapping[str, str | list[str]]) -> bool:
    """Does a selector only repeat what is true of the caller (so it names the caller itself)?"""
    for k, v in given.items():
        have = caller.get(k)
        if k == "groups":
            if not set(v if isinstance(v, list) else [v]) <= set(have or []):
                return False
        elif have != v:
            return False
    return True


# ---- what the access log records of each call (extproc/admin/access_log.py) ------------------

def _selector(request: Any) -> dict[str, str | list[str]] | None:
    return selector_attrs(request.identity) if request.HasField("identity") else None


def usage_read(r: pb.GetUsageRequest) -> dict[str, Any]:
    return {"group_by": list(r.group_by), "from": getattr(r, "from") or None, "to": r.to or None,
            "where": dict(r.where)}


def usage_returned(r: pb.GetUsageResponse) -> dict[str, Any]:
    return {"rows": len(r.rows), "from": getattr(r, "from"), "to": r.to}


def status_read(r: pb.GetBudgetStatusRequest) -> dict[str, Any]:
    return {"identity": _selector(r), **({"forecast": True} if r.forecast else {})}


def dashboard_read(r: pb.GetDashboardRequest) -> dict[str, Any]:
    return {"from": getattr(r, "from") or None, "to": r.to or None, "by": r.by or None}


def dashboard_returned(r: pb.GetDashboardResponse) -> dict[str, Any]:
    return {"from": getattr(r, "from"), "to": r.to, "by": r.by, "series": len(r.series),
            "budgets": len(r.budgets), "scope": dict(r.scope)}


def status_returned(r: pb.GetBudgetStatusResponse) -> dict[str, Any]:
    return {"budgets": [b.name for b in r.budgets]}


def dry_run_read(r: pb.DryRunRequest) -> dict[str, Any]:
    return {"identity": _selector(r), "model": r.model, "path": r.path or DEFAULT_PATH,
            "max_output_tokens": r.max_output_tokens, "input_bytes": r.input_bytes, "input_tokens": r.input_tokens,
            "stream": r.stream}


def dry_run_returned(r: pb.DryRunResponse) -> dict[str, Any]:
    return {"decision": r.decision, "model_served": r.model_served or None}


class AdminService(pb_grpc.AdminServicer):
    """Every method is wrapped by `logged`: one admin access log record per call."""

    def __init__(self, gw: "Gateway", access_log: AdminAccessLog | None = None) -> None:
        self.gw = gw
        self._reads: Any = None  # the long-read Redis client (`_reader`), made on first use
        # <state dir>/admin-access.jsonl; a gateway without a state dir logs the records instead
        self.access_log = access_log or AdminAccessLog.in_state_dir(gw.state_dir)

    @property
    def clock(self) -> Callable[[], float]:  # the access log's timestamps
        return self.gw.clock

    def _reader(self) -> Any:
        """A client for the admin API's big reads (days of rollups, every counter): the gateway's
        Redis with a 30 s socket timeout instead of the request path's 0.5 s (a month of rollups
        for 1,000 users is ~60 MB of replies), on a small pool of its own so these reads never
        hold the request path's connections."""
        if self.gw.redis is None:
            return None
        if self._reads is None:
            import redis.asyncio as aredis

            pool = self.gw.redis.connection_pool
            kw = {**pool.connection_kwargs, "socket_timeout": READ_TIMEOUT_SECONDS}
            self._reads = aredis.Redis(connection_pool=aredis.BlockingConnectionPool(
                connection_class=pool.connection_class, max_connections=4, timeout=READ_TIMEOUT_SECONDS, **kw))
        return self._reads

    # ---- auth -----------------------------------------------------------------------------

    async def _caller(self, context: grpc.aio.ServicerContext) -> Identity:
        headers: dict[str, str] = {}
        for key, value in context.invocation_metadata() or ():
            if key.endswith("-bin") or not isinstance(value, str):
                continue
            headers[key.lower()] = value
        try:
            who = await self.gw.auth.authenticate(headers)
        except AuthError as e:
            code = grpc.StatusCode.UNAVAILABLE if e.status >= 500 else grpc.StatusCode.UNAUTHENTICATED
            await context.abort(code, f"{e.check}: {e.message}")
            raise  # unreachable: abort raises
        note_caller(who, self.is_admin(who))
        return who

    def is_admin(self, who: Identity) -> bool:
        attrs = who.attrs()
        return any(where_matches(r.where, attrs) for r in self.gw.config.doc.admin)

    async def _subject(self, context: grpc.aio.ServicerContext, who: Identity, sel: pb.Identity | None,
                       what: str) -> dict[str, str | list[str]]:
        """Whose attributes a status or dry run uses: the caller's, or (admins only) the named identity's."""
        mine = who.attrs()
        given = selector_attrs(sel) if sel is not None else {}
        if not given or consistent(given, mine):
            note_subject(mine, True)
            return mine
        note_subject(given, False)  # logged as asked for, granted or not
        if not self.is_admin(who):
            await context.abort(grpc.StatusCode.PERMISSION_DENIED,
                                f"{what} for another identity needs the admin policy rule; "
                                f"{who.user} may only ask about itself (omit `identity`).")
        return given

    @staticmethod
    async def _invalid(context: grpc.aio.ServicerContext, message: str) -> None:
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, message)

    # ---- GetUsage -------------------------------------------------------------------------

    @logged(usage_read, usage_returned)
    async def GetUsage(self, request: pb.GetUsageRequest, context: grpc.aio.ServicerContext) -> pb.GetUsageResponse:
        who = await self._caller(context)
        if not self.is_admin(who):
            await context.abort(grpc.StatusCode.PERMISSION_DENIED,
                                f"usage reports need the admin policy rule; {who.user} does not match it.")
        group_by = list(dict.fromkeys(request.group_by))
        bad = [g for g in group_by if g not in USAGE_DIMENSIONS]
        if bad:
            await self._invalid(context, f"group_by {bad[0]!r}: use any of {', '.join(USAGE_DIMENSIONS)}")
        where = dict(request.where)
        bad = [k for k in where if k not in USAGE_DIMENSIONS]
        if bad:
            await self._invalid(context, f"where {bad[0]!r}: filter on any of {', '.join(USAGE_DIMENSIONS)}")
        today = dt.datetime.fromtimestamp(self.gw.clock(), dt.timezone.utc).date()
        try:
            start = dt.date.fromisoformat(getattr(request, "from")) if getattr(request, "from") else today
            end = dt.date.fromisoformat(request.to) if request.to else start
        except ValueError as e:
            await self._invalid(context, f"dates are YYYY-MM-DD (UTC days): {e}")
            raise
        if end < start:
            await self._invalid(context, f"`to` ({end}) is before `from` ({start})")
        if (end - start).days >= MAX_USAGE_DAYS:
            await self._invalid(context, f"at most {MAX_USAGE_DAYS} days per query")
        if self.gw.redis is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "this gateway runs without Redis: no usage is recorded")
        try:
            from ..usage import query_usage
        except ImportError:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "usage rollups are not available in this build")
            raise
        try:
            report = await query_usage(self._reader(), group_by=group_by, start=start, end=end, where=where or None)
        except ValueError as e:
            await self._invalid(context, str(e))
            raise
        except Exception as e:  # Redis down or slow
            if isinstance(e, (OSError, TimeoutError)) or type(e).__module__.startswith("redis"):
                await context.abort(grpc.StatusCode.UNAVAILABLE, f"usage store unavailable: {type(e).__name__}: {e}")
            raise
        resp = pb.GetUsageResponse(rows=[self._row(r) for r in report.rows], totals=self._row(report.totals),
                                   to=end.isoformat(), group_by=group_by)
        setattr(resp, "from", start.isoformat())
        return resp

    @staticmethod
    def _row(r: Any) -> pb.UsageRow:
        return pb.UsageRow(
            key={k: str(v) for k, v in (r.key or {}).items()},
            requests=int(r.requests),
            input_tokens=int(r.input_tokens),
            output_tokens=int(r.output_tokens),
            cached_input_tokens=int(r.cached_input_tokens),
            cache_write_tokens=int(r.cache_write_tokens),
            cost_usd=usd(r.cost_nusd),
            cost_nusd=int(r.cost_nusd),
        )

    # ---- GetBudgetStatus ------------------------------------------------------------------

    @logged(status_read, status_returned)
    async def GetBudgetStatus(self, request: pb.GetBudgetStatusRequest,
                              context: grpc.aio.ServicerContext) -> pb.GetBudgetStatusResponse:
        who = await self._caller(context)
        attrs = await self._subject(context, who, request.identity if request.HasField("identity") else None,
                                    "budget status")
        engine = self.gw.budgets
        statuses: list[BudgetStatus] = []
        if engine is not None:
            try:
                statuses = await engine.status(attrs)
            except StoreError as e:
                await context.abort(grpc.StatusCode.UNAVAILABLE, f"budget store unavailable: {e}")
        resp = pb.GetBudgetStatusResponse(identity=identity_pb(attrs), budgets=[counter_pb(s) for s in statuses])
        if request.forecast and statuses:
            await self._forecasts(context, resp.budgets, [status_row(s) for s in statuses])
        return resp

    async def _forecasts(self, context: grpc.aio.ServicerContext, out: Any, rows: list[dict[str, Any]],
                         rollups: Any = None) -> None:
        """Attach each counter's forecast (extproc/forecast.py, from the last 7 days of rollups;
        `rollups`: days already read, reused when they end today)."""
        if self.gw.redis is None:
            return
        try:
            fcs = await counter_forecasts(self._reader(), rows, self.gw.config.doc.budgets, now=self.gw.clock(),
                                          rollups=rollups)
        except Exception as e:  # Redis down or slow
            if isinstance(e, (OSError, TimeoutError)) or type(e).__module__.startswith("redis"):
                await context.abort(grpc.StatusCode.UNAVAILABLE, f"usage store unavailable: {type(e).__name__}: {e}")
            raise
        for counter, (fc, text) in zip(out, fcs):
            if fc is not None:
                counter.forecast.CopyFrom(forecast_pb(fc, text))

    # ---- GetDashboard ---------------------------------------------------------------------

    @logged(dashboard_read, dashboard_returned)
    async def GetDashboard(self, request: pb.GetDashboardRequest,
                           context: grpc.aio.ServicerContext) -> pb.GetDashboardResponse:
        """Everything the page shows, in one call: usage from the rollups (the same `aggregate`
        as GetUsage and `tollgate report`), counters with forecasts (as `tollgate budgets
        --forecast`). A non-admin's usage is filtered to their own `user`, their counters are
        the ones they count against (as GetBudgetStatus)."""
        who = await self._caller(context)
        admin = self.is_admin(who)
        now = self.gw.clock()
        today = dt.datetime.fromtimestamp(now, dt.timezone.utc).date()
        by = request.by or "team"
        try:
            start, end = dashboard_data.date_range(getattr(request, "from"), request.to, today)
            if by not in dashboard_data.BY:
                raise ValueError(f"by {by!r}: use one of {', '.join(dashboard_data.BY)}")
        except ValueError as e:
            await self._invalid(context, f"{e} (dates are YYYY-MM-DD, UTC days)")
            raise
        if self.gw.redis is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "this gateway runs without Redis: no usage is recorded")
        scope = {} if admin else {"user": who.user}
        if not admin:
            note_subject(who.attrs(), True)
        try:
            raw = await read_raw_rollups(self._reader(), start, end)

            def decode_and_group() -> tuple[Any, Any]:
                days = decode_rollups(raw)
                return days, dashboard_data.usage(days, by=by, where=scope or None)

            # seconds of CPU for months of rollups: off the event loop that serves LLM requests
            days, u = await asyncio.to_thread(decode_and_group)
            if admin:
                rows = await budget_counters(self._reader(), now=now)
            else:
                rows = [status_row(s) for s in (await self.gw.budgets.status(who.attrs())
                                                  if self.gw.budgets is not None else [])]
        except StoreError as e:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"budget store unavailable: {e}")
            raise
        except Exception as e:
            if isinstance(e, (OSError, TimeoutError)) or type(e).__module__.startswith("redis"):
                await context.abort(grpc.StatusCode.UNAVAILABLE, f"usage store unavailable: {type(e).__name__}: {e}")
            raise
        modes = {b.name: b.mode for b in self.gw.config.doc.budgets}
        resp = pb.GetDashboardResponse(
            identity=identity_pb(who.attrs()), admin=admin, to=end.isoformat(), by=by,
            days=[d.isoformat() for d in u.days],
            series=[pb.DashboardSeries(key=x.key, cost_nusd=x.cost_nusd, total_nusd=x.total_nusd) for x in u.series],
            top=[self._row(r) for r in u.top], totals=self._row(u.totals),
            decisions=[pb.DecisionDay(day=d.isoformat(), **c) for d, c in zip(u.days, u.decisions)],
            budgets=[counter_row_pb(r, modes) for r in rows],
            generated_at=budget_replies.iso(now) or "", scope=scope,
        )
        setattr(resp, "from", start.isoformat())
        await self._forecasts(context, resp.budgets, rows, days)
        return resp

    @logged(lambda r: {}, None)
    async def GetDashboardPage(self, request: pb.GetDashboardPageRequest, context: grpc.aio.ServicerContext) -> Any:
        """The page: static, with no data in it (the numbers come from GetDashboard, which
        authenticates the viewer), so it is served without a credential, like a login page."""
        return httpbody_pb2.HttpBody(content_type="text/html; charset=utf-8", data=dashboard.page())

    # ---- DryRun ---------------------------------------------------------------------------

    @logged(dry_run_read, dry_run_returned)
    async def DryRun(self, request: pb.DryRunRequest, context: grpc.aio.ServicerContext) -> pb.DryRunResponse:
        who = await self._caller(context)
        attrs = await self._subject(context, who, request.identity if request.HasField("identity") else None,
                                    "a dry run")
        path = request.path or DEFAULT_PATH
        api = api_for_path(path)
        if api is None:
            await self._invalid(context, f"path {path!r}: use /v1/chat/completions, /v1/responses, "
                                         "/v1/embeddings or /v1/messages")
            raise AssertionError
        model = request.model
        if not model:
            await self._invalid(context, "model is required")
        if request.max_output_tokens < 0 or request.input_bytes < 0 or request.input_tokens < 0:
            await self._invalid(context, "max_output_tokens, input_bytes and input_tokens cannot be negative")
        if not request.input_bytes and not request.input_tokens:
            await self._invalid(context, "give the request's size: input_bytes (body size) or input_tokens")
        config = self.gw.config
        input_upper = int(request.input_tokens or request.input_bytes)
        resp = pb.DryRunResponse(model_requested=model, identity=identity_pb(attrs), stream=request.stream)

        def refuse(status: int, code: str, message: str, allowed_models: list[str] | None = None) -> pb.DryRunResponse:
            resp.decision = "refused"
            resp.reason = message
            resp.refusal.CopyFrom(pb.Refusal(http_status=status, code=code, message=message,
                                             allowed_models=allowed_models or []))
            return resp

        limit = config.gateway.max_request_bytes
        if request.input_bytes > limit:
            return refuse(413, "request_too_large",
                          f"Request body is {request.input_bytes} bytes; this gateway accepts at most {limit}.")
        try:
            cand, adm = await self.gw.admitter.preview(config, api, model, request.max_output_tokens or None, attrs,
                                                       path, input_upper)
        except GatewayError as e:
            return refuse(e.status, e.code or e.type, e.message, list(e.extra.get("allowed_models", [])))
        cap, cost_fn = cand.cap, cand.cost_fn
        resp.provider = cand.provider
        if adm is None:
            worst = cost_fn(model, input_upper, cap) or 0
            resp.decision, resp.reason = "allowed", "no budget applies"
            resp.model_served, resp.max_output_tokens = model, cap
            resp.worst_case_cost_usd, resp.worst_case_cost_nusd = usd(worst), worst
            return resp
        resp.budgets.extend(adm.budgets)
        resp.shadow_blocked.extend(s.name for s in adm.shadow_blocked)
        resp.warnings.extend(s.name for s in adm.warnings)
        if adm.blocking is not None:
            resp.blocking_budget.CopyFrom(counter_pb(adm.blocking))
        if adm.tightest is not None:
            resp.tightest_budget.CopyFrom(counter_pb(adm.tightest))
        if adm.decision == "store_error":
            err = budget_replies.store_unavailable()
            return refuse(err.status, err.code or "budget_store_unavailable", adm.reason or err.message)
        if adm.decision == "blocked":
            worst = cost_fn(model, input_upper, cap) or 0
            err = (budget_replies.rate_limited(adm, api) if adm.limited is not None  # a rate limit's window
                   else budget_replies.blocked(adm, model, worst))
            resp.decision, resp.reason = "blocked", adm.reason
            resp.model_served, resp.max_output_tokens = model, cap
            resp.worst_case_cost_usd, resp.worst_case_cost_nusd = usd(worst), worst
            resp.refusal.CopyFrom(pb.Refusal(http_status=err.status, code=err.code or "budget_exceeded",
                                             message=err.message))
            return resp
        worst = cost_fn(adm.model, input_upper, adm.max_output_tokens) or 0
        resp.decision, resp.reason = adm.decision, adm.reason
        resp.model_served, resp.provider = adm.model, adm.provider
        resp.max_output_tokens = adm.max_output_tokens
        resp.max_output_tokens_clamped = api.has_output and adm.max_output_tokens < cap
        resp.worst_case_cost_usd, resp.worst_case_cost_nusd = usd(worst), worst
        return resp


def add_to_server(gw: "Gateway", server: grpc.aio.Server, access_log: AdminAccessLog | None = None) -> None:
    pb_grpc.add_AdminServicer_to_server(AdminService(gw, access_log), server)


SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Admin"].full_name
