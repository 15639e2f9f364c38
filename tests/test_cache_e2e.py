"""The response cache through the real stack (issue 12), driven by the openai and anthropic SDKs.

These tests share the session stack: the test policies (tests/policies/test-cache.yaml) enable the
cache only for the teams cache-a and cache-b, whose keys nothing else uses, so every other test's
traffic matches no rule and is `x-tollgate-cache: off`, which those tests exercise in passing;
no second Envoy, Redis and fake provider is started on the shared cores. Each test asks its own
question (a fresh uuid in the prompt), so its keys are its own, and tags its requests with
`x-fake-run: <run>`, which the fake provider keeps in its ledger: what the provider billed is
joined to the records of that test alone.

The books, at the end of every test: no lease left, the `cache-books` counter of each user equal
to the sum of its final records (hits add 0), and every request the provider billed charged
exactly its usage; hits never reach the provider (no ledger entry).
"""

from __future__ import annotations

import json
import re
import socket
import threading
import time
import uuid

import anthropic
import httpx
import openai
import pytest
import redis

from extproc.cache.store import Entry
from tests.accounting import Counter, books_and_ledger, final_records
from tests.conftest import JsonLog

A1, A2, B = "key-cache-a1", "key-cache-a2", "key-cache-b"
USERS = {A1: "cache-a1@example.com", A2: "cache-a2@example.com", B: "cache-b@example.com",
         "key-cache-blocked": "cache-blocked@example.com", "key-cache-intern": "cache-intern@example.com"}
CHAT = "/v1/chat/completions"


class Run:
    """One test's requests: a fresh question, its run tag, and the books check at the end."""

    def __init__(self, stack) -> None:
        self.stack = stack
        self.id = uuid.uuid4().hex
        self.question = f"what is the answer to question {self.id}?"
        self.users: set[str] = set()

    def headers(self, **extra: str) -> dict[str, str]:
        return {"x-fake-run": self.id, **extra}

    def oai(self, key: str) -> openai.OpenAI:
        self.users.add(USERS[key])
        return openai.OpenAI(base_url=f"{self.stack.base_url}/v1", api_key=key, max_retries=0,
                             default_headers=self.headers())

    def claude(self, key: str) -> anthropic.Anthropic:
        self.users.add(USERS[key])
        return anthropic.Anthropic(base_url=self.stack.base_url, api_key=key, max_retries=0,
                                   default_headers=self.headers())

    def post(self, key: str, body: dict | bytes, path: str = CHAT, **headers: str) -> httpx.Response:
        self.users.add(USERS[key])
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        return httpx.post(f"{self.stack.base_url}{path}", content=content, timeout=30,
                          headers={"authorization": f"Bearer {key}", "content-type": "application/json",
                                   **self.headers(**headers)})

    def chat(self, **extra) -> dict:
        return {"model": "gpt-4o-mini", "max_tokens": 50, "messages": [{"role": "user", "content": self.question}],
                **extra}

    def books(self) -> list[dict]:
        """Balance the books for this run's users; returns the provider's ledger entries for the run."""
        _, ledger = books_and_ledger(self.stack.redis_url, self.stack.ports.fake,
                                     counters=[Counter("cache-books", {"user": u}) for u in sorted(self.users)],
                                     hook=("x-fake-run", self.id))
        return ledger


@pytest.fixture
def run(stack) -> Run:
    return Run(stack)


@pytest.fixture(scope="module")
def rds(stack):
    r = redis.Redis.from_url(stack.redis_url)
    yield r
    r.close()


def cache_keys(rds, team: str) -> list[bytes]:
    return sorted(rds.scan_iter(match=f"tollgate:cache:team={team}:*", count=1000))


def metric(stack, name: str, **labels: str) -> float:
    """The sum of a metric's samples whose labels include `labels`, from the ext_proc's /metrics."""
    text = httpx.get(f"http://127.0.0.1:{stack.ports.metrics[0]}/metrics", timeout=5).text
    total = 0.0
    for line in text.splitlines():
        m = re.match(rf"^{re.escape(name)}(?:\{{(.*)\}})? (\S+)$", line)
        if m is None:
            continue
        got = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1) or ""))
        if all(got.get(k) == v for k, v in labels.items()):
            total += float(m.group(2))
    return total


