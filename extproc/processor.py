"""The Envoy side of one request: one `Processor` per ext_proc gRPC stream, one method per phase.

Envoy sends request headers, the buffered request body, response headers, then the response body
(buffered for JSON, streamed chunk by chunk for SSE). This module only translates between those
messages and the request's lifecycle objects (extproc/lifecycle/): the context that holds what is
known, the admitter that reserves, the meters that read usage, the settler that ends the
reservation exactly once. It never raises into the server loop for a client's mistake: refusals
are `GatewayError`s answered as ImmediateResponses.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import orjson
from envoy.service.ext_proc.v3.external_processor_pb2 import HttpBody, HttpHeaders, ProcessingResponse

from . import access
from . import messages as msg
from .budgets import replies as budget_replies
from .cache import CACHE_HEADER, CacheFlow  # response cache (extproc/cache/)
from .errors import GatewayError, bad_request
from .identity import AuthError
from .lifecycle.concurrency import Slot
from .lifecycle.context import RequestContext, State
from .lifecycle.meters import JsonMeter, SseMeter
from .lifecycle.record import identity_fields
from .lifecycle.settler import Settler
from .pricing import NANO_PER_USD
from .providers import api_for_path

if TYPE_CHECKING:
    from .app import Gateway

# Headers a client may not set: only the gateway speaks `x-tollgate-*`.
_STRIPPED_PREFIXES = ("x-tollgate-", "cf-access-", "x-auth-request-")
# Identity headers other proxies use (oauth2-proxy, nginx auth_request, Apache): an upstream or
# a log pipeline that trusts them must never receive a client's own.
_IDENTITY_LOOKALIKES = frozenset({"x-forwarded-user", "x-forwarded-email", "x-forwarded-groups",
                                  "x-forwarded-preferred-username", "x-forwarded-access-token", "x-remote-user",
                                  "remote-user", "x-user", "x-email"})
UPSTREAM_HEADER = "x-tollgate-upstream"
METADATA_HEADER = "x-tollgate-metadata"  # custom attributes, from trusted identities only
# Envoy moves a client's x-request-id here before generating its own (envoy/tollgate.yaml); like
# every x-tollgate-* header it is stripped before the request leaves.
CLIENT_REQUEST_ID_HEADER = "x-tollgate-client-request-id"
GATEWAY_ERROR_HEADER = "x-tollgate-gateway-error"  # set by Envoy's local reply mappers (envoy/tollgate.yaml)
# Attributes a metadata header can never set: they come from verified identity or the request.
_PROTECTED_ATTRS = frozenset({"user", "email", "groups", "team", "app", "service_token", "source", "model", "provider"})


class Processor:
    """The phases of one HTTP request passing through Envoy."""

    def __init__(self, gw: "Gateway") -> None:
        self.gw = gw
        # The policy current when the stream started, held to its end (extproc/runtime.py).
        self.rt = rt = gw.runtime.hold()
        self.ctx = RequestContext(rt.config)
        self.settler = Settler(gw, self.ctx, rt.budgets)
        self._client_keys: dict[str, str] = {}  # provider-key headers the client sent that are not its credential
        self._slot: Slot | None = None  # this request's place under its identity's concurrency cap
        self.cache = CacheFlow(gw.pipe or gw.redis, gw.metrics)  # cache: this request's use of the response cache

    @property
    def request_id(self) -> str:
        return self.ctx.request_id

    # ---- request headers -------------------------------------------------------------
    async def request_headers(self, h: HttpHeaders) -> ProcessingResponse:
        ctx = self.ctx
        headers = _headers(h)
        ctx.envoy_request_id = headers.get("x-request-id", "")
        ctx.client_request_id = headers.get(CLIENT_REQUEST_ID_HEADER, "")
        ctx.path = headers.get(":path", "")
        method = headers.get(":method", "")
        bare_path = ctx.path.split("?", 1)[0]
        ctx.shape = "anthropic" if bare_path.startswith("/v1/messages") else "openai"
        try:
            try:
                ctx.identity = await self.rt.auth.authenticate(headers)
            except AuthError as e:
                raise GatewayError(e.status, e.message, type="authentication_error", code=e.check) from None
            self._slot = self.gw.concurrency.acquire(ctx.identity, ctx.config.gateway.limits.concurrent_requests_per_identity)
            ctx.metadata = self._trusted_metadata(headers.get(METADATA_HEADER))
            self.cache.read_headers(headers)  # cache: x-tollgate-cache* (stripped below like every x-tollgate-*)
            if bare_path == "/v1/models" and method == "GET":
                return self._models_reply()
            ctx.api = api_for_path(bare_path)
            if ctx.api is None:
                raise GatewayError(404, f"Unknown path {bare_path!r}: Tollgate serves /v1/chat/completions, "
                                   "/v1/responses, /v1/embeddings, /v1/messages and /v1/models.",
                                   code="unknown_path")
            if method != "POST":
                raise GatewayError(405, f"{bare_path} accepts POST only.", code="method_not_allowed")
            if h.end_of_stream:
                raise bad_request("The request has no body.", code="missing_body")
            limit = ctx.config.gateway.max_request_bytes
            length = headers.get("content-length")
            if length is not None and length.isdigit() and int(length) > limit:
                raise _too_large(int(length), limit)
        except GatewayError as e:
            return await self._refuse(e)
        # Nothing the client said about identity or routing goes further: credentials that
        # identified it, every x-tollgate-* header, Cloudflare Access's identity headers and
        # cookies (Access's CF_Authorization cookie carries the JWT) are removed.
        assert ctx.identity is not None
        remove, answer = _to_remove(tuple(headers), self.rt.auth.headers_to_strip(ctx.identity))
        # Provider-key headers still present: decided once the provider is known (request body).
        self._client_keys = {k: headers[k] for k in ("authorization", "x-api-key") if k in headers and k not in remove}
        return answer

    # ---- request body ----------------------------------------------------------------
    async def request_body(self, b: HttpBody) -> ProcessingResponse:
        ctx = self.ctx
        api = ctx.api
        assert api is not None
        try:
            raw = b.body
            limit = ctx.config.gateway.max_request_bytes
            if len(raw) > limit:
                raise _too_large(len(raw), limit)
            req = ctx.req = api.parse(raw, ctx.config.gateway.bounds)
            changed = await self.rt.admitter.admit(ctx)
            changed = (req.stream and api.prepare_stream(req.body)) or changed
            body = _dumps(req.body) if changed else None
            hit = await self.cache.lookup(ctx)  # cache: after identity, model access and the reservation
        except GatewayError as e:
            return await self._refuse(e)
        if hit is not None:  # cache: answered here, $0, never forwarded
            return await self.cache.answer(hit, ctx, self.settler, self._response_headers(), self._request_meta())
        assert ctx.provider is not None
        set_headers = {UPSTREAM_HEADER: ctx.provider}
        remove: list[str] = []
        provider = ctx.config.providers[ctx.provider]
        key = self.rt.provider_keys.get(ctx.provider)
        if key:
            if api.wire == "anthropic":
                set_headers["x-api-key"] = key
                remove.append("authorization")
            else:
                set_headers["authorization"] = f"Bearer {key}"
                remove.append("x-api-key")
        elif provider.key is not None:  # its key source read nothing and the policy let it start
            return await self._refuse(GatewayError(
                503, f"Provider {ctx.provider!r} has no key configured on this gateway; ask your platform team.",
                type="api_error", code="provider_key_missing"))
        else:
            # No gateway key: the client's own provider key goes only where the policy says so,
            # and a Tollgate credential never does.
            remove += [h for h in self._client_keys
                       if not provider.pass_client_key or self.rt.auth.is_tollgate_credential(h, self._client_keys[h])]
        ctx.to(State.FORWARDED)
        ids = {"request_id": ctx.request_id, "client_request_id": ctx.client_request_id or None}

        def answer(body: bytes | None = None) -> ProcessingResponse:
            if body is not None:
                set_headers["content-length"] = str(len(body))
            meta = {"provider": ctx.provider, "model_requested": req.model, "model_served": ctx.model_served,
                    "decision": ctx.decision, **identity_fields(ctx.identity)[1]}
            return msg.request_body(set_headers, remove, body, clear_route_cache=True, meta=meta)

        if body is not None:  # a rewritten body: built whole
            pr = answer(body)
        else:  # otherwise only the ids differ from an earlier request's answer
            key = (id(ctx.identity), ctx.provider, req.model, ctx.model_served, ctx.decision,
                   *set_headers.items(), *remove)
            pr = _TEMPLATES.get(key, ctx.identity, answer)
        msg.set_meta_strings(pr, ids)
        return pr

    def _trusted_metadata(self, raw: str | None) -> dict[str, str | list[str]]:
        """Custom attributes from `x-tollgate-metadata`, honoured only for trusted identity sources."""
        identity = self.ctx.identity
        if not raw or identity is None:
            return {}
        trusted = self.ctx.config.gateway.trusted_metadata_sources
        if not trusted or not access.value_matches(identity.source, trusted):
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
        ctx = self.ctx
        headers = _headers(h)
        ctx.status = int(headers.get(":status", "0") or 0)
        ctx.gateway_error = headers.get(GATEWAY_ERROR_HEADER)
        same, own = self._response_header_parts()
        remove = (GATEWAY_ERROR_HEADER,) if ctx.gateway_error is not None else ()
        self.cache.on_response_headers(headers)  # cache
        mode = None
        if h.end_of_stream:
            await self.settler.finish()
        elif headers.get("content-type", "").startswith("text/event-stream"):
            ctx.streamed = True
            self.settler.meter = SseMeter(ctx, self._live_cap_nusd())
            mode = msg.STREAMED_RESPONSE
        else:
            self.settler.meter = JsonMeter(ctx)
        # What requests of one identity, model and budget period share comes from a template.
        pr = _RESPONSE_TEMPLATES.get((mode is None, *same.items(), *remove), None,
                            lambda: msg.response_headers(same, remove, mode))
        msg.add_headers(pr.response_headers.response.header_mutation, own)
        return pr

    def _live_cap_nusd(self) -> int | None:
        """What a stream may cost before the live cap stops it: the request's reservation, when an
        enforced budget holds one (shadow-only or no budgets: no cap)."""
        adm = self.ctx.admission
        if adm is None or not adm.counters or adm.tightest is None or adm.store_error:
            return None
        return adm.reserved_nusd

    def _response_headers(self) -> dict[str, str]:
        """Headers every forwarded response carries: who served it and what budget is left."""
        same, own = self._response_header_parts()
        return {**same, **own}

    def _response_header_parts(self) -> tuple[dict[str, str], dict[str, str]]:
        """`_response_headers` in two parts: what other requests of the same identity, model and
        budget period carry too, and what is this request's own (its id, the amounts left)."""
        ctx = self.ctx
        same = {CACHE_HEADER: self.cache.status}  # cache: hit|miss|skip|off
        add = {"x-tollgate-request-id": ctx.request_id}
        if ctx.model_served:
            same["x-tollgate-model-served"] = ctx.model_served
        adm = ctx.admission
        if adm is not None:
            same["x-tollgate-decision"] = adm.decision
            if adm.tightest is not None:  # the enforce budget with the least left, after this reservation
                fixed, left = budget_replies.status_header_parts(adm.tightest)
                same.update(fixed)
                add.update(left)
            if adm.rate_limits and ctx.api is not None:  # x-ratelimit-* / anthropic-ratelimit-*
                add.update(ctx.api.rate_limit_headers(adm.rate_limits))
            if adm.decision == "clamped" or (adm.decision == "downgraded" and ctx.req
                                             and adm.max_output_tokens < (ctx.req.output_cap or 1 << 60)):
                add["x-tollgate-max-tokens-clamped"] = str(adm.max_output_tokens)
            if adm.warnings:
                add["x-tollgate-budget-warning"] = ", ".join(
                    f"{w.name} at {round(100 * (w.spent_nusd + w.reserved_nusd) / max(w.limit_nusd, 1))}%"
                    for w in adm.warnings)
        return same, add

    # ---- response body ---------------------------------------------------------------
    async def response_body(self, b: HttpBody) -> ProcessingResponse:
        meter = self.settler.meter
        if isinstance(meter, SseMeter):
            return await self._stream_chunk(meter, b)
        if meter is None:
            meter = self.settler.meter = JsonMeter(self.ctx)
        meter.feed(b.body)
        self.cache.feed(b.body)  # cache
        if not b.end_of_stream:
            return msg.response_body()
        record = await self.settler.finish()
        await self.cache.store(self.ctx, record)  # cache: a complete 2xx answer is written once
        add = {}
        if record.get("cost_usd") is not None and self.ctx.status < 400:
            add["x-tollgate-cost-usd"] = f"{record['cost_usd']:.9f}".rstrip("0").rstrip(".") or "0"
        return msg.response_body(add, meta=_meta(record))

    async def _stream_chunk(self, meter: SseMeter, b: HttpBody) -> ProcessingResponse:
        """One chunk of an SSE response (STREAMED mode): account it, enforce the live cap."""
        if meter.cut:
            # The live cap already ended the stream for the client. The last message ends it
            # cleanly (an empty body); any other chunk means the provider is still generating
            # tokens it will bill: an ImmediateResponse makes Envoy reset both the client stream
            # (already given its error event) and the upstream request, which stops them.
            # (Measured: empty bodies instead keep the client waiting, with nothing more to read,
            # until the provider finishes on its own; the client then sees a clean end.)
            if b.end_of_stream:
                return msg.response_body(clear_body=True)
            return msg.immediate(200, b"", details="tollgate_budget_cap")
        cut = meter.feed(b.body, b.end_of_stream)
        self.cache.feed(b.body)  # cache
        if cut is not None:
            # Over the reservation: end the client's stream after the event that crossed it,
            # with an error event in the provider's shape, then settle.
            record = await self.settler.finish(end="budget_cap")
            assert self.ctx.api is not None
            body = cut.body + self.ctx.api.stream_error_event(self._cap_error())
            return msg.response_body(body=body, meta=_meta(record))
        if b.end_of_stream:
            record = await self.settler.finish()
            await self.cache.store(self.ctx, record)  # cache: only a stream that ended complete is written
            return msg.response_body(meta=_meta(record))
        return msg.response_body()

    def _cap_error(self) -> dict[str, Any]:
        adm = self.ctx.admission
        assert adm is not None
        name = adm.tightest.name if adm.tightest is not None else "budget"
        message = (f"Tollgate stopped this response: it used up the ${adm.reserved_nusd / NANO_PER_USD:.6f} "
                   f"reserved for it against budget {name!r} (the provider produced more output than the "
                   "request's output cap allows). The output so far is charged.")
        return {"message": message, "type": "budget_exceeded", "code": "budget_exceeded"}

    # ---- end of the request ----------------------------------------------------------
    async def close(self) -> None:
        """The gRPC stream ended. Whatever the request still holds is resolved now.

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
        try:
            await self.settler.close()
        finally:
            if self._slot is not None:
                self._slot.release()
            self.rt.release()

    # ---- refusals --------------------------------------------------------------------
    async def _refuse(self, err: GatewayError) -> ProcessingResponse:
        """Answer the client directly and record the refusal."""
        await self.settler.refuse(err)
        ctx = self.ctx
        meta = msg.metadata({**self._request_meta(), "decision": ctx.decision, "status": ctx.status})
        return msg.error_reply(err, ctx.shape, {"x-tollgate-request-id": ctx.request_id,
                                                CACHE_HEADER: self.cache.status}, meta)  # cache

    async def internal_error(self, phase: str) -> ProcessingResponse:
        """A bug in this request's handling: fail this request only, never the server.

        Before the request is forwarded the client gets a JSON 500 (and a lease it held is
        released); after, the response passes through untouched (the provider already did the
        work) and accounting continues.
        """
        if phase == "response_headers":
            return msg.response_headers()
        if phase == "response_body":
            return msg.response_body()
        if self.ctx.state is State.FORWARDED:
            return msg.request_body()
        return await self._refuse(GatewayError(500, "Tollgate hit an internal error processing this request.",
                                               type="api_error", code="gateway_internal_error"))

    def _models_reply(self) -> ProcessingResponse:
        ctx = self.ctx
        created = int(self.gw.clock())
        rules, attrs = ctx.config.doc.access, ctx.attrs()
        data = [{"id": m, "object": "model", "created": created, "owned_by": "tollgate"}
                for m in ctx.config.prices.names() if not rules or access.allowed(rules, attrs, m)]
        ctx.to(State.REFUSED)  # answered by the gateway; nothing to account
        return msg.immediate(200, orjson.dumps({"object": "list", "data": data}), details="tollgate_models",
                             meta=msg.metadata(self._request_meta()))

    def _request_meta(self) -> dict[str, Any]:
        ctx = self.ctx
        return {"request_id": ctx.request_id, "client_request_id": ctx.client_request_id or None,
                **identity_fields(ctx.identity)[1]}


_TEMPLATES = msg.Templates()  # the request body's answers (`Processor.request_body`)
_RESPONSE_TEMPLATES = msg.Templates()  # the response headers' answers, before each request's own headers


def _dumps(body: dict[str, Any]) -> bytes:
    """The rewritten request body. orjson refuses nesting deeper than 255, which orjson.loads
    accepts (up to 1024): fall back to the standard library, and refuse only what neither can
    write (the reservation is then released)."""
    try:
        return orjson.dumps(body)
    except orjson.JSONEncodeError:
        pass
    try:
        return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()
    except (RecursionError, ValueError, TypeError):
        raise bad_request("The request body is nested too deeply for this gateway to rewrite.",
                          code="invalid_json") from None


def _to_remove(names: tuple[str, ...], creds: frozenset[str]) -> tuple[tuple[str, ...], ProcessingResponse]:
    """The request headers that go no further (see `Processor.request_headers`), and the request
    headers' answer removing them: worked out once per distinct list of header names, since a
    client sends the same names request after request (nothing changes an answer once returned)."""
    key = (names, creds)
    hit = _REMOVE.get(key)
    if hit is None:
        if len(_REMOVE) >= 4096:
            _REMOVE.clear()
        remove = tuple(k for k in names if k.startswith(_STRIPPED_PREFIXES) or k in creds
                       or k == "cookie" or k in _IDENTITY_LOOKALIKES)
        hit = _REMOVE[key] = (remove, msg.request_headers(remove))
    return hit


_REMOVE: dict[tuple[tuple[str, ...], frozenset[str]], tuple[tuple[str, ...], ProcessingResponse]] = {}


def _headers(h: HttpHeaders) -> dict[str, str]:
    """Names to values (Envoy 1.40 sends `raw_value`). A plain loop reading each upb field once:
    3.3 us for a request's ten headers against 3.8 for a comprehension reading `raw_value` twice."""
    out = {}
    for hv in h.headers.headers:
        rv = hv.raw_value
        out[hv.key] = rv.decode("utf-8", "replace") if rv else hv.value
    return out


def _too_large(size: int, limit: int) -> GatewayError:
    return GatewayError(413, f"Request body is {size} bytes; this gateway accepts at most {limit}.",
                        type="invalid_request_error", code="request_too_large")


def _meta(record: dict[str, Any]) -> dict[str, Any]:
    return {k: record[k] for k in ("model_served", "decision", "cost_usd", "input_tokens", "output_tokens", "status")
            if k in record}
