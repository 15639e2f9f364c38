"""The phases of one request: one `Processor` per ext_proc gRPC stream, one method per phase.

Envoy sends request headers, the buffered request body, response headers, then the response body
(buffered for JSON, streamed chunk by chunk for SSE). The processor decides in the request-body
phase (parse, price, route) and accounts in the response phases. It never raises into the server
loop for a client's mistake: refusals are `GatewayError`s answered as ImmediateResponses.

Every forwarded request is settled exactly once (`finish`): at the end of the response, when the
live cap stops a stream (`end: budget_cap`), or in `close` when the client or the upstream went
away first (`end: interrupted`, `complete: false`: input plus the output deltas seen, counted
conservatively, never $0 and never the whole reservation).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

import orjson
from envoy.service.ext_proc.v3.external_processor_pb2 import BodyMutation, CommonResponse, HttpBody, HttpHeaders, ProcessingResponse

from . import access, decide
from . import messages as msg
from .budgets import Admission
from .budgets import replies as budget_replies
from .errors import GatewayError, Shape, bad_request
from .identity import AuthError, Identity
from .pricing import NANO_PER_USD, ModelPrice, Usage
from .providers import Api, ParsedRequest, SSEParser, StreamState, api_for_path
from .usage import usage_write

if TYPE_CHECKING:
    from .app import Gateway

# Headers a client may not set: only the gateway speaks `x-tollgate-*`.
_STRIPPED_PREFIXES = ("x-tollgate-", "cf-access-")
UPSTREAM_HEADER = "x-tollgate-upstream"
METADATA_HEADER = "x-tollgate-metadata"  # custom attributes, from trusted identities only
# Attributes a metadata header can never set: they come from verified identity or the request.
_PROTECTED_ATTRS = frozenset({"user", "email", "groups", "team", "app", "service_token", "source", "model", "provider"})


class Processor:
    """State and logic for one HTTP request passing through Envoy."""

    def __init__(self, gw: "Gateway") -> None:
        self.gw = gw
        self.config = gw.config  # one config for the whole request, even if a reload happens
        self.started = time.monotonic()
        self.request_id = ""
        self.path = ""
        self.shape: Shape = "openai"
        self.api: Api | None = None
        self.req: ParsedRequest | None = None
        self.price: ModelPrice | None = None
        self.provider: str | None = None
        self.model_served: str | None = None
        self.status = 0
        self.streamed = False
        self.sse: SSEParser | None = None
        self.stream_state: StreamState | None = None
        self.body_chunks: list[bytes] = []
        self.forwarded = False
        self.finished = False
        self.decision = "allowed"
        self.error_code: str | None = None
        self.identity: Identity | None = None
        self.metadata: dict[str, str | list[str]] = {}
        self.admission: Admission | None = None
        self.shadow_blocked: list[str] = []
        self.decision_reason: str | None = None
        self.settlement: str | None = None
        self.envoy_request_id = ""
        self.end = "completed"
        self.capping = False  # the live cap tripped; the stream ends at the next event boundary
        self.stream_cut = False  # the live cap ended the client's stream; later chunks are dropped

    # ---- request headers -------------------------------------------------------------
    async def request_headers(self, h: HttpHeaders) -> ProcessingResponse:
        headers = _headers(h)
        self.request_id = uuid.uuid4().hex
        self.envoy_request_id = headers.get("x-request-id", "")
        self.path = headers.get(":path", "")
        method = headers.get(":method", "")
        bare_path = self.path.split("?", 1)[0]
        self.shape = "anthropic" if bare_path.startswith("/v1/messages") else "openai"
        try:
            try:
                self.identity = await self.gw.auth.authenticate(headers)
            except AuthError as e:
                raise GatewayError(e.status, e.message, type="authentication_error", code=e.check) from None
            self.metadata = self._trusted_metadata(headers.get(METADATA_HEADER))
            if bare_path == "/v1/models" and method == "GET":
                return self._models_reply()
            self.api = api_for_path(bare_path)
            if self.api is None:
                raise GatewayError(404, f"Unknown path {bare_path!r}: Tollgate serves /v1/chat/completions, "
                                   "/v1/responses, /v1/embeddings, /v1/messages and /v1/models.",
                                   code="unknown_path")
            if method != "POST":
                raise GatewayError(405, f"{bare_path} accepts POST only.", code="method_not_allowed")
            if h.end_of_stream:
                raise bad_request("The request has no body.", code="missing_body")
            limit = self.config.gateway.max_request_bytes
            length = headers.get("content-length")
            if length is not None and length.isdigit() and int(length) > limit:
                raise _too_large(int(length), limit)
        except GatewayError as e:
            return self._refuse(e)
        # Nothing the client said about identity or routing goes further: credentials that
        # identified it, every x-tollgate-* header, Cloudflare Access's identity headers and
        # cookies (Access's CF_Authorization cookie carries the JWT) are removed.
        assert self.identity is not None
        creds = self.gw.auth.headers_to_strip(self.identity)
        remove = [k for k in headers if k.startswith(_STRIPPED_PREFIXES) or k in creds or k == "cookie"]
        return msg.request_headers(msg.common(remove=remove) if remove else None)

    # ---- request body ----------------------------------------------------------------
    async def request_body(self, b: HttpBody) -> ProcessingResponse:
        assert self.api is not None
        api = self.api
        try:
            raw = b.body
            limit = self.config.gateway.max_request_bytes
            if len(raw) > limit:
                raise _too_large(len(raw), limit)
            req = self.req = api.parse(raw)
            attrs = self._attrs()
            cand = decide.check(self.config, api, req.model, req.output_cap, attrs, self.path)
            self.price, self.provider = cand.price, cand.provider
            changed = await self._admit(req, attrs, cand)
        except GatewayError as e:
            return self._refuse(e)
        changed = (req.stream and api.prepare_stream(req.body)) or changed
        set_headers = {UPSTREAM_HEADER: self.provider}
        remove: list[str] = []
        key = self.gw.provider_keys.get(self.provider)
        if key:
            if api.wire == "anthropic":
                set_headers["x-api-key"] = key
                remove.append("authorization")
            else:
                set_headers["authorization"] = f"Bearer {key}"
                remove.append("x-api-key")
        body = None
        if changed:
            body = orjson.dumps(req.body)
            set_headers["content-length"] = str(len(body))
        self.forwarded = True
        meta = msg.metadata({"provider": self.provider, "model_requested": req.model,
                             "model_served": self.model_served, "decision": self.decision, **self._request_meta()})
        return msg.request_body(msg.common(set_headers, remove, body, clear_route_cache=True), meta)

    async def _admit(self, req: ParsedRequest, attrs: dict[str, str | list[str]], cand: decide.Candidate) -> bool:
        """Reserve the worst case against every matching budget; apply a downgrade or clamp.

        Returns True when the body changed. Raises GatewayError on a block or a dead store.
        """
        assert self.api is not None
        self.model_served = req.model
        engine = self.gw.budgets
        if engine is None:
            return False
        cap, cost_fn = cand.cap, cand.cost_fn
        adm = self.admission = await engine.admit(
            request_id=self.request_id, attrs=attrs, model=req.model, provider=cand.provider,
            input_tokens=req.input_tokens_upper, max_output_tokens=cap, min_output_tokens=min(16, cap),
            cost_fn=cost_fn, provider_of=cand.provider_of,
            lease_seconds=self.config.gateway.request_timeout_seconds + 60)
        self.shadow_blocked = [st.name for st in adm.shadow_blocked]
        if adm.store_error:
            self.gw.metrics.redis_error("admit")
        if adm.decision == "blocked":
            raise budget_replies.blocked(adm, req.model, cost_fn(req.model, req.input_tokens_upper, cap))
        if adm.decision == "store_error":
            raise budget_replies.store_unavailable()
        self.decision = adm.decision
        self.decision_reason = adm.reason or None
        changed = False
        if adm.model != req.model:
            self.api.set_model(req.body, adm.model)
            self.provider, self.model_served = adm.provider, adm.model
            self.price = self.config.prices.lookup(adm.model)
            changed = True
        if self.api.has_output and adm.max_output_tokens < cap:
            self.api.set_output_cap(req.body, adm.max_output_tokens)
            changed = True
        return changed

    def _attrs(self) -> dict[str, str | list[str]]:
        attrs: dict[str, str | list[str]] = dict(self.metadata)
        if self.identity is not None:
            attrs.update(self.identity.attrs())
        return attrs

    def _trusted_metadata(self, raw: str | None) -> dict[str, str | list[str]]:
        """Custom attributes from `x-tollgate-metadata`, honoured only for trusted identity sources."""
        if not raw or self.identity is None:
            return {}
        trusted = self.config.gateway.trusted_metadata_sources
        if not trusted or not access.value_matches(self.identity.source, trusted):
            return {}
        try:
            obj = orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise bad_request(f"{METADATA_HEADER} must be a JSON object of strings.", code="invalid_metadata") from None
        if not isinstance(obj, dict):
            raise bad_request(f"{METADATA_HEADER} must be a JSON object of strings.", code="invalid_metadata")
        out: dict[str, str | list[str]] = {}
        for k, v in obj.items():
            if k in _PROTECTED_ATTRS:
                continue
            if isinstance(v, str):
                out[k] = v
            elif isinstance(v, list) and all(isinstance(x, str) for x in v):
                out[k] = v
        return out

    # ---- response headers ------------------------------------------------------------
    async def response_headers(self, h: HttpHeaders) -> ProcessingResponse:
        headers = _headers(h)
        self.status = int(headers.get(":status", "0") or 0)
        add = self._response_headers()
        if h.end_of_stream:
            await self.finish()
            return msg.response_headers(msg.common(add))
        if headers.get("content-type", "").startswith("text/event-stream"):
            self.streamed = True
            self.sse = SSEParser()
            self.stream_state = StreamState()
            return msg.response_headers(msg.common(add), msg.STREAMED_RESPONSE)
        return msg.response_headers(msg.common(add))

    def _response_headers(self) -> dict[str, str]:
        """Headers every forwarded response carries: who served it and what budget is left."""
        add = {"x-tollgate-request-id": self.request_id}
        if self.model_served:
            add["x-tollgate-model-served"] = self.model_served
        adm = self.admission
        if adm is not None:
            add["x-tollgate-decision"] = adm.decision
            if adm.tightest is not None:  # the enforce budget with the least left, after this reservation
                add.update(budget_replies.status_headers(adm.tightest))
            if adm.decision == "clamped" or (adm.decision == "downgraded" and self.req
                                             and adm.max_output_tokens < (self.req.output_cap or 1 << 60)):
                add["x-tollgate-max-tokens-clamped"] = str(adm.max_output_tokens)
            if adm.warnings:
                add["x-tollgate-budget-warning"] = ", ".join(
                    f"{w.name} at {round(100 * (w.spent_nusd + w.reserved_nusd) / max(w.limit_nusd, 1))}%"
                    for w in adm.warnings)
        return add

    # ---- response body ---------------------------------------------------------------
    async def response_body(self, b: HttpBody) -> ProcessingResponse:
        if self.streamed:
            return await self._stream_chunk(b)
        self.body_chunks.append(b.body)
        if not b.end_of_stream:
            return msg.response_body()
        record = await self.finish()
        add = {}
        if record.get("cost_usd") is not None and self.status < 400:
            add["x-tollgate-cost-usd"] = f"{record['cost_usd']:.9f}".rstrip("0").rstrip(".") or "0"
        return msg.response_body(msg.common(add) if add else None, _meta(record))

    async def _stream_chunk(self, b: HttpBody) -> ProcessingResponse:
        """One chunk of an SSE response (STREAMED mode): parse it, account, enforce the live cap."""
        assert self.sse is not None and self.stream_state is not None and self.api is not None
        if self.stream_cut:
            # The live cap already ended the stream for the client. The last message ends it
            # cleanly (an empty body); any other chunk means the provider is still generating
            # tokens it will bill: an ImmediateResponse makes Envoy reset both the client stream
            # (already given its error event) and the upstream request, which stops them.
            # (Measured: empty bodies instead keep the client waiting, with nothing more to read,
            # until the provider finishes on its own; the client then sees a clean end.)
            if b.end_of_stream:
                return msg.response_body(CommonResponse(body_mutation=BodyMutation(clear_body=True)))
            return msg.immediate(200, b"", details="tollgate_budget_cap")
        st = self.stream_state
        for event, data in self.sse.feed(b.body):
            self.api.on_event(st, event, data)
        if b.end_of_stream:
            for event, data in self.sse.flush():
                self.api.on_event(st, event, data)
            if not self.capping or st.done:
                record = await self.finish()
                return msg.response_body(meta=_meta(record))
        elif not self.capping:
            if st.done or self.live_cap_nusd is None or self._running_cost() <= self.live_cap_nusd:
                return msg.response_body()
            self.capping = True
        # Over the reservation: end the client's stream at the first event boundary with an error
        # event in the provider's shape, then settle for what was forwarded.
        cut = len(b.body) if (b.end_of_stream or not self.sse.mid_event) else _last_boundary(b.body)
        if cut < 0:  # no event ends in this chunk: forward it, cut at the next boundary
            return msg.response_body()
        self.stream_cut = True
        record = await self.finish(end="budget_cap")
        body = b.body[:cut] + self.api.stream_error_event(self._cap_error())
        return msg.response_body(msg.common(body=body), _meta(record))

    @property
    def live_cap_nusd(self) -> int | None:
        """What a stream may cost before the live cap stops it: the request's reservation, when an
        enforced budget holds one (shadow-only or no budgets: no cap)."""
        adm = self.admission
        if adm is None or not adm.counters or adm.tightest is None or adm.store_error:
            return None
        return adm.reserved_nusd

    def _running_cost(self) -> int:
        """Cost so far, as a floor: the input (the provider's count once it has said, else the same
        upper bound the reservation used) plus one token per output delta. A provider that honours
        the output cap can never push this over the reservation, so an honest stream is never cut."""
        assert self.price is not None and self.req is not None and self.stream_state is not None
        st = self.stream_state
        if st.usage is not None and st.usage.total_input_tokens:
            u = st.usage
            return self.price.cost_nusd(Usage(u.input_tokens, u.cached_input_tokens, u.cache_write_tokens,
                                              max(u.output_tokens, st.output_deltas)))
        return self.price.worst_case_nusd(self.req.input_tokens_upper, st.output_deltas)

    def _cap_error(self) -> dict[str, Any]:
        adm = self.admission
        assert adm is not None
        name = adm.tightest.name if adm.tightest is not None else "budget"
        message = (f"Tollgate stopped this response: it used up the ${adm.reserved_nusd / NANO_PER_USD:.6f} "
                   f"reserved for it against budget {name!r} (the provider produced more output than the "
                   "request's output cap allows). The output so far is charged.")
        return {"message": message, "type": "budget_exceeded", "code": "budget_exceeded"}

    # ---- end of the request ----------------------------------------------------------
    async def close(self) -> None:
        """The gRPC stream ended. If the response never completed, account for it now.

        Measured with Envoy 1.40 (STREAMED response body): when the client disconnects mid-stream,
        and when the upstream resets mid-stream, Envoy sends the ext_proc nothing more (no final
        body message, no trailers) and just ends the gRPC stream, with a half-close or a reset
        (grpc.aio then ends the request iterator, or closes the handler with GeneratorExit /
        CancelledError). Which of the two it is races with the cause (a client cancel through the
        anthropic SDK came as a reset; 1 upstream cut in 16 as a half-close), so the processor
        cannot tell who went away: the record says `end: "interrupted"`, and Envoy's access log
        (flags DC vs UPE, details downstream_remote_disconnect vs upstream_reset_...) says which,
        joined on request_id.
        """
        if not self.finished and self.forwarded:
            await self.finish(end="interrupted")

    async def finish(self, end: str = "completed") -> dict[str, Any]:
        """Work out the real usage and cost, settle, and write the attribution record (once).

        `end` is how the response ended: "completed" (Envoy saw its end), "interrupted" (the
        client or the upstream went away first; see `close`) or "budget_cap" (the live cap
        stopped it). The settle runs shielded from
        cancellation, so a reset arriving mid-settle cannot lose it; the `finished` flag (and the
        budget store's per-request marker) make it happen once.
        """
        if self.finished:
            return {}
        self.finished = True
        self.end = end
        return await asyncio.shield(self._settle_and_record(end))

    async def _settle_and_record(self, end: str) -> dict[str, Any]:
        usage, complete = self._usage(end)
        cost = self.price.cost_nusd(usage) if (self.price and usage) else 0
        record = self._record(usage, cost, complete)
        engine = self.gw.budgets
        if engine is not None:
            # One atomic call: the real cost replaces the reservation (no usage, e.g. an upstream
            # error, frees it), the day's usage rollup grows, and the record joins the stream.
            counters = self.admission.counters if self.admission is not None else ()
            self.settlement = record["settlement"] = await engine.account(
                self.request_id, counters, cost, usage=self._usage_write(record, rollup=usage is not None))
            if self.settlement == "store_error":
                self.gw.metrics.redis_error("settle")
        self.gw.record(record)
        return record

    def _usage(self, end: str) -> tuple[Usage | None, bool]:
        if self.api is None or self.req is None:
            return None, True
        if self.streamed and self.stream_state is not None:
            st = self.stream_state
            if st.served_model:
                self.model_served = st.served_model
            if st.done and st.usage is not None and end == "completed":
                return st.usage, True
            if self.status and self.status >= 400:
                return None, True
            # Cut short: the provider's input count if it gave one (Anthropic's message_start),
            # else the request's upper bound; output counted from the deltas, conservatively.
            if st.usage is not None and st.usage.total_input_tokens:
                u = st.usage
                usage = Usage(u.input_tokens, u.cached_input_tokens, u.cache_write_tokens, u.output_tokens)
            else:
                usage = Usage(input_tokens=self.req.input_tokens_upper)
            usage.output_tokens = max(usage.output_tokens, st.output_estimate, st.output_deltas)
            return usage, False
        if end != "completed":
            # Interrupted before or while a JSON body came: the provider had the prompt, so its
            # input is charged (the request's upper bound), never $0. An error status costs nothing.
            if self.status >= 400:
                return None, False
            return Usage(input_tokens=self.req.input_tokens_upper), False
        try:
            obj = orjson.loads(b"".join(self.body_chunks))
        except orjson.JSONDecodeError:
            obj = None
        if not isinstance(obj, dict):
            return None, True
        if isinstance(obj.get("model"), str):
            self.model_served = obj["model"]
        return self.api.usage_from_json(obj), True

    def _usage_write(self, record: dict[str, Any], rollup: bool) -> Any:
        return usage_write(record, rollup=rollup, stream_maxlen=self.config.gateway.attribution_stream_maxlen)

    def _request_meta(self) -> dict[str, Any]:
        i = self.identity
        if i is None:
            return {"request_id": self.request_id}
        return {"request_id": self.request_id, "user": i.user, "email": i.email, "groups": ",".join(i.groups), "team": i.team, "app": i.app,
                "service_token": i.service_token, "auth_source": i.source}

    def _record(self, usage: Usage | None, cost_nusd: int, complete: bool) -> dict[str, Any]:
        u = usage or Usage()
        i = self.identity
        return {
            "ts": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
            "request_id": self.request_id,
            "envoy_request_id": self.envoy_request_id,
            "user": i.user if i else None,
            "email": i.email if i else None,
            "groups": list(i.groups) if i else [],
            "team": i.team if i else None,
            "app": i.app if i else None,
            "service_token": i.service_token if i else None,
            "auth_source": i.source if i else None,
            "metadata": self.metadata,
            "api": self.api.name if self.api else None,
            "provider": self.provider,
            "model_requested": self.req.model if self.req else None,
            "model_served": self.model_served,
            "decision": self.decision,
            "reason": self.decision_reason,
            "budgets": self.admission.budgets if self.admission else [],
            "warnings": [w.name for w in self.admission.warnings] if self.admission else [],
            "shadow_blocked": self.shadow_blocked,
            "reserved_usd": self.admission.reserved_nusd / NANO_PER_USD if self.admission else 0.0,
            "settlement": self.settlement,
            "budget_store_error": bool(self.admission and self.admission.store_error),
            "error_code": self.error_code,
            "stream": self.streamed,
            "complete": complete,
            "end": self.end,
            "input_tokens": u.input_tokens,
            "cached_input_tokens": u.cached_input_tokens,
            "cache_write_tokens": u.cache_write_tokens,
            "output_tokens": u.output_tokens,
            "cost_usd": cost_nusd / NANO_PER_USD,
            "cost_nusd": cost_nusd,
            "status": self.status,
            "latency_ms": round((time.monotonic() - self.started) * 1000, 3),
        }

    # ---- refusals --------------------------------------------------------------------
    def _refuse(self, err: GatewayError) -> ProcessingResponse:
        """Answer the client directly and record the refusal."""
        self.status = err.status
        self.decision = "blocked" if err.type == "budget_exceeded" else "refused"
        if self.decision == "blocked" and self.admission is not None:
            self.decision_reason = self.admission.reason or None
        self.error_code = err.code or err.type
        self.finished = True
        record = self._record(None, 0, True)
        self.gw.record(record)
        if self.gw.budgets is not None:  # refusals join the attribution stream too (nothing to settle)
            _spawn(self.gw.budgets.account(self.request_id, (), 0, usage=self._usage_write(record, rollup=False)))
        meta = msg.metadata({**self._request_meta(), "decision": self.decision, "status": self.status})
        return msg.error_reply(err, self.shape, {"x-tollgate-request-id": self.request_id}, meta)

    def internal_error(self, phase: str) -> ProcessingResponse:
        """A bug in this request's handling: fail this request only, never the server.

        Before the request is forwarded the client gets a JSON 500; after, the response passes
        through untouched (the provider already did the work) and accounting continues.
        """
        if phase == "response_headers":
            return msg.response_headers()
        if phase == "response_body":
            return msg.response_body()
        return self._refuse(GatewayError(500, "Tollgate hit an internal error processing this request.",
                                         type="api_error", code="gateway_internal_error"))

    def _models_reply(self) -> ProcessingResponse:
        created = int(self.gw.clock())
        rules, attrs = self.config.doc.access, self._attrs()
        data = [{"id": m, "object": "model", "created": created, "owned_by": "tollgate"}
                for m in self.config.prices.names() if not rules or access.allowed(rules, attrs, m)]
        self.finished = True
        return msg.immediate(200, orjson.dumps({"object": "list", "data": data}), details="tollgate_models",
                             meta=msg.metadata(self._request_meta()))


def _last_boundary(raw: bytes) -> int:
    """Offset just past the last blank line (SSE event end) in `raw`, or -1."""
    return max((i + len(sep) for sep in (b"\n\n", b"\r\n\r\n", b"\r\r") if (i := raw.rfind(sep)) >= 0), default=-1)


_BACKGROUND: set[asyncio.Task[Any]] = set()


def _spawn(coro: Any) -> None:
    """Run `coro` without making the client wait; keep a reference so it is not collected."""
    task = asyncio.get_running_loop().create_task(coro)
    _BACKGROUND.add(task)
    task.add_done_callback(_BACKGROUND.discard)


def _headers(h: HttpHeaders) -> dict[str, str]:
    out = {}
    for hv in h.headers.headers:
        out[hv.key] = hv.raw_value.decode("utf-8", "replace") if hv.raw_value else hv.value
    return out


def _too_large(size: int, limit: int) -> GatewayError:
    return GatewayError(413, f"Request body is {size} bytes; this gateway accepts at most {limit}.",
                        type="invalid_request_error", code="request_too_large")


def _meta(record: dict[str, Any]):
    return msg.metadata({k: record[k] for k in ("model_served", "decision", "cost_usd", "input_tokens",
                                                 "output_tokens", "status") if k in record})