# ---- a repeated request is a hit: $0, the avoided cost recorded, the provider never called --------

def test_repeat_is_a_hit_at_zero_cost_with_avoided_cost(stack, run, attribution: JsonLog, rds):
    client = run.oai(A1)
    first = client.chat.completions.with_raw_response.create(**run.chat())
    assert first.headers["x-tollgate-cache"] == "miss"
    miss = attribution.get(first.headers["x-tollgate-request-id"])
    assert miss["cache"] == "miss" and miss["cost_nusd"] > 0

    second = client.chat.completions.with_raw_response.create(**run.chat())
    assert second.headers["x-tollgate-cache"] == "hit"
    assert second.headers["x-tollgate-cost-usd"] == "0"
    assert second.parse().model_dump() == first.parse().model_dump()  # the same answer, usage included
    hit = attribution.get(second.headers["x-tollgate-request-id"])
    assert hit["cache"] == "hit" and hit["end"] == "cache_hit" and hit["status"] == 200
    assert hit["cost_nusd"] == 0 and hit["input_tokens"] == 0 and hit["output_tokens"] == 0
    assert hit["avoided_cost_nusd"] == miss["cost_nusd"] and hit["cached_from"] == miss["request_id"]
    assert hit["avoided_usage"]["output_tokens"] == miss["output_tokens"]
    assert hit["budgets"] == ["cache-books"] and hit["settlement"] == "settled"  # its lease settled at $0
    assert second.headers["x-tollgate-cache-avoided-usd"] == f"{miss['cost_nusd'] / 1e9:.9f}".rstrip("0")

    ledger = run.books()
    assert len(ledger) == 1  # the provider answered once
    # Reports and /metrics see the avoided cost by team and model.
    assert metric(stack, "tollgate_cache_avoided_usd_total", team="cache-a") >= hit["avoided_cost_usd"]


def test_another_team_misses_the_same_team_hits(stack, run, attribution):
    body = run.chat()
    r1 = run.post(A1, body)
    assert r1.status_code == 200 and r1.headers["x-tollgate-cache"] == "miss"
    other_team = run.post(B, body)
    assert other_team.status_code == 200 and other_team.headers["x-tollgate-cache"] == "miss"
    same_team = run.post(A2, body)
    assert same_team.headers["x-tollgate-cache"] == "hit" and same_team.content == r1.content
    assert run.post(B, body).headers["x-tollgate-cache"] == "hit"  # team B got its own entry
    assert len(run.books()) == 2


def test_key_ignores_order_whitespace_and_integral_floats(run):
    a = b'{"model":"gpt-4o-mini","max_tokens":50,"temperature":0,"messages":[{"role":"user","content":"%s"}]}'
    b = (b'{ "messages" : [ { "content" : "%s", "role" : "user" } ],\n  "temperature": 0.0,'
         b' "max_tokens": 50, "model": "gpt-4o-mini", "user": "someone-else" }')
    q = run.question.encode()
    r1 = run.post(A1, a % q)
    r2 = run.post(A1, b % q)
    assert r1.headers["x-tollgate-cache"] == "miss" and r2.headers["x-tollgate-cache"] == "hit"
    assert r2.content == r1.content
    run.books()


# ---- identity, access and budgets come first ------------------------------------------------------

def test_blocked_identity_stays_blocked_when_the_answer_is_cached(stack, run, attribution):
    body = run.chat()
    assert run.post(A1, body).headers["x-tollgate-cache"] == "miss"
    assert run.post(A2, body).headers["x-tollgate-cache"] == "hit"  # cached for team cache-a

    blocked = run.post("key-cache-blocked", body)  # same team, no budget left
    assert blocked.status_code == 429, blocked.text
    assert blocked.json()["error"]["code"] == "budget_exceeded"
    assert blocked.headers["x-tollgate-cache"] == "off"
    intern = run.post("key-cache-intern", {**body, "model": "gpt-4o"})  # not allowed that model
    assert intern.status_code == 403 and intern.json()["error"]["code"] == "model_not_allowed"
    anon = httpx.post(f"{stack.base_url}{CHAT}", json=body, headers=run.headers())
    assert anon.status_code == 401
    rec = attribution.get(blocked.headers["x-tollgate-request-id"])
    assert rec["decision"] == "blocked" and rec["cost_nusd"] == 0
    run.books()


