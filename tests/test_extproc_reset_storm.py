"""The ext_proc's gRPC server under a storm of reset streams, without Envoy (issue 15, item 8).

Speaks HTTP/2 the way Envoy does on its connection to the ext_proc: for each request a client
abandoned, HEADERS + DATA (the request_headers message) + RST_STREAM(CANCEL), back to back, as
fast as it can; and meanwhile, on the same connection, other requests' streams that send their
message, read the answer and half-close. With grpc's defaults (`grpc.server.max_pending_requests`
1,000) about a third of those other streams were answered `grpc-status: 1` (CANCELLED), which
Envoy turns into a 500: grpc counts the storm's dead calls among those waiting for the server,
and past the limit cancels new calls at random. The settings in extproc/server.py
(docs/operations.md, "The ext_proc's gRPC server settings") must let every one of them through,
and never close the connection (no GOAWAY).

The server runs in a subprocess with the real `_new_server()` options and `ExternalProcessor`,
over a stub processor; it is stopped by PID. Loopback only, about 3 seconds of storm.
"""

from __future__ import annotations

import select
import socket
import struct
import subprocess
import sys
import textwrap
import time

import h2.config as h2_config  # a test dependency (pyproject.toml)
import h2.connection as h2_connection
import h2.errors as h2_errors
import h2.events as h2_events

from extproc.procs import free_port, wait_for_port
from tests.conftest import REPO

STORM_SECONDS = 3.0
# Dead streams per second at most. Unpaced, the client outran the server by more than grpc's
# pending-call limit (20,000) on a fast day: 45,000 in 3 s, and then grpc cancels live calls at
# random, which is that limit working as configured, not the failure this test is about. 8,000/s
# is above the disconnect storm Envoy produced end to end (about 6,000/s, tests/test_e2e_disconnect_storm.py).
STORM_RATE = 8_000
STORM_BATCH = 50  # dead streams written between two live ones
LIVE_EVERY_S = 0.01

SERVER = textwrap.dedent("""
    import asyncio, signal, sys
    from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ep_grpc
    from envoy.service.ext_proc.v3.external_processor_pb2 import ProcessingResponse
    from extproc.server import ExternalProcessor, _new_server

    class Stub:  # what a Processor answers, without a gateway behind it
        request_id = "stub"
        async def request_headers(self, h):
            return ProcessingResponse()
        async def close(self):
            pass
        async def internal_error(self, phase):
            return ProcessingResponse()

    async def main():
        server = _new_server()
        ep_grpc.add_ExternalProcessorServicer_to_server(ExternalProcessor(Stub), server)
        server.add_insecure_port(f"127.0.0.1:{sys.argv[1]}")
        await server.start()
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        await stop.wait()
        await server.stop(grace=None)

    asyncio.run(main())
""")


def _grpc_message(payload: bytes) -> bytes:
    return b"\x00" + struct.pack(">I", len(payload)) + payload


def test_a_reset_storm_does_not_cancel_other_streams(tmp_path):
    from envoy.config.core.v3.base_pb2 import HeaderMap, HeaderValue
    from envoy.service.ext_proc.v3.external_processor_pb2 import HttpHeaders, ProcessingRequest

    port = free_port()
    log = open(tmp_path / "server.log", "w")
    server = subprocess.Popen([sys.executable, "-c", SERVER, str(port)], stdout=log, stderr=subprocess.STDOUT,
                              cwd=REPO)
    try:
        wait_for_port(port, timeout=30)
        result = _storm(port, ProcessingRequest(request_headers=HttpHeaders(headers=HeaderMap(headers=[
            HeaderValue(key=k, raw_value=b"v" * 40) for k in ("a", "b", "c", "d", "e", "f")]))).SerializeToString())
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(timeout=10)
        log.close()
    print(f"\n{result['dead']} reset streams; live streams: {result['outcomes']}, "
          f"slowest {result['slowest']:.1f} s; goaway: {result['goaway']}")
    assert result["dead"] > 5000, "the storm was too weak to test anything"
    assert result["goaway"] is None, f"the server closed the connection: {result['goaway']}"
    assert set(result["outcomes"]) == {"0"}, result["outcomes"]


