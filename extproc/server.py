"""The ext_proc gRPC server: a stream loop, the health service, nothing about budgets.

Each gRPC stream is one HTTP request; the loop hands each message to the stream's `Processor`
and writes back its answer. An exception in one stream fails that request only.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass

import grpc
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ep_grpc
from envoy.service.ext_proc.v3.external_processor_pb2 import ProcessingRequest, ProcessingResponse
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from .processor import Processor

log = logging.getLogger("tollgate.server")


class ExternalProcessor(ep_grpc.ExternalProcessorServicer):
    def __init__(self, new_processor: Callable[[], Processor],
                 on_phase: Callable[[str, float], None] | None = None) -> None:
        self._new = new_processor
        self._on_phase = on_phase  # (phase, seconds) for each message handled, e.g. a latency histogram

    async def Process(self, request_iterator: object, context: grpc.aio.ServicerContext) -> None:
        """One stream, read and answered through `context.read()` / `context.write()`.

        Not the async-generator form (`async for req in request_iterator: ... yield resp`), which
        grpc.aio drives through two more layers of async iteration per message: measured back to
        back, the no-op floor spent 3-5% less CPU per request this way (tests/bench_floor.py uses
        this loop too)."""
        # Made on the first message, not when the stream opens: in a disconnect storm most streams
        # are reset before Envoy's first message is read, and this process must shed those fast
        # (docs/operations.md, "The ext_proc's gRPC server settings").
        proc: Processor | None = None
        read, write, eof = context.read, context.write, grpc.aio.EOF
        try:
            while True:
                req = await read()
                if req is eof:
                    return
                assert isinstance(req, ProcessingRequest)
                if proc is None:
                    proc = self._new()
                phase = req.WhichOneof("request")
                started = time.perf_counter()
                try:
                    if phase == "request_headers":
                        resp = await proc.request_headers(req.request_headers)
                    elif phase == "request_body":
                        resp = await proc.request_body(req.request_body)
                    elif phase == "response_headers":
                        resp = await proc.response_headers(req.response_headers)
                    elif phase == "response_body":
                        resp = await proc.response_body(req.response_body)
                    else:  # trailers are not requested; answer anything else neutrally
                        continue
                except Exception:
                    log.exception("processing %s of request %s failed", phase, proc.request_id)
                    resp = await proc.internal_error(phase or "")
                if self._on_phase is not None:
                    self._on_phase(phase or "", time.perf_counter() - started)
                await write(resp)
                if _last(req, resp):
                    # End the stream from this side (the handler's return sends its OK status)
                    # instead of reading on until Envoy resets it: measured, the reset left about
                    # 120 bytes of grpc.aio's native memory behind per stream (grpc/grpc#43360:
                    # a batch whose awaiter is cancelled, or a status sent on a cancelled call,
                    # never frees its op array). The no-op floor's RSS grew 12.6 MB over 107,000
                    # streams that way, 2.2 MB over 112,000 this way; Tollgate's 11.7% against 3.5%.
                    return
        finally:
            if proc is not None:
                try:
                    await proc.close()
                except Exception:
                    log.exception("closing request %s failed", proc.request_id)


def _last(req: ProcessingRequest, resp: ProcessingResponse) -> bool:
    """Whether Envoy sends this stream nothing more once `resp` is written: the response body's
    last chunk, response headers of a response without a body, or an ImmediateResponse (trailers
    are never requested: envoy/tollgate.yaml's processing modes)."""
    if resp.HasField("immediate_response"):
        return True
    if req.HasField("response_body"):
        return req.response_body.end_of_stream
    return req.HasField("response_headers") and req.response_headers.end_of_stream


def _new_server() -> grpc.aio.Server:
    """For one trusted peer, Envoy, multiplexing every request (one stream each) over one HTTP/2
    connection per worker: nothing here may close that connection or refuse a stream because of
    one client's behaviour, since that fails other clients' requests. docs/operations.md, "The
    ext_proc's gRPC server settings", says why each value is what it is."""
    return grpc.aio.server(options=[
        ("grpc.so_reuseport", 0),  # grpcio turns it on by default: a second server would share the port silently
        ("grpc.max_receive_message_length", 64 * 1024 * 1024),  # whole bodies come as one message (BUFFERED)
        ("grpc.max_send_message_length", 64 * 1024 * 1024),  # a rewritten body goes back as one message
        ("grpc.max_concurrent_streams", 2**31 - 1),  # no limit: Envoy's circuit breakers bound streams, not grpc
        # Calls not yet taken, mostly dead in a disconnect storm; past this grpc cancels new ones at random.
        ("grpc.server.max_pending_requests", 20_000),
        ("grpc.server.max_pending_requests_hard_limit", 50_000),  # ~15 KB each: caps that queue at ~750 MB
        ("grpc.keepalive_permit_without_calls", 1),  # Envoy may ping an idle connection
        ("grpc.http2.min_ping_interval_without_data_ms", 5000),  # ...as often as every 5 s
        ("grpc.http2.max_ping_strikes", 0),  # and is never sent GOAWAY for pinging too often
    ])


# Envoy health-checks the ext_proc every second and takes a host out at its first NOT_SERVING
# answer (envoy/tollgate.yaml): after this long, no new stream comes here.
DRAIN_SECONDS = 2.5
# How long in-flight streams may take to finish after that (LLM streams can run for minutes: a
# supervisor's stop timeout should exceed DRAIN_SECONDS + this; `serve --shutdown-grace-seconds`).
GRACE_SECONDS = 30.0


@dataclass
class AdminEndpoint:
    """A second gRPC server in the same process (the admin API), on its own port."""

    add_services: Callable[[grpc.aio.Server], None]  # registers the servicers
    service_name: str  # reported SERVING by this server's health service
    host: str
    port: int


async def _start(server: grpc.aio.Server, host: str, port: int) -> health.aio.HealthServicer:
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"cannot bind {host}:{port}")
    await server.start()
    return health_servicer


