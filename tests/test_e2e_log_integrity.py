"""Logs that tell the truth (issue 15, item 6), through Envoy: the request id in Envoy's access
log, the attribution record and the provider's request is one Envoy generated, never a client's;
a client's own x-request-id is kept in its own field; the logged path is the one Envoy routed."""

from __future__ import annotations

import uuid

import httpx

from tests.accounting import fake_ledger
from tests.conftest import JsonLog

CHAT = "/v1/chat/completions"
BODY = {"model": "gpt-4o-mini", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}


def _forged() -> dict[str, str]:
    return {"x-request-id": f"forged-{uuid.uuid4().hex}", "x-envoy-original-path": "/v1/forged/path"}


def test_served_request_logs_envoys_id_and_the_routed_path(stack, attribution: JsonLog) -> None:
    forged = _forged()
    r = httpx.post(stack.base_url + CHAT, json=BODY, headers={"authorization": "Bearer key-ic", **forged}, timeout=10)
    assert r.status_code == 200, r.text
    rid = r.headers["x-tollgate-request-id"]
    line = JsonLog(stack.access_log).get(rid)
    rec = attribution.get(rid)
    envoy_id = line["envoy_request_id"]
    assert envoy_id and envoy_id != forged["x-request-id"] and rec["envoy_request_id"] == envoy_id
    assert line["client_request_id"] == rec["client_request_id"] == forged["x-request-id"]
    assert line["path"] == CHAT and line["upstream_path"] == CHAT, line
    # The provider was handed Envoy's id, not the client's.
    assert len(fake_ledger(stack.ports.fake, request_id=envoy_id)) == 1
    assert fake_ledger(stack.ports.fake, request_id=forged["x-request-id"]) == []


def test_refused_request_logs_envoys_id_and_the_path_asked(stack) -> None:
    """Refused before routing (no credential): nothing rewrote the path, so a forged
    x-envoy-original-path would have been logged as the path."""
    forged = _forged()
    r = httpx.post(stack.base_url + CHAT, json=BODY, headers=forged, timeout=10)
    assert r.status_code == 401
    line = JsonLog(stack.access_log).get(r.headers["x-tollgate-request-id"])
    assert line["envoy_request_id"] not in ("", "-", forged["x-request-id"]), line
    assert line["client_request_id"] == forged["x-request-id"]
    assert line["path"] == CHAT, line


def test_no_client_request_id_logs_none(stack) -> None:
    r = httpx.post(stack.base_url + CHAT, json=BODY, headers={"authorization": "Bearer key-ic"}, timeout=10)
    line = JsonLog(stack.access_log).get(r.headers["x-tollgate-request-id"])
    assert line["client_request_id"] in (None, "-"), line
    assert line["envoy_request_id"] not in ("", "-", None)
