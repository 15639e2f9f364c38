"""The phases of one request: one `Processor` per ext_proc gRPC stream, one method per phase.

Envoy sends request headers, the buffered request body, response headers, then the response body
(buffered for JSON, streamed chunk by chunk for SSE). The processor decides in the request-body
phase (parse, price, route) and accounts in the response phases. It never raises into the server
loop for a client's mistake: refusals are `GatewayError`s answered as ImmediateResponses.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING
from datetime import datetime, timezone
from typing import Any

import orjson
from envoy.service.ext_proc.v3.external_processor_pb2 import HttpBody, HttpHeaders, ProcessingResponse

from . import messages as msg
from .config import Config
from .errors import GatewayError, Shape, bad_request
from .identity import AuthError, Identity
from .pricing import NANO_PER_USD, ModelPrice, Usage
from .providers import Api, ParsedRequest, SSEParser, StreamState, api_for_path

if TYPE_CHECKING:
    from .app import Gateway

# Headers a client may not set: only the gateway speaks `x-tollgate-*`.
_OWN_PREFIX = "x-tollgate-"
UPSTREAM_HEADER = "x-tollgate-upstream"


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

    # ---- request headers -------------------------------------------------------------
    async def request_headers(self, h: HttpHeaders) -> ProcessingResponse:
        headers = _headers(h)
        self.request_id = headers.get("x-request-id", "")
        self.path = headers.get(":path", "")
        method = headers.get(":method", "")
        bare_path = self.path.split("?", 1)[0]
        self.shape = "anthropic" if bare_path.startswith("/v1/messages") else "openai"
        try:
            try:
                self.identity = await self.gw.auth.authenticate(headers)
            except AuthError as e:
                raise GatewayError(e.status, e.message, type="authentication_error", code=e.check) from None
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
        # identified it and every x-tollgate-* header are removed before the request leaves.
        creds = self.gw.auth.credential_headers()
        remove = [k for k in headers if k.startswith(_OWN_PREFIX) or k in creds]
        return msg.request_headers(msg.common(remove=remove) if remove else None)

    # ---- request body ----------------------------------------------------------------
    async def request_body(self, b: HttpBody) -> ProcessingResponse:
        assert self.api is not None
        try:
            raw = b.body
            limit = self.config.gateway.max_request_bytes
            if len(raw) > limit:
                raise _too_large(len(raw), limit)
            req = self.req = self.api.parse(raw)
            self.price = self.config.prices.lookup(req.model)
            if self.price is None:
                raise GatewayError(400, f"The model `{req.model}` has no price in Tollgate's price table, so it "
                                   "cannot be budgeted. Ask your platform team to add it.",
                                   code="model_not_found", param="model")
            self.provider = self.config.route(req.model, self.api.wire)
            if self.provider is None:
                raise GatewayError(400, f"No provider is configured to serve `{req.model}` on {self.path}.",
                                   code="model_not_routable", param="model")
        except GatewayError as e:
            return self._refuse(e)
        changed = req.stream and self.api.prepare_stream(req.body)
        set_headers = {UPSTREAM_HEADER: self.provider}
        remove: list[str] = []
        key = self.gw.provider_keys.get(self.provider)
        if key:
            if self.api.wire == "anthropic":
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
        self.model_served = req.model
        meta = msg.metadata({"provider": self.provider, "model_requested": req.model, **self._identity_meta()})
        return msg.request_body(msg.common(set_headers, remove, body, clear_route_cache=True), meta)

    # ---- response headers ------------------------------------------------------------
    async def response_headers(self, h: HttpHeaders) -> ProcessingResponse:
        headers = _headers(h)
        self.status = int(headers.get(":status", "0") or 0)
        add = {"x-tollgate-request-id": self.request_id}
        if self.model_served:
            add["x-tollgate-model-served"] = self.model_served
        if h.end_of_stream:
            await self.finish()
            return msg.response_headers(msg.common(add))
        if headers.get("content-type", "").startswith("text/event-stream"):
            self.streamed = True
            self.sse = SSEParser()
            self.stream_state = StreamState()
            return msg.response_headers(msg.common(add), msg.STREAMED_RESPONSE)
        return msg.response_headers(msg.common(add))

    # ---- response body ---------------------------------------------------------------
    async def response_body(self, b: HttpBody) -> ProcessingResponse:
        if self.streamed:
            assert self.sse is not None and self.stream_state is not None and self.api is not None
            for event, data in self.sse.feed(b.body):
                self.api.on_event(self.stream_state, event, data)
            if not b.end_of_stream:
                return msg.response_body()
            for event, data in self.sse.flush():
                self.api.on_event(self.stream_state, event, data)
            record = await self.finish()
            return msg.response_body(meta=_meta(record))
        self.body_chunks.append(b.body)
        if not b.end_of_stream:
            return msg.response_body()
        record = await self.finish()
        add = {}
        if record.get("cost_usd") is not None and self.status < 400:
            add["x-tollgate-cost-usd"] = f"{record['cost_usd']:.9f}".rstrip("0").rstrip(".") or "0"
        return msg.response_body(msg.common(add) if add else None, _meta(record))

    # ---- end of the request ----------------------------------------------------------
    async def close(self) -> None:
        """The gRPC stream ended. If the response never completed, account for it now."""
        if not self.finished and self.forwarded:
            await self.finish(incomplete=True)

    async def finish(self, incomplete: bool = False) -> dict[str, Any]:
        """Work out the real usage and cost, settle, and write the attribution record (once)."""
        if self.finished:
            return {}
        self.finished = True
        usage, complete = self._usage(incomplete)
        cost = self.price.cost_nusd(usage) if (self.price and usage) else 0
        record = self._record(usage, cost, complete)
        self.gw.sink(record)
        return record

    def _usage(self, incomplete: bool) -> tuple[Usage | None, bool]:
        if self.api is None or self.req is None:
            return None, True
        if self.streamed and self.stream_state is not None:
            st = self.stream_state
            if st.served_model:
                self.model_served = st.served_model
            complete = st.done and st.usage is not None and not incomplete
            if complete:
                return st.usage, True
            if self.status and self.status >= 400:
                return None, True
            # Cut short: charge what we know, never less than the input and the deltas seen.
            usage = st.usage or Usage(input_tokens=self.req.input_tokens_upper)
            usage.output_tokens = max(usage.output_tokens, st.output_deltas)
            return usage, False
        if incomplete:
            if self.status == 0 or self.status >= 400:
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

    def _identity_meta(self) -> dict[str, Any]:
        i = self.identity
        if i is None:
            return {}
        return {"user": i.user, "email": i.email, "groups": ",".join(i.groups), "team": i.team, "app": i.app,
                "service_token": i.service_token, "auth_source": i.source}

    def _record(self, usage: Usage | None, cost_nusd: int, complete: bool) -> dict[str, Any]:
        u = usage or Usage()
        i = self.identity
        return {
            "ts": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
            "request_id": self.request_id,
            "user": i.user if i else None,
            "email": i.email if i else None,
            "groups": list(i.groups) if i else [],
            "team": i.team if i else None,
            "app": i.app if i else None,
            "service_token": i.service_token if i else None,
            "auth_source": i.source if i else None,
            "api": self.api.name if self.api else None,
            "provider": self.provider,
            "model_requested": self.req.model if self.req else None,
            "model_served": self.model_served,
            "decision": self.decision,
            "error_code": self.error_code,
            "stream": self.streamed,
            "complete": complete,
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
        self.decision = "blocked" if err.status == 429 else "refused"
        self.error_code = err.code or err.type
        self.finished = True
        record = self._record(None, 0, True)
        self.gw.sink(record)
        meta = msg.metadata({**self._identity_meta(), "decision": self.decision, "status": self.status})
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
        data = [{"id": m, "object": "model", "created": created, "owned_by": "tollgate"}
                for m in self.config.prices.names()]
        self.finished = True
        return msg.immediate(200, orjson.dumps({"object": "list", "data": data}), details="tollgate_models")


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
