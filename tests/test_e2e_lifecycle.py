"""The request lifecycle off the happy path, through the real stack (issue 9).

Every test ends by checking the books (tests/accounting.py): no lease left anywhere, each of its
counters' spend equal to the final attribution records in Redis, and every request the fake
provider billed charged more than $0 (exactly its usage where the record claims no estimate).

The module runs its own stack (Redis, fake provider, ext_proc, Envoy): tests here kill Redis and
the ext_proc, and the lease checks look at every counter in Redis, so no other test may share it.
Its policies are the test policies with a short `gateway.request_timeout_seconds` (Envoy's route
timeout), so an upstream that stalls past it takes seconds, not ten minutes. Requests are sent by
the `budget-bot` key, tagged with x-tollgate-metadata {"suite", "run"} (tests/policies/
test-lifecycle.yaml counts per run) and with `x-fake-run: <run>`, which the fake keeps in each
ledger entry's `hooks`, so each test joins only its own ledger entries.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import re
import shutil
import signal
import socket
import struct
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import redis
import yaml

from extproc.procs import Proc
from extproc.stack import Stack
from extproc.supervisor import supervise
from tests.accounting import (
    Counter,
    Prices,
    assert_books_balance,
    books_and_ledger,
    counter_keys,
    fake_ledger,
    final_records,
)
from tests.conftest import JsonLog, running_stack

ROUTE_TIMEOUT_S = 4  # gateway.request_timeout_seconds in this module's stack
LEASE_GRACE_S = 1  # gateway.lease_grace_seconds: leases last ROUTE_TIMEOUT_S + this (default + 60 s)
API_KEY = "key-budget"  # budget-bot: its x-tollgate-metadata is trusted (tests/policies/gateway.yaml)
CHAT = "/v1/chat/completions"


@pytest.fixture(scope="module")
def lc(policy_dir: Path, idp, tmp_path_factory) -> Stack:
    """This module's own stack, with a short route timeout."""
    pol = tmp_path_factory.mktemp("lifecycle-policies")
    for f in policy_dir.glob("*.yaml"):
        shutil.copy(f, pol / f.name)
    doc = yaml.safe_load((pol / "gateway.yaml").read_text()) or {}
    gw = doc.setdefault("gateway", {})
    gw["request_timeout_seconds"] = ROUTE_TIMEOUT_S
    gw["lease_grace_seconds"] = LEASE_GRACE_S
    # One key drives 256 concurrent clients here (the Redis pool's test); the per-identity cap
    # has its own tests (test_e2e_limits.py).
    gw["limits"] = {"concurrent_requests_per_identity": 0}
    (pol / "gateway.yaml").write_text(yaml.safe_dump(doc))
    with running_stack(pol, idp, tmp_path_factory.mktemp("lifecycle")) as s:
        yield s


# ---- helpers ----------------------------------------------------------------------------------

def chat(content: str = "hi", *, stream: bool = False, max_tokens: int | None = 64, model: str = "gpt-4o",
         **extra) -> bytes:
    body: dict = {"model": model, "messages": [{"role": "user", "content": content}], **extra}
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    if stream:
        body["stream"] = True
    return json.dumps(body).encode()


_RUNS: list[Run] = []


@pytest.fixture(autouse=True)
def _forget_runs(lc):
    """After each test (once its own books were checked), drop its counters: a test that found a
    pinned lease must not fail every later test's "no lease anywhere" check too."""
    _RUNS.clear()
    yield
    r = redis.Redis.from_url(lc.redis_url)
    try:
        for run in _RUNS:
            for k in counter_keys(r):
                if run.counter.key_matches("tollgate:", k):
                    r.delete(k, k + ":leases")
    finally:
        r.close()
        _RUNS.clear()


