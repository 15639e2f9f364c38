"""extproc/server.py's stream loop ends a stream itself once Envoy has nothing more to send.

Left to Envoy, each ext_proc stream ended with Envoy's RST_STREAM while the handler still waited
in `read()`: grpc.aio then cancelled that wait and the handler, and each such end left about 120
bytes of native memory behind (grpc/grpc#43360; the no-op floor's RSS grew 12.6 MB over 107,000
streams, 2.2 MB once the loop ended the streams itself). Here a gRPC client that never
half-closes plays Envoy: after the last answer the call must end with the server's OK status,
and the processor must have been closed.
"""

from __future__ import annotations

import asyncio

import grpc
import pytest
from envoy.config.core.v3.base_pb2 import HeaderValue
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ep_grpc
from envoy.service.ext_proc.v3.external_processor_pb2 import ProcessingRequest

from extproc import messages as msg
from extproc.server import ExternalProcessor


class _Proc:
    request_id = "t"

    def __init__(self, log: list[str]) -> None:
        self.log = log

    async def request_headers(self, h):
        self.log.append("request_headers")
        return msg.request_headers()

    async def request_body(self, b):
        self.log.append("request_body")
        if b.body == b"refuse":
            return msg.immediate(400, b"{}")
        return msg.request_body()

    async def response_headers(self, h):
        self.log.append("response_headers")
        return msg.response_headers()

    async def response_body(self, b):
        self.log.append("response_body")
        return msg.response_body()

    async def internal_error(self, phase):
        return msg.response_body()

    async def close(self):
        self.log.append("close")


def _headers(which: str, eos: bool, *pairs: tuple[str, str]) -> ProcessingRequest:
    r = ProcessingRequest()
    h = getattr(r, which)
    for k, v in pairs:
        h.headers.headers.append(HeaderValue(key=k, raw_value=v.encode()))
    h.end_of_stream = eos
    return r


def _body(which: str, data: bytes, eos: bool) -> ProcessingRequest:
    r = ProcessingRequest()
    b = getattr(r, which)
    b.body, b.end_of_stream = data, eos
    return r


JSON = [_headers("request_headers", False, (":path", "/v1/chat/completions")), _body("request_body", b"{}", True),
        _headers("response_headers", False, (":status", "200")), _body("response_body", b"{}", True)]
CHUNKED = [*JSON[:3], _body("response_body", b"data: 1\n\n", False), _body("response_body", b"", True)]
NO_BODY = [*JSON[:2], _headers("response_headers", True, (":status", "204"))]
REFUSED = [JSON[0], _body("request_body", b"refuse", True)]


@pytest.mark.parametrize("messages", [JSON, CHUNKED, NO_BODY, REFUSED], ids=["json", "chunked", "no_body", "refused"])
def test_the_server_ends_the_stream_after_the_last_answer(messages):
    async def run() -> tuple[list[str], grpc.StatusCode, int]:
        log: list[str] = []
        server = grpc.aio.server()
        ep_grpc.add_ExternalProcessorServicer_to_server(ExternalProcessor(lambda: _Proc(log)), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
                call = ep_grpc.ExternalProcessorStub(ch).Process()
                answers = 0
                for m in messages:
                    await call.write(m)  # never done_writing(): Envoy does not half-close either
                    await call.read()
                    answers += 1
                code = await asyncio.wait_for(call.code(), 5)
        finally:
            await server.stop(None)
        return log, code, answers

    log, code, answers = asyncio.run(run())
    assert code == grpc.StatusCode.OK
    assert answers == len(messages)
    assert log[-1] == "close" and log.count("close") == 1, log
