"""The ext_proc gRPC server: a stream loop, the health service, nothing about budgets.

Each gRPC stream is one HTTP request; the loop hands each message to the stream's `Processor`
and writes back its answer. An exception in one stream fails that request only.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import AsyncIterator, Callable
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

    async def Process(
        self, request_iterator: AsyncIterator[ProcessingRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[ProcessingResponse]:
        proc = self._new()
        try:
            async for req in request_iterator:
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
                yield resp
        finally:
            try:
                await proc.close()
            except Exception:
                log.exception("closing request %s failed", proc.request_id)


def _new_server() -> grpc.aio.Server:
    return grpc.aio.server(options=[
        ("grpc.so_reuseport", 0),  # grpcio turns it on by default: a second server would share the port silently
        ("grpc.max_receive_message_length", 64 * 1024 * 1024),
        ("grpc.max_send_message_length", 64 * 1024 * 1024),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", 5000),
    ])


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
                on_phase: Callable[[str, float], None] | None = None) -> None:
    """Serve until SIGTERM/SIGINT, then drain in-flight streams for a few seconds."""
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
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    for name in names:
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    if admin_server is not None and admin_health is not None:
        for name in ("", admin.service_name):  # type: ignore[union-attr]
            await admin_health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        await asyncio.gather(server.stop(grace=5), admin_server.stop(grace=2))
    else:
        await server.stop(grace=5)
    if on_stop is not None:
        r = on_stop()
        if r is not None:
            await r