# ---- streams ----------------------------------------------------------------------------------------

def test_openai_stream_replays_through_the_sdk_with_text_and_usage(run, attribution):
    client = run.oai(A1)

    def once() -> tuple[str, object, str]:
        with client.chat.completions.with_streaming_response.create(
                **run.chat(), stream=True, stream_options={"include_usage": True}) as resp:
            text, usage = "", None
            for chunk in resp.parse():
                if chunk.choices and chunk.choices[0].delta.content:
                    text += chunk.choices[0].delta.content
                if chunk.usage is not None:
                    usage = chunk.usage
            return text, usage, resp.headers["x-tollgate-cache"], resp.headers["x-tollgate-request-id"]

    text1, usage1, c1, _ = once()
    text2, usage2, c2, rid = once()
    assert (c1, c2) == ("miss", "hit")
    assert text2 == text1 and text1 and usage2 == usage1 and usage1.completion_tokens > 0
    rec = attribution.get(rid)
    assert rec["stream"] is True and rec["cache"] == "hit" and rec["cost_nusd"] == 0 and rec["avoided_cost_nusd"] > 0
    assert len(run.books()) == 1


def test_anthropic_stream_replays_through_the_sdk_with_text_and_usage(run, attribution):
    client = run.claude(A1)

    def once():
        with client.messages.stream(model="claude-haiku-4-5", max_tokens=60,
                                    messages=[{"role": "user", "content": run.question}]) as s:
            text = "".join(s.text_stream)
            final = s.get_final_message()
            return text, final, s.response.headers["x-tollgate-cache"]

    text1, final1, c1 = once()
    text2, final2, c2 = once()
    assert (c1, c2) == ("miss", "hit")
    assert text2 == text1 and text1
    assert final2.usage == final1.usage and final1.usage.output_tokens > 0
    # the non-streamed form of the same question is its own entry (its framing is part of the key)
    json_first = client.messages.with_raw_response.create(model="claude-haiku-4-5", max_tokens=60,
                                                          messages=[{"role": "user", "content": run.question}])
    assert json_first.headers["x-tollgate-cache"] == "miss"
    assert len(run.books()) == 2


def _drain(resp_ctx) -> str:
    """Read a stream to its end (or its reset); returns its request id."""
    rid = ""
    try:
        with resp_ctx as r:
            rid = r.headers.get("x-tollgate-request-id", "")
            for _ in r.iter_bytes():
                pass
    except httpx.HTTPError:
        pass  # the cut streams end with a reset
    return rid


def test_incomplete_failed_and_capped_answers_are_never_cached(run, attribution):
    body = run.chat(stream=True)
    url, auth = f"{run.stack.base_url}{CHAT}", {"authorization": f"Bearer {A1}"}
    run.users.add(USERS[A1])
    # The provider drops the stream after 3 tokens: incomplete.
    cut = _drain(httpx.stream("POST", url, json=body, headers={**auth, **run.headers(
        **{"x-fake-cut-after": "3", "x-fake-token-latency-ms": "20"})}))
    # The provider ignores the output cap: the live cap ends the stream at the reservation.
    capped = run.chat(stream=True, max_tokens=5)
    capped_id = _drain(httpx.stream("POST", url, json=capped, headers={**auth, **run.headers(
        **{"x-fake-ignore-max-tokens": "1", "x-fake-output-tokens": "400"})}))
    # The provider fails.
    failed = run.post(A1, run.chat(), **{"x-fake-status": "500"})
    assert failed.status_code == 500 and failed.headers["x-tollgate-cache"] == "miss"
    # None of the three was written: the same requests, answered normally now, are misses.
    for b in (body, capped):
        r = run.post(A1, b)
        assert r.status_code == 200 and r.headers["x-tollgate-cache"] == "miss"
    assert run.post(A1, run.chat()).headers["x-tollgate-cache"] == "miss"
    assert run.post(A1, run.chat()).headers["x-tollgate-cache"] == "hit"
    assert cut and attribution.get(cut)["complete"] is False
    assert attribution.get(capped_id)["end"] == "budget_cap"  # cut by the live cap
    run.books()