def _storm(port: int, message: bytes) -> dict:
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setblocking(False)
    conn = h2_connection.H2Connection(h2_config.H2Configuration(client_side=True, header_encoding="utf-8"))
    conn.initiate_connection()
    conn.increment_flow_control_window(2**30)
    body = _grpc_message(message)
    headers = [(":method", "POST"), (":scheme", "http"), (":authority", "tollgate_extproc"),
               (":path", "/envoy.service.ext_proc.v3.ExternalProcessor/Process"),
               ("content-type", "application/grpc"), ("te", "trailers")]
    live: dict[int, dict] = {}
    state = {"out": b"", "goaway": None}

    def flush() -> None:
        state["out"] += conn.data_to_send()
        while state["out"]:
            try:
                n = sock.send(state["out"])
            except BlockingIOError:
                return
            state["out"] = state["out"][n:]

    def pump(timeout: float) -> None:
        readable, _, _ = select.select([sock], [], [], timeout)
        if readable:
            try:
                data = sock.recv(1 << 20)
            except BlockingIOError:
                data = b""
            for ev in conn.receive_data(data) if data else ():
                on_event(ev)
        flush()

    def on_event(ev) -> None:
        v = live.get(getattr(ev, "stream_id", None))
        if isinstance(ev, h2_events.ConnectionTerminated):
            state["goaway"] = f"GOAWAY {ev.error_code!r} {ev.additional_data!r}"
        elif isinstance(ev, h2_events.DataReceived):
            conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
            if v is not None and v["state"] == "answer":
                v["state"] = "trailers"
                conn.end_stream(ev.stream_id)  # the request is done: half-close, as Envoy does
        elif isinstance(ev, (h2_events.ResponseReceived, h2_events.TrailersReceived)) and v is not None:
            got = dict(ev.headers)
            if "grpc-status" in got:
                v.update(state="done", outcome=got["grpc-status"], took=time.monotonic() - v["start"])
        elif isinstance(ev, h2_events.StreamReset) and v is not None and v["state"] != "done":
            v.update(state="done", outcome=f"RST_STREAM {ev.error_code!r}")

    dead = 0
    started = next_live = time.monotonic()
    end = started + STORM_SECONDS
    while time.monotonic() < end and state["goaway"] is None:
        if state["out"]:  # the server is not reading: wait for it, as a blocked socket would
            pump(0.005)
            continue
        if dead >= STORM_RATE * (time.monotonic() - started):
            pump(0.001)
            continue
        for _ in range(STORM_BATCH):
            sid = conn.get_next_available_stream_id()
            conn.send_headers(sid, headers)
            if conn.local_flow_control_window(sid) >= len(body) + 4096:
                conn.send_data(sid, body)
            conn.reset_stream(sid, h2_errors.ErrorCodes.CANCEL)
            dead += 1
        if time.monotonic() >= next_live:
            sid = conn.get_next_available_stream_id()
            conn.send_headers(sid, headers)
            while conn.local_flow_control_window(sid) < len(body):
                pump(0.01)
            conn.send_data(sid, body)
            live[sid] = {"state": "answer", "start": time.monotonic()}
            next_live = time.monotonic() + LIVE_EVERY_S
        flush()
        pump(0)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and state["goaway"] is None and any(v["state"] != "done" for v in live.values()):
        pump(0.05)
    sock.close()
    outcomes: dict[str, int] = {}
    for v in live.values():
        key = v.get("outcome", f"unanswered ({v['state']})")
        outcomes[key] = outcomes.get(key, 0) + 1
    return {"dead": dead, "outcomes": outcomes, "goaway": state["goaway"],
            "slowest": max((v.get("took", 0.0) for v in live.values()), default=0.0)}
