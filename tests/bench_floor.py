"""The benchmark's floor: a no-op ext_proc on Tollgate's own gRPC server code.

    python -m tests.bench_floor --port P [--host 127.0.0.1] [--redis-url redis://...]

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

With `--redis-url` (the bench's `floorredis`), the same no-op plus the two Redis calls a hard cap
costs every forwarded request, through Tollgate's own budget store and script pipe
(extproc/budgets/store.py, pipe.py): the reserve script on the request body, awaited before the
answer, and the settle script (with its rollup increments and a record of Tollgate's size) after
the last response message, awaited when the stream ends, as Tollgate does. Its inputs are built
once (two calendar counters, like the default policy's); only the request id changes. So it is
the best any Python ext_proc holding Tollgate's Redis protocol could do on this machine: the
difference between it and Tollgate is the rest of Tollgate's Python (identity, policy, pricing,
records, metrics, headers, dynamic metadata).

With `--meter` as well (the bench's `floormeter`), floorredis plus the least any gateway that
meters in dollars does per request, on Tollgate's own building blocks where they are the minimum
(answers copied from templates, the usage writer, the settle script): the API key's sha256 looked
up in a table; the request body parsed for its model and output cap and its worst case priced in
integers; answers carrying a header mutation and dynamic metadata like Tollgate's; the response's
usage parsed and priced; a 25-field record written to a file, rolled up and appended to the
stream by the settle; two labelled counters. None of Tollgate's features beyond that (policy
matching, access rules, windows, downgrades, clamps, warnings, rate limits, cache, concurrency
caps, JWTs, the full record, histograms, alerts). So it bounds what Tollgate could reach here
with every feature free: Tollgate minus floormeter is what those features cost.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import itertools
import logging
import os
import time
from pathlib import Path
from typing import Any, BinaryIO, ClassVar

import orjson

from envoy.service.ext_proc.v3.external_processor_pb2 import HttpBody, HttpHeaders, ProcessingResponse

from extproc import messages as msg
from extproc.lifecycle.protect import start_protected
from extproc.lifecycle.record import now_ts
from extproc.processor import _headers as read_headers
from extproc.server import serve
from extproc.usage import lease_meta, usage_write

# Built once: every stream gets the same four objects (grpc serializes them; nothing mutates them).
_REQUEST_HEADERS = msg.request_headers()
_REQUEST_BODY = msg.request_body()
_RESPONSE_HEADERS = msg.response_headers()
_RESPONSE_HEADERS_SSE = msg.response_headers(mode=msg.STREAMED_RESPONSE)
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


# What floorredis's settles write: a record of the size and identity fields of a bench request's,
# rolled up and appended to the stream by Tollgate's own usage writer (extproc/usage.py).
_RECORD = {"ts": "2026-12-02T00:00:00.000+00:00", "request_id": "-", "user": "bench", "team": "bench-team",
           "app": "bench", "groups": ["ics"], "model_served": "gpt-4o", "provider": "fake", "service_token": None,
           "decision": "allowed", "input_tokens": 9, "output_tokens": 25, "cost_nusd": 95_000, "pad": "x" * 1400}
_PREFIX = "floor:"
_USAGE = usage_write(_RECORD, prefix=_PREFIX)  # the same for every settle


class RedisFloor:
    """What `--redis-url` adds: one reserve per request body, one settle per response, with
    inputs built once. Shared by every stream of the process."""

    def __init__(self, redis_url: str) -> None:
        from extproc.budgets.pipe import ScriptPipe
        from extproc.budgets.store import BudgetStore, CounterRef

        import redis.asyncio as aredis

        client = aredis.Redis.from_url(redis_url)
        pipe = ScriptPipe.for_client(client)
        assert pipe is not None, "the floor's Redis must be plain TCP"
        self.store = BudgetStore(client, prefix=_PREFIX, grace=3600, pipe=pipe)
        end = time.time() + 30 * 86400
        self.counters = [CounterRef(f"{_PREFIX}b:monthly:p:user=bench", end),
                         CounterRef(f"{_PREFIX}b:daily:p:team=bench", end)]
        self.usage = _USAGE
        self.meta = lease_meta(_RECORD, prefix=_PREFIX)
        self._ids = itertools.count()
        self._prefix = f"{os.getpid():x}-"

    async def load(self) -> None:
        await self.store.load()

    def new_id(self) -> str:
        return self._prefix + str(next(self._ids))

    async def reserve(self, request_id: str) -> None:
        await self.store.reserve(self.counters, [10**18, 10**18], [True, False], request_id=request_id,
                                 amounts=[2_715_390, 2_715_390], now=None, ttl_now=time.time(), lease_seconds=660.0,
                                 meta=self.meta)

    async def release(self, request_id: str) -> None:
        await self.store.release(self.counters, request_id=request_id, now=None)

    async def settle(self, request_id: str) -> None:
        await self.store.settle(self.counters, request_id=request_id, actual=95_000, now=None, ttl_now=time.time(),
                                usage=self.usage)


class RedisFloorProcessor(NoopProcessor):
    """The floor plus Tollgate's two budget scripts (see the module docstring)."""

    floor: RedisFloor  # set by main

    def __init__(self) -> None:
        self.request_id = self.floor.new_id()
        self.reserving: asyncio.Task[None] | None = None
        self.settling: asyncio.Task[None] | None = None

    async def request_body(self, b: HttpBody) -> ProcessingResponse:
        # As Tollgate's admitter: a cancel (Envoy reset the stream) must not lose a reserve that landed.
        self.reserving, done = start_protected(self.floor.reserve(self.request_id))
        await done
        return _REQUEST_BODY

    async def response_body(self, b: HttpBody) -> ProcessingResponse:
        if b.end_of_stream and self.settling is None:
            self.settling = asyncio.get_running_loop().create_task(self.floor.settle(self.request_id))
        return _RESPONSE_BODY

    async def close(self) -> None:
        if self.settling is not None:
            await self.settling
        elif self.reserving is not None:  # never answered (wrk stopped mid-request): as Tollgate, release
            await self.reserving
            await self.floor.release(self.request_id)