def test_too_large_answers_are_served_not_cached(stack, run):
    before = metric(stack, "tollgate_cache_writes_total", outcome="too_large")
    body = run.chat(max_tokens=12000)
    big = run.post(A1, body, **{"x-fake-output-tokens": "9000"})
    assert big.status_code == 200 and len(big.content) > 40000  # the rule's max_entry_bytes
    assert big.headers["x-tollgate-cache"] == "miss"
    assert run.post(A1, body, **{"x-fake-output-tokens": "9000"}).headers["x-tollgate-cache"] == "miss"
    assert metric(stack, "tollgate_cache_writes_total", outcome="too_large") == before + 2
    run.books()


def test_skip_header_neither_reads_nor_writes(run):
    body = run.chat()
    skipped = run.post(A1, body, **{"x-tollgate-cache": "skip"})
    assert skipped.status_code == 200 and skipped.headers["x-tollgate-cache"] == "skip"
    assert run.post(A1, body).headers["x-tollgate-cache"] == "miss"  # skip wrote nothing
    assert run.post(A1, body).headers["x-tollgate-cache"] == "hit"
    again = run.post(A1, body, **{"x-tollgate-cache": "skip"})  # and read nothing
    assert again.headers["x-tollgate-cache"] == "skip"
    assert len(run.books()) == 3


def test_uncachable_conditions_and_carve_outs(run):
    hot = run.chat(temperature=0.7)
    assert run.post(A1, hot).headers["x-tollgate-cache"] == "skip"  # non-zero temperature, no seed
    assert run.post(A1, hot).headers["x-tollgate-cache"] == "skip"
    seeded = run.chat(temperature=0.7, seed=7)
    assert run.post(A1, seeded).headers["x-tollgate-cache"] == "miss"
    assert run.post(A1, seeded).headers["x-tollgate-cache"] == "hit"
    nano = run.chat(model="gpt-4.1-nano")  # `enabled: false` for cache-a
    assert run.post(A1, nano).headers["x-tollgate-cache"] == "off"
    assert run.post(A1, nano).headers["x-tollgate-cache"] == "off"
    assert run.post(B, nano).headers["x-tollgate-cache"] == "miss"  # the carve-out is cache-a's only
    bad = run.post(A1, run.chat(), **{"x-tollgate-cache-ttl": "soon"})
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_cache_header"
    assert len(run.books()) == 6


# ---- per-request TTL and custom keys ----------------------------------------------------------------

def test_ttl_header_expires_the_entry_and_is_capped(run, rds):
    body = run.chat()
    first = run.post(A1, body, **{"x-tollgate-cache-ttl": "1"})
    assert first.headers["x-tollgate-cache"] == "miss"
    (key,) = [k for k in cache_keys(rds, "cache-a")
              if Entry.decode(rds.get(k)) and Entry.decode(rds.get(k)).request_id == first.headers["x-tollgate-request-id"]]
    assert 0 < rds.pttl(key) <= 1000
    deadline = time.monotonic() + 10
    while rds.exists(key) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not rds.exists(key)
    again = run.post(A1, body, **{"x-tollgate-cache-ttl": "99999"})  # above max_ttl_seconds: capped at it
    assert again.headers["x-tollgate-cache"] == "miss"
    assert 600_000 < rds.pttl(key) <= 3_600_000
    assert run.post(A1, body).headers["x-tollgate-cache"] == "hit"
    assert len(run.books()) == 2