@dataclass
class Run:
    """One test's requests: their own counter and their own slice of the fake's ledger."""

    stack: Stack
    suite: str = "lifecycle"
    id: str = field(default_factory=lambda: uuid.uuid4().hex)

    def __post_init__(self) -> None:
        _RUNS.append(self)

    @property
    def counter(self) -> Counter:
        return Counter(self.suite, {"run": self.id})  # budget names equal suite names

    def headers(self, **fake: object) -> dict[str, str]:
        h = {"authorization": f"Bearer {API_KEY}", "content-type": "application/json",
             "x-tollgate-metadata": json.dumps({"suite": self.suite, "run": self.id}), "x-fake-run": self.id}
        h.update({f"x-fake-{k.replace('_', '-')}": str(v) for k, v in fake.items()})
        return h

    def post(self, body: bytes, timeout: float = 15, **fake: object) -> httpx.Response:
        return httpx.post(self.stack.base_url + CHAT, content=body, headers=self.headers(**fake), timeout=timeout)

    def ledger(self) -> list[dict]:
        return [e for e in fake_ledger(self.stack.ports.fake) if e["hooks"].get("x-fake-run") == self.id]

    def check(self, *, wait: float = 10.0, outbox: Path | None = None, counter: Counter | None = None):
        """The books: no lease left, counter == records, nothing the fake billed charged $0."""
        return books_and_ledger(self.stack.redis_url, self.stack.ports.fake, counters=[counter or self.counter],
                                wait=wait, outbox=outbox, hook=("x-fake-run", self.id))

    def records(self) -> list[dict]:
        r = redis.Redis.from_url(self.stack.redis_url)
        try:
            return [x for x in final_records(r).values() if (x.get("metadata") or {}).get("run") == self.id]
        finally:
            r.close()


def raw_request(body: bytes, headers: dict[str, str], path: str = CHAT) -> bytes:
    head = [f"POST {path} HTTP/1.1", "host: tollgate.test", f"content-length: {len(body)}"]
    head += [f"{k}: {v}" for k, v in headers.items()]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def send_and_drop(port: int, data: bytes, *, delay: float = 0.0, reset: bool = False) -> None:
    """Connect, send `data`, wait `delay`, then close: with a FIN, or with an RST (`reset`)."""
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    try:
        s.sendall(data)
        if delay:
            time.sleep(delay)
        if reset:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    finally:
        s.close()


def lifecycle_events(stack: Stack) -> dict[str, float]:
    """The ext_proc's tollgate_request_lifecycle_events counters, by event."""
    text = httpx.get(f"http://127.0.0.1:{stack.ports.metrics[0]}/metrics", timeout=5).text
    out = {}
    for m in re.finditer(r'^tollgate_request_lifecycle_events_total\{event="([^"]+)"\} (\S+)$', text, re.MULTILINE):
        out[m.group(1)] = float(m.group(2))
    return out


def proc(stack: Stack, name: str) -> Proc:
    return next(p for p in stack.procs if p.name == name)


def sigkill(p: Proc) -> None:
    os.kill(p.pid, signal.SIGKILL)
    p.popen.wait(timeout=10)


def restart_by_hand(stack: Stack, old: Proc) -> Proc:
    """A new process with the dead one's argv, env, log and ports, in its place in stack.procs (so
    the fixture stops it)."""
    new = Proc(old.name, list(old.argv), log_path=old.log_path, env=old.env, ports=list(old.ports))
    stack.procs[stack.procs.index(old)] = new
    new.start()
    new.wait_ready(timeout=30)
    return new


