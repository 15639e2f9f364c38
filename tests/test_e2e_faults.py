"""Failures Envoy answers itself still reach clients as JSON in the provider's error shape."""

from __future__ import annotations

import httpx
import pytest

from extproc.stack import Stack
from tests.conftest import running_stack

CHAT = b'{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}]}'
MESSAGES = b'{"model":"claude-haiku-4-5","max_tokens":5,"messages":[{"role":"user","content":"hi"}]}'
HEADERS = {"authorization": "Bearer demo", "content-type": "application/json"}


@pytest.fixture(scope="module")
def fault_stack(policy_dir, idp, tmp_path_factory):
    """Its own stack: these tests kill its processes."""
    with running_stack(policy_dir, idp, tmp_path_factory.mktemp("faults")) as s:
        yield s


def _proc(s: Stack, name: str):
    return next(p for p in s.procs if p.name == name)


def test_own_errors_are_not_rewritten(fault_stack):
    r = httpx.post(f"{fault_stack.base_url}/v1/chat/completions", content=b"{", headers=HEADERS)
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"


def test_provider_unreachable_is_json_503_and_costs_nothing(fault_stack):
    _proc(fault_stack, "fake-provider").stop()
    r = httpx.post(f"{fault_stack.base_url}/v1/chat/completions", content=CHAT, headers=HEADERS)
    assert r.status_code == 503 and r.headers["content-type"] == "application/json"
    err = r.json()["error"]
    assert err["type"] == "api_error" and "upstream connect error" in err["message"]
    r = httpx.post(f"{fault_stack.base_url}/v1/messages", content=MESSAGES, headers=HEADERS)
    assert r.status_code == 503
    body = r.json()
    assert body["type"] == "error" and body["error"]["type"] == "api_error"


def test_extproc_down_is_json_500(fault_stack):
    _proc(fault_stack, "extproc-0").stop()
    r = httpx.post(f"{fault_stack.base_url}/v1/chat/completions", content=CHAT, headers=HEADERS)
    assert r.status_code == 500 and r.headers["content-type"] == "application/json"
    assert "ext_proc" in r.json()["error"]["message"]
    r = httpx.post(f"{fault_stack.base_url}/v1/messages", content=MESSAGES, headers=HEADERS)
    assert r.status_code == 500 and r.json()["type"] == "error"
