"""Builders for the ext_proc protobuf answers, kept apart so the processor reads as logic.

Envoy 1.40 sends and expects header values in `raw_value` (bytes); `value` left empty reaches the
upstream as an empty header, so everything here writes `raw_value`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from envoy.config.core.v3.base_pb2 import HeaderValue, HeaderValueOption
from envoy.extensions.filters.http.ext_proc.v3.processing_mode_pb2 import ProcessingMode
from envoy.service.ext_proc.v3.external_processor_pb2 import (
    BodyMutation,
    BodyResponse,
    CommonResponse,
    HeaderMutation,
    HeadersResponse,
    ImmediateResponse,
    ProcessingResponse,
)
from envoy.type.v3.http_status_pb2 import HttpStatus
from google.protobuf.struct_pb2 import Struct

from .errors import GatewayError, Shape

_OVERWRITE = HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD

# Per-response body mode for the response side: stream SSE through untouched, buffer JSON.
STREAMED_RESPONSE = ProcessingMode(
    request_header_mode=ProcessingMode.SEND,
    response_header_mode=ProcessingMode.SEND,
    request_body_mode=ProcessingMode.BUFFERED,
    response_body_mode=ProcessingMode.STREAMED,
)


def header_mutation(set_headers: Mapping[str, str] | None = None, remove: Iterable[str] = ()) -> HeaderMutation:
    return HeaderMutation(
        set_headers=[
            HeaderValueOption(header=HeaderValue(key=k, raw_value=v.encode()), append_action=_OVERWRITE)
            for k, v in (set_headers or {}).items()
        ],
        remove_headers=list(remove),
    )


def common(
    set_headers: Mapping[str, str] | None = None,
    remove: Iterable[str] = (),
    body: bytes | None = None,
    clear_route_cache: bool = False,
) -> CommonResponse:
    resp = CommonResponse(clear_route_cache=clear_route_cache)
    if set_headers or remove:
        resp.header_mutation.CopyFrom(header_mutation(set_headers, remove))
    if body is not None:
        resp.body_mutation.CopyFrom(BodyMutation(body=body))
    return resp


def metadata(fields: Mapping[str, Any]) -> Struct:
    """Dynamic metadata under the `tollgate` namespace (Envoy's access log reads it)."""
    s = Struct()
    s.update({"tollgate": {k: v for k, v in fields.items() if v is not None}})
    return s


def request_headers(resp: CommonResponse | None = None) -> ProcessingResponse:
    return ProcessingResponse(request_headers=HeadersResponse(response=resp or CommonResponse()))


def request_body(resp: CommonResponse | None = None, meta: Struct | None = None) -> ProcessingResponse:
    return ProcessingResponse(request_body=BodyResponse(response=resp or CommonResponse()), dynamic_metadata=meta)


def response_headers(resp: CommonResponse | None = None, mode: ProcessingMode | None = None) -> ProcessingResponse:
    return ProcessingResponse(response_headers=HeadersResponse(response=resp or CommonResponse()), mode_override=mode)


def response_body(resp: CommonResponse | None = None, meta: Struct | None = None) -> ProcessingResponse:
    return ProcessingResponse(response_body=BodyResponse(response=resp or CommonResponse()), dynamic_metadata=meta)


def immediate(status: int, body: bytes, headers: Mapping[str, str] | None = None, details: str = "",
              meta: Struct | None = None) -> ProcessingResponse:
    """A reply Envoy sends to the client itself; the request never reaches a provider."""
    return ProcessingResponse(
        immediate_response=ImmediateResponse(
            status=HttpStatus(code=status),
            headers=header_mutation({"content-type": "application/json", **(headers or {})}),
            body=body,
            details=details,
        ),
        dynamic_metadata=meta,
    )


def error_reply(err: GatewayError, shape: Shape, headers: Mapping[str, str] | None = None,
                meta: Struct | None = None) -> ProcessingResponse:
    return immediate(err.status, err.body(shape), {**err.headers, **(headers or {})},
                     details=f"tollgate_{err.code or err.type}", meta=meta)
