"""The benchmark's floor: a no-op ext_proc on Tollgate's own gRPC server code.

    python -m tests.bench_floor --port P [--host 127.0.0.1]

tests/bench.py runs this behind an Envoy whose bootstrap is Tollgate's own (same ext_proc filter,
processing modes, cluster, health checks, access log), so the difference between this target and
Tollgate is what Tollgate's own work costs, and the difference between this and plain Envoy is
what the ext_proc design costs before any work is done.

Same as `tollgate serve`: `extproc.server.serve` (so `_new_server()`'s options, the
`ExternalProcessor` stream loop that makes one processor per stream on its first message, the
gRPC health service Envoy checks every second), uvloop when installed. Different: the processor's
four phase methods answer every message with a prebuilt, empty CONTINUE (no header mutation, no
body, no dynamic metadata); the one answer that is not empty is the mode override an SSE
response gets, to STREAMED, prebuilt too, as Tollgate switches it (so the floor's time to first
token is what the ext_proc design costs a stream, and the bench prints Tollgate's against it);
no Redis, no policy, no attribution, no metrics, no admin API.
"""

from __future__ import annotations

import argparse
import asyncio
import logging

from envoy.service.ext_proc.v3.external_processor_pb2 import HttpBody, HttpHeaders, ProcessingResponse

from extproc import messages as msg
from extproc.server import serve

# Built once: every stream gets the same four objects (grpc serializes them; nothing mutates them).
_REQUEST_HEADERS = msg.request_headers()
_REQUEST_BODY = msg.request_body()
_RESPONSE_HEADERS = msg.response_headers()
_RESPONSE_HEADERS_SSE = msg.response_headers(None, msg.STREAMED_RESPONSE)
_RESPONSE_BODY = msg.response_body()


class NoopProcessor:
    """What extproc.server.ExternalProcessor calls for one stream (extproc/processor.py's
    `Processor` interface), doing nothing."""

    request_id = "-"

    async def request_headers(self, h: HttpHeaders) -> ProcessingResponse:
        return _REQUEST_HEADERS

    async def request_body(self, b: HttpBody) -> ProcessingResponse:
        return _REQUEST_BODY

    async def response_headers(self, h: HttpHeaders) -> ProcessingResponse:
        for hv in h.headers.headers:
            if hv.key == "content-type":
                return _RESPONSE_HEADERS_SSE if hv.raw_value.startswith(b"text/event-stream") else _RESPONSE_HEADERS
        return _RESPONSE_HEADERS

    async def response_body(self, b: HttpBody) -> ProcessingResponse:
        return _RESPONSE_BODY

    async def internal_error(self, phase: str) -> ProcessingResponse:
        return {"request_headers": _REQUEST_HEADERS, "request_body": _REQUEST_BODY,
                "response_headers": _RESPONSE_HEADERS}.get(phase, _RESPONSE_BODY)

    async def close(self) -> None:
        pass


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m tests.bench_floor", description=__doc__.splitlines()[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    # Nothing to drain for: the bench stops Envoy first.
    asyncio.run(serve(NoopProcessor, args.host, args.port, drain_seconds=0.0, grace_seconds=1.0))  # type: ignore[arg-type]


if __name__ == "__main__":
    main()