class MeterFloorProcessor(RedisFloorProcessor):
    """floorredis plus the minimum of metering (see the module docstring, `--meter`)."""

    records: BinaryIO  # set by main
    _IDENTITIES: ClassVar[dict[str, dict[str, Any]]] = {hashlib.sha256(b"demo").hexdigest(): {"user": "demo", "team": "demo-team", "groups": ["eng"]}}
    _BENCH: ClassVar[dict[str, Any]] = {"user": "bench", "team": "bench-team", "groups": ["ics"]}  # any other key: metered as this one
    _RATES: ClassVar[dict[str, tuple[int, int, int]]] = {"gpt-4o-mini": (150, 600, 16_384)}  # nano-USD per input / output token, largest output cap
    _OTHER = (2_500, 10_000, 16_384)
    _templates = msg.Templates()
    _metrics: tuple[Any, Any] | None = None

    def __init__(self) -> None:
        super().__init__()
        self.identity = self._BENCH
        self.model, self.worst, self.status, self.path, self.envoy_id = "", 0, 0, "", ""
        self.t0 = 0.0

    async def request_headers(self, h: HttpHeaders) -> ProcessingResponse:
        headers = read_headers(h)
        key = headers.get("authorization", "").removeprefix("Bearer ")
        self.identity = self._IDENTITIES.get(hashlib.sha256(key.encode()).hexdigest(), self._BENCH)
        self.path, self.envoy_id = headers.get(":path", ""), headers.get("x-request-id", "")
        self.t0 = time.monotonic()
        # A removal of Tollgate's size (its credential headers), of a header this client never sends.
        return msg.request_headers(("x-api-key", "cookie"))

    async def request_body(self, b: HttpBody) -> ProcessingResponse:
        body = orjson.loads(b.body)
        self.model = model = str(body.get("model") or "")
        rate_in, rate_out, cap = self._RATES.get(model, self._OTHER)
        self.worst = len(b.body) // 2 * rate_in + min(int(body.get("max_tokens") or cap), cap) * rate_out
        self.reserving, done = start_protected(self.floor.reserve(self.request_id))
        await done
        who = self.identity
        pr = self._templates.get((id(who), model), who, lambda: msg.request_body(
            {"x-meter-upstream": "fake", "x-meter-model": model}, ("x-meter-none",), None, clear_route_cache=True,
            meta={"provider": "fake", "model_requested": model, "model_served": model, "decision": "allowed",
                  "user": who["user"], "team": who["team"], "groups": ",".join(who["groups"])}))
        msg.set_meta_strings(pr, {"request_id": self.request_id, "client_request_id": None})
        return pr

    async def response_headers(self, h: HttpHeaders) -> ProcessingResponse:
        sse = False
        for hv in h.headers.headers:
            if hv.key == ":status":
                self.status = int(hv.raw_value or b"0")
            elif hv.key == "content-type":
                sse = hv.raw_value.startswith(b"text/event-stream")
        return msg.response_headers({"x-meter-request-id": self.request_id, "x-meter-decision": "allowed",
                                     "x-meter-budget-remaining-usd": "10.0"}, (),
                                    msg.STREAMED_RESPONSE if sse else None)

    async def response_body(self, b: HttpBody) -> ProcessingResponse:
        if not b.end_of_stream:  # a stream's chunk: the floor meters JSON answers only
            return _RESPONSE_BODY
        try:
            obj = orjson.loads(b.body)
        except orjson.JSONDecodeError:
            obj = {}
        usage = obj.get("usage") or {} if isinstance(obj, dict) else {}
        tokens_in, tokens_out = int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)
        cached = int((usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0)
        rate_in, rate_out, _ = self._RATES.get(self.model, self._OTHER)
        cost = (tokens_in - cached) * rate_in + cached * rate_in // 2 + tokens_out * rate_out
        who = self.identity
        record = {"ts": now_ts(), "request_id": self.request_id, "envoy_request_id": self.envoy_id,
                  "user": who["user"], "team": who["team"], "groups": who["groups"], "path": self.path,
                  "provider": "fake", "model_requested": self.model, "model_served": obj.get("model"),
                  "decision": "allowed", "status": self.status, "input_tokens": tokens_in - cached,
                  "cached_input_tokens": cached, "output_tokens": tokens_out, "cost_nusd": cost,
                  "cost_usd": cost / 1e9, "reserved_nusd": self.worst, "end": "completed", "complete": True,
                  "latency_ms": round((time.monotonic() - self.t0) * 1000, 3), "app": None, "service_token": None,
                  "estimate": None, "cache": "off"}
        floor = self.floor
        self.settling, _ = start_protected(floor.store.settle(
            floor.counters, request_id=self.request_id, actual=cost, now=None, ttl_now=time.time(),
            usage=usage_write(record, prefix=_PREFIX)))
        self.records.write(orjson.dumps(record) + b"\n")
        requests, dollars = self._metrics or _meter_metrics()
        requests.labels(who["user"], who["team"], self.model, "allowed").inc()
        dollars.labels(who["user"], who["team"], self.model).inc(cost)
        return msg.response_body({"x-meter-cost-usd": f"{cost / 1e9:.9f}"},
                                 meta={"cost_usd": cost / 1e9, "input_tokens": tokens_in, "output_tokens": tokens_out,
                                       "status": self.status})


def _meter_metrics() -> tuple[Any, Any]:
    from prometheus_client import CollectorRegistry, Counter

    registry = CollectorRegistry()
    MeterFloorProcessor._metrics = m = (
        Counter("meter_requests", "requests", ["user", "team", "model", "decision"], registry=registry),
        Counter("meter_cost_nusd", "cost", ["user", "team", "model"], registry=registry))
    return m


async def _serve(args: argparse.Namespace) -> None:
    new: type[NoopProcessor] = NoopProcessor
    if args.redis_url:
        RedisFloorProcessor.floor = RedisFloor(args.redis_url)
        await RedisFloorProcessor.floor.load()
        new = RedisFloorProcessor
        if args.meter:
            new = MeterFloorProcessor
    # Nothing to drain for: the bench stops Envoy first.
    await serve(new, args.host, args.port, drain_seconds=0.0, grace_seconds=1.0)  # type: ignore[arg-type]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m tests.bench_floor", description=__doc__.splitlines()[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--redis-url", help="also run Tollgate's reserve and settle scripts per request (floorredis)")
    ap.add_argument("--meter", metavar="RECORDS", type=Path,
                    help="with --redis-url, also the least of metering, records appended to RECORDS (floormeter)")
    args = ap.parse_args(argv)
    if args.meter:
        if not args.redis_url:
            ap.error("--meter needs --redis-url")
        # Unbuffered, a write per record (Tollgate's sinks write once per event-loop turn); open
        # for the process's life.
        MeterFloorProcessor.records = open(args.meter, "ab", buffering=0)  # noqa: SIM115
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    asyncio.run(_serve(args))


if __name__ == "__main__":
    main()