def wait_envoy_sees_extproc(stack: Stack, run: Run, timeout: float = 20.0) -> None:
    """Until a request through Envoy is answered by the ext_proc again (not Envoy's 500)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            r = httpx.post(stack.base_url + CHAT, content=b"{", headers=run.headers(), timeout=5)
            if r.status_code == 400:
                return
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, "Envoy never reached the restarted ext_proc"
        time.sleep(0.1)


class Load(threading.Thread):
    """`clients` concurrent clients, each sending `make()` requests back to back until stopped."""

    def __init__(self, stack: Stack, clients: int, make: Callable[[int], tuple[bytes, dict[str, str]]],
                 per_client: int | None = None, timeout: float = 20.0) -> None:
        super().__init__(daemon=True)
        self.stack, self.clients, self.make, self.per_client, self.timeout = stack, clients, make, per_client, timeout
        self.halt = threading.Event()
        self.statuses: list[int] = []
        self.codes: list[str] = []
        self.errors: list[str] = []
        self.sent = 0

    def run(self) -> None:
        asyncio.run(self._main())

    async def _main(self) -> None:
        limits = httpx.Limits(max_connections=self.clients, max_keepalive_connections=self.clients)
        async with httpx.AsyncClient(base_url=self.stack.base_url, limits=limits, timeout=self.timeout) as c:
            await asyncio.gather(*(self._client(c, i) for i in range(self.clients)))

    async def _client(self, c: httpx.AsyncClient, i: int) -> None:
        n = 0
        while not self.halt.is_set() and (self.per_client is None or n < self.per_client):
            body, headers = self.make(i * 100000 + n)
            n += 1
            self.sent += 1
            try:
                r = await c.post(CHAT, content=body, headers=headers)
                self.statuses.append(r.status_code)
                if r.status_code >= 400:
                    try:
                        self.codes.append(str(r.json()["error"].get("code")))
                    except (ValueError, KeyError, TypeError, AttributeError):
                        self.codes.append(r.text[:80])
            except httpx.HTTPError as e:
                self.errors.append(type(e).__name__)

    def stop(self, timeout: float = 30.0) -> None:
        self.halt.set()
        self.join(timeout)
        assert not self.is_alive(), "load generator did not stop"

    def tally(self) -> dict[int, int]:
        out: dict[int, int] = {}
        for s in self.statuses:
            out[s] = out.get(s, 0) + 1
        return out


# ---- the checker itself can fail --------------------------------------------------------------

def test_checker_catches_a_pinned_lease_and_an_uncharged_request(lc):
    """The books checks are only worth something if they fail on the bugs of issue 9."""
    run = Run(lc)
    key = f"tollgate:b:lifecycle:2000-01-01:run={run.id}"
    r = redis.Redis.from_url(lc.redis_url)
    try:
        r.hset(key, mapping={"spent": 0, "reserved": 5, "r:deadbeef": 5})
        r.zadd(key + ":leases", {"deadbeef": time.time() + 600})
        with pytest.raises(AssertionError, match="live lease"):
            assert_books_balance(lc.redis_url, wait=0.2)
    finally:
        r.delete(key, key + ":leases")
        r.close()
    from tests.accounting import assert_served_were_charged
    entry = {"request_id": "x", "status": 200, "model": "gpt-4o", "input_tokens": 9, "output_tokens": 16,
             "cached": 0, "cache_write": 0}
    with pytest.raises(AssertionError, match="charged \\$0"):
        assert_served_were_charged({}, [entry])
    with pytest.raises(AssertionError, match="other than the provider's usage"):
        assert_served_were_charged({"a": {"envoy_request_id": "x", "cost_nusd": 1, "estimate": None}}, [entry])
    # 9 input tokens at $2.50/M + 16 output at $10/M = 22,500 + 160,000 nano-USD
    assert Prices().ledger_cost(entry) == 182_500
    assert Prices().cost_nusd("gpt-4o-2024-08-06", output_tokens=1) == 10_000  # a glob


# ---- clients that go away at every phase -------------------------------------------------------

def test_disconnect_before_headers_complete(lc):
    run = Run(lc)
    before = len(run.records())
    partial = raw_request(chat(), run.headers())[:60]  # the request line and part of a header
    with ThreadPoolExecutor(20) as ex:
        list(ex.map(lambda i: send_and_drop(lc.ports.listen, partial, delay=0.01 * (i % 3), reset=i % 2 == 0),
                    range(20)))
    _, ledger = run.check()
    assert ledger == [] and len(run.records()) == before  # nothing reached the provider or Redis


def test_disconnect_after_sending_before_the_response(lc):
    """The request was forwarded; the provider takes 1.6 s (JSON, 16 tokens x 100 ms); the client
    leaves after 0.4 s. The provider billed the whole answer (it did the work), and so does the
    gateway: the reservation, never less than the provider's bill."""
    run = Run(lc)
    data = raw_request(chat("x" * 40), run.headers(token_latency_ms=100, output_tokens=16))
    with ThreadPoolExecutor(20) as ex:
        list(ex.map(lambda i: send_and_drop(lc.ports.listen, data, delay=0.4, reset=i % 2 == 0), range(20)))
    books, ledger = run.check()
    recs = books.of(run.counter)
    assert len(ledger) == 20 and len(recs) == 20, (len(ledger), len(recs))
    prices = Prices()
    by_envoy = {r["envoy_request_id"]: r for r in recs}
    for e in ledger:
        rec = by_envoy[e["request_id"]]
        assert rec["end"] == "interrupted" and rec["complete"] is False, rec
        assert rec["estimate"] == "reservation" and rec["cost_nusd"] >= prices.ledger_cost(e) > 0, (rec, e)


