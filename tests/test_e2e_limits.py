"""One client cannot take the gateway down (issue 15, item 1), through Envoy.

The attack: one valid API key opens requests and never finishes their bodies. Each holds an
ext_proc stream; once Envoy's circuit breaker on the ext_proc cluster is full, every other client
gets 500. This module's stack scales the numbers down (a breaker of 64, a per-identity cap of 8)
so the flood is cheap, and checks that the cap, not the breaker, stops it: the flooder's extra
requests get a provider-shaped 429 with Retry-After, other identities are served, unauthenticated
floods hold nothing, and Envoy's receive timeout ends a trickled body.
"""

from __future__ import annotations

import json
import shutil
import select
import socket
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import yaml

from extproc.stack import Stack
from tests.accounting import assert_books_balance
from tests.conftest import running_stack

CAP = 8  # gateway.limits.concurrent_requests_per_identity
BREAKER = 64  # gateway.limits.max_concurrent_requests
RECEIVE_TIMEOUT_S = 3.0  # gateway.limits.request_receive_timeout_seconds
FLOOD = 100  # unfinished bodies from one key: more than the breaker holds
CHAT = "/v1/chat/completions"
BODY = json.dumps({"model": "gpt-4o-mini", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}).encode()


@pytest.fixture(scope="module")
def limited(policy_dir: Path, idp, tmp_path_factory) -> Iterator[Stack]:
    pol = tmp_path_factory.mktemp("limits-policies")
    for f in policy_dir.glob("*.yaml"):
        shutil.copy(f, pol / f.name)
    doc = yaml.safe_load((pol / "gateway.yaml").read_text()) or {}
    doc.setdefault("gateway", {})["limits"] = {
        "concurrent_requests_per_identity": CAP, "max_concurrent_requests": BREAKER,
        "request_headers_timeout_seconds": 2, "request_receive_timeout_seconds": RECEIVE_TIMEOUT_S}
    (pol / "gateway.yaml").write_text(yaml.safe_dump(doc))
    with running_stack(pol, idp, tmp_path_factory.mktemp("limits")) as s:
        yield s


def _head(headers: dict[str, str], length: int, path: str = CHAT) -> bytes:
    lines = [f"POST {path} HTTP/1.1", "host: tollgate.test", "content-type: application/json",
             f"content-length: {length}", *(f"{k}: {v}" for k, v in headers.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


@contextmanager
def unfinished_bodies(port: int, n: int, headers: dict[str, str]) -> Iterator[list[socket.socket]]:
    """`n` connections, each with its headers and the first bytes of a body it never finishes.

    Opened ten at a time, each ten once the ones before have been answered (all but the CAP an
    identity may hold; at most 2 s): a burst of more requests than the breaker holds, all arriving
    before the ext_proc has answered any, overflows it whatever the cap (each request opens its
    ext_proc stream before it can be identified); what the cap prevents is a client holding the
    streams it got. (A fixed 20 ms between tens overflowed it now and then when the ext_proc
    answered slower than that, under a full suite: a 500 among the 429s.)"""
    socks: list[socket.socket] = []
    try:
        for i in range(n):
            s = socket.create_connection(("127.0.0.1", port), timeout=5)
            s.sendall(_head(headers, len(BODY)) + BODY[:10])
            socks.append(s)
            if i % 10 == 9:
                _wait_answered(socks, len(socks) - CAP, timeout=2.0)
        yield socks
    finally:
        for s in socks:
            s.close()


def _wait_answered(socks: list[socket.socket], want: int, timeout: float) -> None:
    """Until at least `want` of the sockets have an answer waiting (readable; nothing is read)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select(socks, [], [], 0.02)
        if len(ready) >= want:
            return


def _status(s: socket.socket, timeout: float) -> int | None:
    """The status line's code if an answer arrives within `timeout`, else None."""
    s.settimeout(timeout)
    try:
        data = s.recv(4096)
    except (TimeoutError, socket.timeout):
        return None
    except OSError:
        return -1
    if not data:
        return -1
    return int(data.split(b" ", 2)[1])


def _others_served(stack: Stack, n: int = 20) -> list[int]:
    """Requests from other identities, a few at a time, while the flood holds its streams."""
    keys = ["key-ic", "key-ml", "key-alice", "key-senior"]

    def one(i: int) -> int:
        r = httpx.post(stack.base_url + CHAT, content=BODY, timeout=10,
                       headers={"authorization": f"Bearer {keys[i % len(keys)]}", "content-type": "application/json"})
        return r.status_code

    with ThreadPoolExecutor(4) as ex:
        return list(ex.map(one, range(n)))


def test_one_key_flooding_unfinished_bodies_gets_429_and_others_are_served(limited: Stack) -> None:
    with unfinished_bodies(limited.ports.listen, FLOOD, {"authorization": "Bearer key-intern"}) as socks:
        time.sleep(0.5)
        answered = [_status(s, 0.05) for s in socks]
        held = [i for i, a in enumerate(answered) if a is None]
        refused = [a for a in answered if a is not None]
        assert len(held) == CAP, f"{len(held)} requests held streams, cap {CAP}: {answered}"
        assert refused == [429] * (FLOOD - CAP), refused
        assert _others_served(limited) == [200] * 20
        # The flooder itself is refused while it holds its cap, in the provider's shape.
        r = httpx.post(limited.base_url + "/v1/messages", timeout=10,
                       json={"model": "claude-haiku-4-5", "max_tokens": 8, "messages": [{"role": "user", "content": "x"}]},
                       headers={"x-api-key": "key-intern"})
        assert r.status_code == 429 and r.headers["retry-after"] == "1", r.text
        err = r.json()
        assert err["type"] == "error" and err["error"]["type"] == "rate_limit_error", err
        assert err["error"]["code"] == "concurrency_limit"
        assert r.headers["x-tollgate-concurrency-limit"] == str(CAP)
        assert r.headers["x-tollgate-concurrency-in-flight"] == str(CAP)
    # The slots come back when the streams end.
    deadline = time.monotonic() + 10
    while True:
        r = httpx.post(limited.base_url + CHAT, content=BODY, timeout=10,
                       headers={"authorization": "Bearer key-intern", "content-type": "application/json"})
        if r.status_code == 200 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert r.status_code == 200, r.text
    assert_books_balance(limited.redis_url)


def test_unauthenticated_floods_hold_nothing(limited: Stack) -> None:
    with unfinished_bodies(limited.ports.listen, FLOOD, {"authorization": "Bearer not-a-key"}) as socks:
        time.sleep(0.5)
        assert [_status(s, 1) for s in socks] == [401] * FLOOD
        assert _others_served(limited) == [200] * 20


def test_a_trickled_body_ends_at_the_receive_timeout(limited: Stack) -> None:
    with unfinished_bodies(limited.ports.listen, 1, {"authorization": "Bearer key-ml"}) as (s,):
        started = time.monotonic()
        status = _status(s, RECEIVE_TIMEOUT_S + 5)
        took = time.monotonic() - started
    assert status == 408, status
    assert RECEIVE_TIMEOUT_S - 0.5 <= took <= RECEIVE_TIMEOUT_S + 2, took
