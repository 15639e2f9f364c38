"""Every way a request ends, with the ext_proc ending each gRPC stream itself (extproc/server.py).

The stream handler returns once it has answered the last message Envoy will send (the response
body's last chunk, response headers without a body, an ImmediateResponse) instead of reading on
until Envoy resets the stream, which left native memory behind per stream (grpc/grpc#43360;
tests/test_server_stream_end.py). Through the real stack: each kind of request is still answered,
settled and recorded, and Envoy counts every stream answered and none failed (that the status
itself now comes from the ext_proc is what tests/test_server_stream_end.py checks: Envoy's
counters read the same either way).
"""

from __future__ import annotations

import httpx

from tests.conftest import JsonLog, envoy_extproc_stats

CHAT = "/v1/chat/completions"
KEY = {"authorization": "Bearer demo"}


def _delta(before: dict[str, int], after: dict[str, int], name: str) -> int:
    return after.get(name, 0) - before.get(name, 0)


def test_requests_end_as_before_when_the_ext_proc_ends_its_streams(stack, attribution: JsonLog):
    base = stack.base_url
    before = envoy_extproc_stats(stack)
    ids = []
    with httpx.Client(timeout=30) as c:
        for i in range(3):  # JSON answers
            r = c.post(base + CHAT, headers=KEY, json={"model": "gpt-4o-mini", "max_tokens": 16,
                                                       "messages": [{"role": "user", "content": f"close {i}"}]})
            assert r.status_code == 200, r.text
            ids.append(r.headers["x-tollgate-request-id"])
        for i in range(2):  # SSE streams (STREAMED response body: a final empty end-of-stream message)
            with c.stream("POST", base + CHAT, headers=KEY, json={
                    "model": "gpt-4o-mini", "max_tokens": 16, "stream": True,
                    "messages": [{"role": "user", "content": f"stream {i}"}]}) as r:
                assert r.status_code == 200
                body = b"".join(r.iter_bytes())
            assert b"[DONE]" in body
            ids.append(r.headers["x-tollgate-request-id"])
        r = c.post(base + CHAT, headers={"authorization": "Bearer no-such-key"},  # refused at the headers
                   json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x"}]})
        assert r.status_code == 401
        r = c.post(base + CHAT, headers=KEY, content=b"{not json")  # refused at the body
        assert r.status_code == 400
        r = c.get(base + "/v1/models", headers=KEY)  # answered by the gateway at the headers
        assert r.status_code == 200
    for rid in ids:  # each was settled and recorded as usual
        rec = attribution.get(rid)
        assert rec["end"] == "completed" and rec["cost_nusd"] > 0, rec
    after = envoy_extproc_stats(stack)
    started = _delta(before, after, "http.tollgate.ext_proc.streams_started")
    assert started >= 8, (before, after)
    changed = {k: after.get(k, 0) - before.get(k, 0) for k in after if after.get(k, 0) != before.get(k, 0)}
    # Every stream answered with gRPC's 200 (Envoy still resets each stream's own half, which it
    # never closes, so http2.tx_reset counts every one, as before the change).
    assert _delta(before, after, "cluster.tollgate_extproc.upstream_rq_200") == started, changed
    assert _delta(before, after, "http.tollgate.ext_proc.streams_failed") == 0, changed