def test_disconnect_mid_admission(lc):
    """Clients that close right after sending (FIN or RST, 0 to 20 ms later), 5 bursts of 200
    concurrent: whatever phase each stream was cancelled in, nothing stays reserved. Most delays
    are 1 to 4 ms, which is when (measured) Envoy cancels streams during the reserve call."""
    run = Run(lc)
    events_before = lifecycle_events(lc)
    data = raw_request(chat("y" * 200, max_tokens=4000), run.headers())
    delays = [0, 0.001, 0.0015, 0.002, 0.003, 0.004, 0.02]
    for _ in range(5):
        with ThreadPoolExecutor(50) as ex:
            list(ex.map(lambda i: send_and_drop(lc.ports.listen, data, delay=delays[i % len(delays)],
                                                reset=(i // len(delays)) % 2 == 1), range(200)))
    time.sleep(0.5)
    events = lifecycle_events(lc)
    cancelled = events.get("cancelled_in_admission", 0) - events_before.get("cancelled_in_admission", 0)
    print(f"mid-admission: {cancelled:.0f} of 1000 cancelled in admission, {len(run.records())} forwarded and "
          f"settled, {len(run.ledger())} reached the fake; still live: {live_leases_of(lc, run)}")
    assert cancelled > 0, "no stream was cancelled during admission: the test missed its phase"
    run.check(wait=5)


class _Engine:
    """A budget engine stand-in: admits after a moment, records releases; `on_done` runs as the
    reserve returns (before the waiting handler has resumed)."""

    def __init__(self, on_done: Callable[[], None] | None = None) -> None:
        self.on_done = on_done
        self.released: list[str] = []

    async def admit(self, **kw):
        from extproc.budgets import Admission
        from extproc.budgets.store import CounterRef
        await asyncio.sleep(0.01)
        if self.on_done is not None:
            self.on_done()
        return Admission("allowed", model=kw["model"], provider=kw["provider"], reserved_nusd=5,
                         max_output_tokens=kw["max_output_tokens"], request_id=kw["request_id"],
                         budgets=["lifecycle"], counters=(CounterRef("k", None),))

    async def release(self, adm) -> str:
        self.released.append(adm.request_id)
        return "released"


async def _cancel_during_admission(cancel_as_the_reserve_returns: bool) -> tuple[_Engine, str]:
    """Admitter.admit in a handler task, cancelled (as grpc.aio cancels a stream's handler) either
    while the reserve runs or just as it returns; then Settler.close, as the server's finally does."""
    from types import SimpleNamespace

    from extproc.config import load_config
    from extproc.lifecycle.admitter import Admitter
    from extproc.lifecycle.context import RequestContext
    from extproc.lifecycle.settler import Settler
    from extproc.metrics import Metrics
    from extproc.providers import api_for_path

    loop = asyncio.get_running_loop()
    handler: asyncio.Task | None = None
    engine = _Engine(on_done=(lambda: loop.call_soon(handler.cancel)) if cancel_as_the_reserve_returns else None)
    metrics = Metrics()
    ctx = RequestContext(load_config(Path(__file__).resolve().parent.parent / "policies"))
    ctx.path = CHAT
    ctx.api = api_for_path(CHAT)
    ctx.req = ctx.api.parse(chat())
    settler = Settler(SimpleNamespace(metrics=metrics, record=lambda rec: None), ctx, engine)

    async def handle() -> None:
        try:
            await Admitter(engine, metrics).admit(ctx)
        finally:
            await settler.close()

    handler = loop.create_task(handle())
    if not cancel_as_the_reserve_returns:
        await asyncio.sleep(0.002)
        handler.cancel()
    with pytest.raises(asyncio.CancelledError):
        await handler
    await asyncio.sleep(0.05)  # a release runs in a task of its own
    return engine, ctx.state.value


def test_cancel_during_the_reserve_releases_the_lease():
    """In process, deterministic: a stream cancelled while its reserve runs releases what it reserved."""
    engine, state = asyncio.run(_cancel_during_admission(False))
    assert len(engine.released) == 1 and state == "released"


def test_cancel_just_after_the_reserve_finished_releases_the_lease():
    engine, state = asyncio.run(_cancel_during_admission(True))
    assert len(engine.released) == 1 and state == "released", (engine.released, state)


def test_disconnect_mid_stream(lc):
    """SSE at 50 ms a token; each client reads the first event and leaves. Charged the deltas seen."""
    run = Run(lc)

    async def one(c: httpx.AsyncClient) -> bytes:
        async with c.stream("POST", CHAT, content=chat("z" * 40, stream=True, max_tokens=200),
                            headers=run.headers(token_latency_ms=50, output_tokens=60)) as r:
            assert r.status_code == 200
            got = b""
            async for chunk in r.aiter_raw():
                got += chunk
                if b'"content"' in got:
                    return got  # leaving the block closes the connection mid-stream
        raise AssertionError("stream ended before its first content event")

    async def main() -> None:
        async with httpx.AsyncClient(base_url=lc.base_url, timeout=15,
                                     limits=httpx.Limits(max_connections=20)) as c:
            await asyncio.gather(*(one(c) for _ in range(20)))

    asyncio.run(main())
    books, ledger = run.check()
    recs = books.of(run.counter)
    assert len(recs) == 20 and len(ledger) == 20
    for rec in recs:
        assert rec["stream"] is True and rec["end"] == "interrupted" and rec["complete"] is False, rec
        assert rec["estimate"] == "deltas" and rec["cost_nusd"] > 0, rec
    for e in ledger:
        assert 0 < e["output_tokens"] < 60 and not e["complete"], e  # the fake stopped when the client left


# ---- the nested body ----------------------------------------------------------------------------

def _nested(depth: int, *, stream: bool) -> bytes:
    inner = "[" * (depth // 2) + '{"a":' * (depth - depth // 2) + "1" + "}" * (depth - depth // 2) + "]" * (depth // 2)
    head = chat(stream=stream, max_tokens=20)[:-1]  # without its closing brace
    return head + b',"metadata":' + inner.encode() + b"}"


@pytest.mark.parametrize("depth", [300, 1000, 2000])
def test_deeply_nested_body(lc, depth):
    """Served and charged, or a 400 in OpenAI's shape; never a 500, never a lease left. The stream
    variant makes the gateway rewrite the body (it adds stream_options), the JSON one does not: at
    1,000 deep the rewrite fails after the reserve (a 400, the lease released), at 2,000 the parse."""
    run = Run(lc)
    for stream in (False, True):
        r = run.post(_nested(depth, stream=stream))
        assert r.status_code in (200, 400), (stream, r.status_code, r.text[:300])
        if r.status_code == 400:
            err = r.json()["error"]
            assert set(err) >= {"message", "type", "param", "code"} and err["type"] == "invalid_request_error", err
        else:
            assert (b"[DONE]" in r.content) if stream else ("usage" in r.json())
    books, ledger = run.check()
    served = [e for e in ledger if e["status"] == 200]
    assert len(books.of(run.counter)) == len(served)
    if depth == 300:
        assert len(served) == 2, "a 300-deep body is valid JSON any provider takes: it should be served"


# ---- upstream faults ----------------------------------------------------------------------------

FAULTS = {
    # name: (stream, fake hooks, the estimates docs/budgets.md allows for it)
    "truncated_200_body": (False, {"truncate_body": 40}, {"reservation", "body_bytes"}),
    "json_without_usage": (False, {"omit_usage": 1}, {"body_bytes"}),
    "stall_past_route_timeout": (False, {"stall_after_ms": (ROUTE_TIMEOUT_S + 2) * 1000}, {"reservation"}),
    "stream_without_usage": (True, {"omit_usage": 1}, {"deltas"}),
    # Envoy may see the upstream reset before it hands the ext_proc the response headers: then
    # the gateway never learns the status, and charges the input bound (which is the larger).
    "stream_cut_short": (True, {"cut_after": 3}, {"deltas", "input_bound"}),
}


def test_upstream_faults_are_charged_an_estimate(lc):
    """Each fault after the provider did (and billed) the work: charged non-zero, `estimate` set,
    `complete: false`; where the provider honoured the cap, never below what it billed."""
    run = Run(lc)
    prices = Prices()

    def send(name: str) -> tuple[str, int | str]:
        stream, hooks, _ = FAULTS[name]
        try:
            r = run.post(chat("w" * 30, stream=stream, max_tokens=40), timeout=ROUTE_TIMEOUT_S + 10,
                         case=name, output_tokens=30, **hooks)
            return name, r.status_code
        except httpx.HTTPError as e:
            return name, type(e).__name__

    with ThreadPoolExecutor(len(FAULTS)) as ex:
        seen = dict(ex.map(send, FAULTS))
    books, ledger = run.check()
    by_envoy = {r["envoy_request_id"]: r for r in books.of(run.counter)}
    problems = []
    for e in ledger:
        name = e["hooks"]["x-fake-case"]
        rec = by_envoy.get(e["request_id"])
        want = FAULTS[name][2]
        if rec is None:
            problems.append(f"{name}: no record (client saw {seen[name]})")
            continue
        summary = {k: rec.get(k) for k in ("status", "end", "estimate", "complete", "cost_nusd", "settlement",
                                          "gateway_error")}
        if not (rec["cost_nusd"] > 0 and rec["estimate"] is not None and rec["complete"] is False):
            problems.append(f"{name}: {summary} (client saw {seen[name]})")
        elif rec["estimate"] not in want:
            problems.append(f"{name}: estimate {rec['estimate']!r}, expected one of {sorted(want)}: {summary}")
        elif rec["cost_nusd"] < prices.ledger_cost(e):  # the fake honoured the cap: estimates cover it
            problems.append(f"{name}: charged {rec['cost_nusd']} < billed {prices.ledger_cost(e)}: {summary}")
    assert sorted(e["hooks"]["x-fake-case"] for e in ledger) == sorted(FAULTS)
    assert not problems, "\n".join(problems)


# ---- an overrun in one final chunk -----------------------------------------------------------------

@pytest.mark.parametrize("tokens", [
    1000,  # ~290 KB in one write: Envoy hands the ext_proc one final chunk
    20000,  # ~5.7 MB in one write: several chunks, the usage in a later one than the cut
])
def test_overrun_in_one_final_chunk_is_cut_and_charged_its_real_cost(lc, tokens):
    """The provider ignores max_tokens=10 and sends `tokens` tokens, the whole stream in ONE write:
    the live cap still ends the client's stream with an error event, and the charge is what the
    provider billed, with the overrun in the record (a budget of $0.002; this costs 5-100x that)."""
    run = Run(lc, suite="lifecycle-small")
    body = b""
    with httpx.stream("POST", lc.base_url + CHAT, content=chat("hello", stream=True, max_tokens=10),
                      headers=run.headers(single_write=1, ignore_max_tokens=1, output_tokens=tokens),
                      timeout=15) as r:
        assert r.status_code == 200
        rid = r.headers["x-tollgate-request-id"]
        try:
            for chunk in r.iter_raw():
                body += chunk
        except httpx.RemoteProtocolError:
            pass  # the gateway resets the stream after its error event when more was still coming
    events = [json.loads(ln[6:]) for ln in body.split(b"\n") if ln.startswith(b"data: ") and ln != b"data: [DONE]"]
    assert events and events[-1].get("error", {}).get("code") == "budget_exceeded", body[-300:]
    deltas = sum(1 for ev in events if ev.get("choices") and ev["choices"][0].get("delta", {}).get("content"))
    assert deltas < tokens / 10, f"the client got {deltas} of {tokens} tokens: the cap did not cut"
    books, ledger = run.check()
    rec = books.records[rid]
    (entry,) = ledger
    assert entry["output_tokens"] == tokens
    summary = {k: rec[k] for k in ("end", "estimate", "output_tokens", "cost_nusd", "overrun_usd")}
    assert rec["end"] == "budget_cap" and rec["overrun_usd"] > 0, summary
    if tokens == 1000:  # the provider's usage came in the chunk that was cut: it is what is charged
        assert rec["estimate"] is None and rec["output_tokens"] == tokens, summary
        assert rec["cost_nusd"] == Prices().ledger_cost(entry), (
            f"provider billed {Prices().ledger_cost(entry)} nUSD for {tokens} tokens; record {summary}")
    else:
        # Several chunks: the usage comes in one after the cut, which the gateway does not read
        # (it resets the upstream: a provider still generating must be stopped). Charged the
        # deltas the client was given, like any cut: above the reservation, below the bill.
        assert rec["estimate"] == "deltas" and rec["output_tokens"] == deltas < tokens, summary
        assert rec["cost_nusd"] > rec["reserved_usd"] * 1e9, summary


# ---- concurrency with Redis healthy ---------------------------------------------------------------

def test_256_concurrent_clients_get_no_503(lc):
    run = Run(lc)

    def make(i: int) -> tuple[bytes, dict[str, str]]:
        return chat("c" * (i % 50), stream=i % 4 == 0, max_tokens=32), run.headers()

    load = Load(lc, 256, make, per_client=2, timeout=30)
    t0 = time.monotonic()
    load.run()  # in this thread: it ends when every client has sent its 3
    took = time.monotonic() - t0
    tally = load.tally()
    print(f"256 clients: {len(load.statuses)} responses in {took:.1f}s: {tally}, errors {load.errors[:5]}")
    assert not load.errors and tally == {200: 512}, (tally, sorted(set(load.codes))[:5], load.errors[:5])
    books, ledger = run.check()
    assert len(books.of(run.counter)) == 512 and len(ledger) == 512
    assert all(r["estimate"] is None and r["complete"] for r in books.of(run.counter))


# ---- refusals write nothing per request --------------------------------------------------------

def test_1000_unauthenticated_requests_leave_no_keys(lc):
    r = redis.Redis.from_url(lc.redis_url)
    try:
        keys_before, size_before, xlen_before = set(r.keys("*")), r.dbsize(), r.xlen("tollgate:attribution")
        bodies = chat()

        async def main() -> list[int]:
            async with httpx.AsyncClient(base_url=lc.base_url, timeout=15,
                                         limits=httpx.Limits(max_connections=50)) as c:
                sem = asyncio.Semaphore(50)

                async def one(i: int) -> int:
                    h = {"content-type": "application/json",
                         "authorization" if i % 2 else "x-api-key": f"Bearer nope-{i}" if i % 2 else f"nope-{i}"}
                    async with sem:
                        return (await c.post(CHAT, content=bodies, headers=h)).status_code

                return await asyncio.gather(*(one(i) for i in range(1000)))

        statuses = asyncio.run(main())
        assert statuses == [401] * 1000
        time.sleep(0.3)
        keys_after = set(r.keys("*"))
        assert keys_after == keys_before, f"new keys: {sorted(keys_after - keys_before)[:10]}"
        assert r.dbsize() == size_before and r.xlen("tollgate:attribution") == xlen_before
    finally:
        r.close()
    assert_books_balance(lc.redis_url)


# ---- Redis SIGKILLed under load, restarted on the same port and data ------------------------------

def test_redis_killed_under_load_settles_from_the_outbox(lc):
    """In-flight requests (admitted before the kill, answered by the provider while Redis is down)
    settle into the outbox and are replayed once Redis is back: none served and charged $0, counters
    equal to the records."""
    run = Run(lc)
    attribution = JsonLog(lc.attribution_log)

    def make(i: int) -> tuple[bytes, dict[str, str]]:
        return chat("r" * (i % 30), stream=i % 3 == 0, max_tokens=24), run.headers(token_latency_ms=40)

    load = Load(lc, 32, make, timeout=20)
    load.start()
    time.sleep(1.5)
    old = proc(lc, "redis")
    sigkill(old)
    time.sleep(1.5)
    restart_by_hand(lc, old)
    time.sleep(1.5)
    load.stop()
    outbox = lc.run_dir / "state"
    books, ledger = run.check(wait=15, outbox=outbox)
    tally = load.tally()
    queued = [x for x in attribution.records()
              if (x.get("metadata") or {}).get("run") == run.id and x.get("settlement") == "queued"]
    print(f"redis kill: statuses {tally}, client errors {len(load.errors)}, {len(queued)} settles queued "
          f"and replayed, {len(books.of(run.counter))} records, {len(ledger)} ledger entries")
    assert queued, "no settle went through the outbox: the kill missed every in-flight request"
    assert tally.get(200, 0) > 0 and set(tally) <= {200, 503}, (tally, set(load.codes))


def test_no_503_once_redis_is_back(lc):
    """Redis restarted and answering: requests must not pay for connections to the old process."""
    run = Run(lc)

    def make(i: int) -> tuple[bytes, dict[str, str]]:
        return chat("p" * (i % 30), max_tokens=16), run.headers(token_latency_ms=20)

    warm = Load(lc, 64, make, per_client=2)  # the pool now holds ~64 idle connections (this run's
    warm.run()  # statuses do not count: an earlier test's Redis restart may still have stale ones)
    assert warm.tally().get(200), warm.tally()
    old = proc(lc, "redis")
    sigkill(old)
    restart_by_hand(lc, old)
    r = redis.Redis.from_url(lc.redis_url)
    try:
        deadline = time.monotonic() + 10
        while True:  # until it has loaded its data and answers
            try:
                if r.ping():
                    break
            except redis.RedisError:
                pass
            assert time.monotonic() < deadline, "Redis did not come back"
            time.sleep(0.05)
    finally:
        r.close()
    time.sleep(1.0)
    load = Load(lc, 64, make, per_client=2)
    load.run()
    print(f"after the Redis restart: {load.tally()} {sorted(set(load.codes))}")
    run.check(outbox=lc.run_dir / "state")
    assert load.tally() == {200: 128}, (load.tally(), sorted(set(load.codes)))


# ---- the ext_proc SIGKILLed under load, restarted by hand ------------------------------------------

def test_extproc_killed_under_load_every_served_request_is_charged(lc):
    """Requests the provider served while their ext_proc died are charged their reservation when
    their leases expire (into a charge, recorded by Redis as `lease_expired`). The ext_proc is
    brought back by the supervisor `tollgate run` uses (its own tests: tests/test_supervisor.py).

    Leases last request_timeout_seconds + lease_grace_seconds (4 + 1 s here): the test waits until
    the orphaned leases are past their expiry on Redis's clock, then sends one more request on the
    same counter, whose reserve script purges them (expiry happens when a script touches the counter).
    """
    run = Run(lc)

    def make(i: int) -> tuple[bytes, dict[str, str]]:
        return chat("k" * (i % 30), stream=i % 3 == 0, max_tokens=24), run.headers(token_latency_ms=40)

    load = Load(lc, 32, make, timeout=20)
    load.start()
    time.sleep(1.5)
    sup = supervise(lc, out=io.StringIO())
    old = proc(lc, "extproc-0")
    old_pid = old.pid
    sigkill(old)
    time.sleep(0.2)  # what the dead process had sent, Redis has run; its successor is not up yet
    held_at_kill = set(live_leases_of(lc, run))  # the dead process's leases: nothing else holds one now
    deadline = time.monotonic() + 20
    while sup.restarts("extproc-0") == 0:
        assert time.monotonic() < deadline, "the supervisor did not restart extproc-0 within 20 s"
        assert sup.poll() is None
        time.sleep(0.05)
    assert proc(lc, "extproc-0").pid != old_pid
    wait_envoy_sees_extproc(lc, run)
    time.sleep(1.0)
    load.stop()
    tally = load.tally()
    assert held_at_kill, "no lease was held at the kill: it missed every in-flight request"
    _orphaned_leases(lc, run, settle_wait=5.0)  # the successor has settled what it handled
    # Some of the dead process's leases may already have expired and been purged by the successor's
    # reserves (the restart can outlast a lease); the rest are purged by one more request.
    _wait_past_expiry(lc, run, sorted(held_at_kill))
    r = run.post(chat())  # its reserve purges the expired leases of this counter
    assert r.status_code == 200, r.text
    final = {x["request_id"]: x for x in run.records()}
    expired = [x for x in final.values() if x.get("settlement") == "lease_expired"]
    settled_before_death = {rid for rid in held_at_kill if (final.get(rid) or {}).get("settlement") == "settled"}
    orphans = held_at_kill - settled_before_death
    served = [e for e in run.ledger() if e["status"] == 200]
    print(f"extproc kill: statuses {tally} {sorted(set(load.codes))[:6]}, {len(served)} served by the fake, "
          f"{len(held_at_kill)} leases held at the kill ({len(settled_before_death)} settled as it died), "
          f"{len(expired)} expired into a charge")
    # Every lease the dead process held ends charged, once: settled, or expired into a charge; and
    # no lease of the process that took over ever expired.
    assert sorted(x["request_id"] for x in expired) == sorted(orphans)
    assert all(x["cost_nusd"] > 0 and x["estimate"] == "reservation" and not x["complete"] for x in expired)
    _KILLED["expired"] = expired
    run.check()


_KILLED: dict[str, list[dict]] = {}


def test_expired_lease_records_name_their_budget_and_reservation():
    expired = _KILLED.get("expired")
    assert expired, "needs test_extproc_killed_under_load_every_served_request_is_charged to have run"
    for x in expired:
        assert x["budgets"] == ["lifecycle"], json.dumps(x)
        assert x["reserved_usd"] * 1e9 == pytest.approx(x["cost_nusd"]), json.dumps(x)


def live_leases_of(stack: Stack, run: Run) -> list[str]:
    r = redis.Redis.from_url(stack.redis_url)
    try:
        keys = [k for k in counter_keys(r) if run.counter.key_matches("tollgate:", k)]
        return sorted(m.decode() for k in keys for m in r.zrange(k + ":leases", 0, -1) if not m.startswith(b"x:"))
    finally:
        r.close()


def _orphaned_leases(stack: Stack, run: Run, settle_wait: float) -> list[str]:
    """The leases still live once the running ext_proc has settled what it handled (the set has
    stopped changing for a second): the dead process's."""
    deadline, last, stable_since = time.monotonic() + settle_wait, None, time.monotonic()
    while time.monotonic() < deadline:
        live = live_leases_of(stack, run)
        if live != last:
            last, stable_since = live, time.monotonic()
        elif time.monotonic() - stable_since > 1.0:
            break
        time.sleep(0.1)
    return last or []


def _redis_now(r: redis.Redis) -> float:
    sec, usec = r.time()
    return sec + usec / 1e6


def _wait_past_expiry(stack: Stack, run: Run, members: list[str], timeout: float = 15.0) -> None:
    """Until Redis's clock is past every one of these leases' expiry (the lifecycle stack's leases
    last ROUTE_TIMEOUT_S + LEASE_GRACE_S)."""
    r = redis.Redis.from_url(stack.redis_url)
    try:
        keys = [k + ":leases" for k in counter_keys(r) if run.counter.key_matches("tollgate:", k)]
        scores = [s for k in keys for m in members if (s := r.zscore(k, m)) is not None]
        deadline = time.monotonic() + timeout
        while _redis_now(r) <= max(scores, default=0):
            assert time.monotonic() < deadline
            time.sleep(0.1)
    finally:
        r.close()
