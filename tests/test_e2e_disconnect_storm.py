"""One client's disconnect storm must not fail anyone else's request (issue 15, item 8).

A client that opens requests and drops them makes Envoy reset one ext_proc gRPC stream per
abandoned request, all on the one HTTP/2 connection per Envoy worker that every other request
shares. Before the fix, under such a storm:

* Envoy's own HTTP/2 flood mitigation closed that connection (`http2.outbound_control_flood`:
  more than 1,000 RST_STREAM frames queued and not yet written, because the ext_proc drains the
  socket slower than the storm resets streams), failing every request on it with a 500 and
  cutting live streams (`upstream_cx_destroy_local_with_active_rq`);
* grpc's backlog protector (`grpc.server.max_pending_requests`, 1,000 by default) cancelled new
  calls at random once the calls not yet taken by the server, mostly the storm's dead ones,
  passed its limit: other clients' requests got a 500 `CANCELLED`.

docs/operations.md, "The ext_proc's gRPC server settings", says what is configured instead.

The module runs its own stack: the storm would disturb other tests sharing one, and the lease
check looks at every counter in Redis. The load is bounded in time and stays on loopback.
"""

from __future__ import annotations

import json
import socket
import struct
import threading
import time
from pathlib import Path

import httpx
import pytest

from extproc.stack import Stack
from tests.accounting import Counter, assert_books_balance
from tests.conftest import envoy_extproc_stats, running_stack

CHAT = "/v1/chat/completions"
STORM_KEY = "key-ic"  # ic@example.com: the engineer-monthly budget, so its requests reserve leases
VICTIM_KEY = "key-alice"  # alice@example.com: another identity, another counter of that budget
STORM_SECONDS = 5.0
STORM_THREADS = 16
VICTIM_CLIENTS = 4
STREAM_TOKENS = 80  # the victim's SSE stream: 80 tokens 75 ms apart, ~6 s, across the storm
STREAM_TOKEN_MS = 75
COUNTERS = [Counter("engineer-monthly", {"user": "ic@example.com"}),
            Counter("engineer-monthly", {"user": "alice@example.com"})]


@pytest.fixture(scope="module")
def storm_stack(policy_dir: Path, idp, tmp_path_factory) -> Stack:
    with running_stack(policy_dir, idp, tmp_path_factory.mktemp("storm")) as s:
        yield s