def test_custom_key_stands_for_the_body_inside_the_team(run):
    k = {"x-tollgate-cache-key": f"faq-{run.id}"}
    first = run.post(A1, run.chat(), **k)
    assert first.headers["x-tollgate-cache"] == "miss"
    other_question = run.chat(messages=[{"role": "user", "content": "something else entirely"}])
    same_key = run.post(A2, other_question, **k)
    assert same_key.headers["x-tollgate-cache"] == "hit" and same_key.content == first.content
    assert run.post(B, run.chat(), **k).headers["x-tollgate-cache"] == "miss"  # another team: its own
    assert run.post(A1, run.chat(model="gpt-4o"), **k).headers["x-tollgate-cache"] == "miss"  # another model
    assert run.post(A1, run.chat()).headers["x-tollgate-cache"] == "miss"  # no key: the body's own entry
    assert len(run.books()) == 4


# ---- two identical misses at once ---------------------------------------------------------------------

def test_concurrent_identical_misses_write_one_complete_entry(stack, run, rds):
    n = 6
    stored0 = metric(stack, "tollgate_cache_writes_total", outcome="stored")
    exists0 = metric(stack, "tollgate_cache_writes_total", outcome="exists")
    body = run.chat()
    barrier = threading.Barrier(n)
    results: list[httpx.Response] = []
    lock = threading.Lock()

    def go() -> None:
        barrier.wait()
        r = run.post(A1, body, **{"x-fake-token-latency-ms": "25"})  # a slow provider: they overlap
        with lock:
            results.append(r)

    threads = [threading.Thread(target=go) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(r.status_code == 200 for r in results)
    misses = [r for r in results if r.headers["x-tollgate-cache"] == "miss"]
    assert len(misses) + sum(r.headers["x-tollgate-cache"] == "hit" for r in results) == n
    assert len(misses) >= 2, "the requests did not overlap"
    ids = {r.headers["x-tollgate-request-id"]: r for r in misses}
    mine = [e for k in cache_keys(rds, "cache-a") if (e := Entry.decode(rds.get(k))) and e.request_id in ids]
    assert len(mine) == 1  # one entry, written whole by the first to finish
    (entry,) = mine
    assert entry.body == ids[entry.request_id].content and json.loads(entry.body)["usage"]["completion_tokens"] > 0
    assert metric(stack, "tollgate_cache_writes_total", outcome="stored") == stored0 + 1
    assert metric(stack, "tollgate_cache_writes_total", outcome="exists") == exists0 + len(misses) - 1
    hit = run.post(A1, body)
    assert hit.headers["x-tollgate-cache"] == "hit" and hit.content == entry.body
    assert len(run.books()) == len(misses)


def test_hits_whose_clients_leave_at_once_are_settled_at_zero(stack, run, attribution):
    """A hit is answered before its $0 settle's round trip, which the stream then waits for: clients
    that send a cached request and close their socket at once (before the answer, or as it
    arrives) leave no lease, the counter equals the records, and every hit that was recorded
    was settled at $0."""
    first = run.post(A1, run.chat())
    assert first.headers["x-tollgate-cache"] == "miss"
    body = json.dumps(run.chat()).encode()
    host, port = stack.base_url.removeprefix("http://").split(":")
    head = (f"POST {CHAT} HTTP/1.1\r\nhost: {host}\r\nauthorization: Bearer {A1}\r\n"
            f"content-type: application/json\r\ncontent-length: {len(body)}\r\nx-fake-run: {run.id}\r\n\r\n").encode()

    def leave(wait_s: float) -> None:
        with socket.create_connection((host, int(port)), timeout=5) as s:
            s.sendall(head + body)
            if wait_s:
                time.sleep(wait_s)  # mid-admission, or just as the answer comes
    threads = [threading.Thread(target=leave, args=(d,)) for d in (0, 0, 0.001, 0.002, 0.005, 0.01) * 4]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert run.post(A1, run.chat()).headers["x-tollgate-cache"] == "hit"  # the stack still answers
    ledger = run.books()  # no lease left, cache-books == the records
    assert len(ledger) == 1  # only the miss reached the provider
    r = redis.Redis.from_url(stack.redis_url)
    try:
        served_from = first.headers["x-tollgate-request-id"]
        hits = [rec for rec in final_records(r).values()
                if rec.get("cache") == "hit" and rec.get("cached_from") == served_from]
    finally:
        r.close()
    assert len(hits) > 1 and all(h["cost_nusd"] == 0 and h["settlement"] == "settled" for h in hits), hits