async def serve(new_processor: Callable[[], Processor], host: str, port: int,
                on_stop: Callable[[], "asyncio.Future[None] | None"] | None = None,
                admin: AdminEndpoint | None = None,
                on_phase: Callable[[str, float], None] | None = None,
                drain_seconds: float = DRAIN_SECONDS, grace_seconds: float = GRACE_SECONDS) -> None:
    """Serve until SIGTERM/SIGINT, then leave without failing a request (see `DRAIN_SECONDS`)."""
    server = _new_server()
    ep_grpc.add_ExternalProcessorServicer_to_server(ExternalProcessor(new_processor, on_phase), server)
    health_servicer = await _start(server, host, port)
    names = ("", "envoy.service.ext_proc.v3.ExternalProcessor")
    for name in names:
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    log.info("ext_proc listening on %s:%d", host, port)
    admin_server = admin_health = None
    if admin is not None:
        admin_server = _new_server()
        admin.add_services(admin_server)
        try:
            admin_health = await _start(admin_server, admin.host, admin.port)
        except BaseException:
            await server.stop(grace=None)
            raise
        for name in ("", admin.service_name):
            await admin_health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info("admin API (gRPC) listening on %s:%d", admin.host, admin.port)
    signals = asyncio.Queue[int]()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, signals.put_nowait, sig)
    await signals.get()
    # 1. Tell Envoy's health checks, and keep taking streams until they have: a stream opened
    #    after the server stops would fail its request.
    for name in names:
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    if admin_health is not None:
        for name in ("", admin.service_name):  # type: ignore[union-attr]
            await admin_health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    log.warning("stopping: NOT_SERVING; taking new streams for %.1f s more, then finishing in-flight ones for up "
                "to %.0f s (a second signal skips the wait)", drain_seconds, grace_seconds)
    try:
        await asyncio.wait_for(signals.get(), drain_seconds)
        grace_seconds = min(grace_seconds, 1.0)
    except TimeoutError:
        pass
    # 2. Stop taking streams; the ones running finish (and settle) within the grace, the rest are
    #    cancelled, which settles them as interrupted (Processor.close).
    stopping = [server.stop(grace=grace_seconds)]
    if admin_server is not None:
        stopping.append(admin_server.stop(grace=min(grace_seconds, 2.0)))
    await asyncio.gather(*stopping)
    if on_stop is not None:
        r = on_stop()
        if r is not None:
            await r