def _body(content: str, *, stream: bool = False, max_tokens: int = 32) -> bytes:
    body: dict = {"model": "gpt-4o", "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens}
    if stream:
        body["stream"] = True
    return json.dumps(body).encode()


class Storm(threading.Thread):
    """Raw-socket clients of one key that open requests and drop them as fast as they can for
    `seconds`: right after the whole body, mid-body, or right after the headers; each with a FIN
    or an RST. A request that is forwarded meets a slow provider, so it is still in flight."""

    def __init__(self, port: int, seconds: float = STORM_SECONDS, threads: int = STORM_THREADS) -> None:
        super().__init__(daemon=True)
        self.port, self.seconds, self.threads = port, seconds, threads
        self.sent = 0
        self.errors = 0
        self._lock = threading.Lock()
        body = _body("s" * 64, max_tokens=400)
        head = (f"POST {CHAT} HTTP/1.1\r\nhost: tollgate.test\r\ncontent-length: {len(body)}\r\n"
                f"authorization: Bearer {STORM_KEY}\r\ncontent-type: application/json\r\n"
                "x-fake-token-latency-ms: 50\r\n\r\n").encode()
        self.variants = [head + body, head + body[: len(body) // 2], head]

    def run(self) -> None:
        deadline = time.monotonic() + self.seconds
        workers = [threading.Thread(target=self._client, args=(i, deadline), daemon=True)
                   for i in range(self.threads)]
        for w in workers:
            w.start()
        for w in workers:
            w.join(self.seconds + 10)

    def _client(self, i: int, deadline: float) -> None:
        n, sent, errors = i, 0, 0
        while time.monotonic() < deadline:
            data = self.variants[n % len(self.variants)]
            reset = (n // len(self.variants)) % 2 == 1
            n += 1
            try:
                s = socket.create_connection(("127.0.0.1", self.port), timeout=2)
                try:
                    s.sendall(data)
                    if reset:
                        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                finally:
                    s.close()
                sent += 1
            except OSError:
                errors += 1
        with self._lock:
            self.sent += sent
            self.errors += errors


class Victims:
    """Another identity at the same time: `clients` sequential clients of short requests, and one
    SSE stream that is live before the storm starts and lasts past it."""

    def __init__(self, stack: Stack, clients: int = VICTIM_CLIENTS) -> None:
        self.stack = stack
        self.headers = {"authorization": f"Bearer {VICTIM_KEY}", "content-type": "application/json"}
        self.halt = threading.Event()
        self.statuses: list[int] = []
        self.failures: list[str] = []
        self.latencies: list[float] = []
        self.stream: dict = {}
        self.threads = [threading.Thread(target=self._requests, args=(i,), daemon=True) for i in range(clients)]
        self.streamer = threading.Thread(target=self._stream, daemon=True)

    def _requests(self, i: int) -> None:
        with httpx.Client(base_url=self.stack.base_url, timeout=30) as c:
            n = 0
            while not self.halt.is_set():
                n += 1
                t0 = time.monotonic()
                try:
                    r = c.post(CHAT, content=_body(f"v{i}-{n}", max_tokens=16), headers=self.headers)
                    self.statuses.append(r.status_code)
                    if r.status_code != 200:
                        self.failures.append(f"{r.status_code} {r.text[:300]}")
                except httpx.HTTPError as e:
                    self.statuses.append(0)
                    self.failures.append(f"{type(e).__name__}: {e}")
                self.latencies.append(time.monotonic() - t0)
                time.sleep(0.02)

    def _stream(self) -> None:
        got = b""
        headers = {**self.headers, "x-fake-output-tokens": str(STREAM_TOKENS),
                   "x-fake-token-latency-ms": str(STREAM_TOKEN_MS)}
        try:
            with httpx.stream("POST", self.stack.base_url + CHAT, headers=headers, timeout=30,
                              content=_body("stream", stream=True, max_tokens=STREAM_TOKENS + 20)) as r:
                self.stream["status"] = r.status_code
                for chunk in r.iter_raw():
                    got += chunk
        except httpx.HTTPError as e:
            self.stream["error"] = f"{type(e).__name__}: {e}"
        self.stream["body"] = got

    def stream_events(self) -> tuple[int, list[bytes]]:
        events = [ln for ln in self.stream.get("body", b"").split(b"\n") if ln.startswith(b"data: ")]
        deltas = sum(1 for ln in events if ln != b"data: [DONE]" and b'"content"' in ln)
        return deltas, events

    def tally(self) -> dict[int, int]:
        out: dict[int, int] = {}
        for s in self.statuses:
            out[s] = out.get(s, 0) + 1
        return out


WATCHED = ("upstream_cx_destroy", "upstream_cx_destroy_with_active_rq", "upstream_cx_destroy_local_with_active_rq",
           "upstream_cx_destroy_remote_with_active_rq", "http2.outbound_flood", "http2.outbound_control_flood",
           "http2.rx_reset", "http2.tx_reset", "upstream_cx_total", "upstream_rq_pending_overflow",
           "upstream_flow_control_backed_up_total", "health_check.failure", "membership_healthy")


def test_disconnect_storm_from_one_key_leaves_other_identities_served(storm_stack):
    s = storm_stack
    victims = Victims(s)
    r = httpx.post(s.base_url + CHAT, content=_body("warm"), headers=victims.headers, timeout=10)
    assert r.status_code == 200, r.text  # Envoy's connections to the ext_proc are up
    before = envoy_extproc_stats(s)

    storm = Storm(s.ports.listen)
    t0 = time.monotonic()
    victims.streamer.start()
    time.sleep(0.3)  # the stream is live before the storm starts
    storm.start()
    for t in victims.threads:
        t.start()
    storm.join(STORM_SECONDS + 15)
    victims.halt.set()
    for t in victims.threads:
        t.join(35)
    victims.streamer.join(35)
    took = time.monotonic() - t0
    after = envoy_extproc_stats(s)
    d = {k.removeprefix("cluster.tollgate_extproc."): after.get(k, 0) - before.get(k, 0)
         for k in after if k.removeprefix("cluster.tollgate_extproc.") in WATCHED}
    deltas, events = victims.stream_events()
    print(f"\nstorm: {storm.sent} requests dropped in {STORM_SECONDS:.0f} s ({storm.errors} connect errors); "
          f"other identity: {victims.tally()}, slowest {max(victims.latencies, default=0):.1f} s; "
          f"stream {victims.stream.get('status')} with {deltas}/{STREAM_TOKENS} deltas"
          f"{', ' + victims.stream['error'] if 'error' in victims.stream else ''}; {took:.1f} s\n"
          f"envoy, ext_proc cluster: {d}")
    for f in victims.failures[:5]:
        print("  failed:", f)

    assert storm.sent > 5000, f"the storm sent only {storm.sent} requests: too weak to test anything"
    assert victims.statuses, "the other identity sent nothing"
    assert not victims.failures, (f"{len(victims.failures)} of the other identity's {len(victims.statuses)} "
                                  f"requests failed: {victims.failures[:3]}")
    assert victims.stream.get("status") == 200 and "error" not in victims.stream, victims.stream.get("error")
    assert deltas == STREAM_TOKENS and events[-1] == b"data: [DONE]", (deltas, events[-3:])
    # What used to break: Envoy closing its connection to the ext_proc, requests and all.
    assert d["http2.outbound_control_flood"] == 0 and d["http2.outbound_flood"] == 0, d
    assert d["upstream_cx_destroy_with_active_rq"] == 0, d
    # The books afterwards: every abandoned request's lease released or settled, none left, and
    # each identity's counter equal to its final records.
    assert_books_balance(s.redis_url, counters=COUNTERS, wait=15)
