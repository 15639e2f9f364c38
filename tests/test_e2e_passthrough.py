"""Provider keys: a provider without a gateway key receives the client's own key only when the
policy says `pass_client_key: true`, and never a Tollgate credential (the caller's own, or
another identity's sent alongside); a provider whose key reads nothing answers 503 when the
policy lets the gateway start without it (issue 15, items 2 and 4)."""

from __future__ import annotations

import shutil

import httpx
import pytest

from tests.conftest import running_stack

PASSTHROUGH = """
providers:
  fake-passthrough:            # the same fake provider, but the client's key goes through
    url: "http://127.0.0.1:${TOLLGATE_FAKE_PORT}/v1"
    wires: [openai, anthropic]
    pass_client_key: true
  fake-keyless:                # no gateway key, and no client key either
    url: "http://127.0.0.1:${TOLLGATE_FAKE_PORT}/v1"
    wires: [openai, anthropic]
  fake-unkeyed:                # its key source reads nothing; allowed to start
    url: "http://127.0.0.1:${TOLLGATE_FAKE_PORT}/v1"
    key: {env: TOLLGATE_TEST_UNSET_KEY}
    key_missing: refuse
prices:
  models:
    passthrough-model: {input: 1, output: 2}
    keyless-model: {input: 1, output: 2}
    unkeyed-model: {input: 1, output: 2}
"""


@pytest.fixture(scope="module")
def pt_stack(policy_dir, idp, tmp_path_factory):
    pdir = tmp_path_factory.mktemp("pt-policies")
    for f in policy_dir.glob("*.yaml"):
        shutil.copy(f, pdir / f.name)
    (pdir / "zz-passthrough.yaml").write_text(PASSTHROUGH)
    providers = (pdir / "providers.yaml").read_text()  # first matching route wins: put ours first
    (pdir / "providers.yaml").write_text(providers.replace(
        "routes:\n", "routes:\n  - models: [passthrough-*]\n    provider: fake-passthrough\n"
        "  - models: [keyless-*]\n    provider: fake-keyless\n"
        "  - models: [unkeyed-*]\n    provider: fake-unkeyed\n", 1))
    with running_stack(pdir, idp, tmp_path_factory.mktemp("pt-stack")) as s:
        yield s


BODY = b'{"model": "passthrough-model", "messages": [{"role": "user", "content": "hi"}]}'


def test_jwt_caller_keeps_its_own_provider_key(pt_stack, idp):
    r = httpx.post(f"{pt_stack.base_url}/v1/chat/completions", content=BODY, headers={
        "content-type": "application/json", "cf-access-jwt-assertion": idp.token(),
        "authorization": "Bearer sk-client-own-key"})
    assert r.status_code == 200, r.text
    assert r.headers["x-fake-authorization"] == "Bearer sk-client-own-key"
    assert "cf-access-jwt-assertion" not in r.headers["x-fake-header-names"].split(",")


def test_api_key_caller_never_leaks_its_tollgate_key(pt_stack):
    r = httpx.post(f"{pt_stack.base_url}/v1/chat/completions", content=BODY, headers={
        "content-type": "application/json", "authorization": "Bearer key-ic"})
    assert r.status_code == 200, r.text
    assert r.headers["x-fake-authorization"] == ""


def test_gateway_key_still_replaces_the_clients(pt_stack, idp):
    r = httpx.post(f"{pt_stack.base_url}/v1/chat/completions", headers={
        "content-type": "application/json", "cf-access-jwt-assertion": idp.token(),
        "authorization": "Bearer sk-client-own-key"},
        content=BODY.replace(b"passthrough-model", b"gpt-4o-mini"))
    assert r.status_code == 200, r.text
    assert r.headers["x-fake-authorization"].startswith("Bearer sk-gateway")


def test_another_identitys_tollgate_key_never_passes_through(pt_stack, idp):
    r = httpx.post(f"{pt_stack.base_url}/v1/chat/completions", content=BODY, headers={
        "content-type": "application/json", "cf-access-jwt-assertion": idp.token(),
        "authorization": "Bearer key-ic", "x-api-key": "key-senior"})
    assert r.status_code == 200, r.text
    assert r.headers["x-fake-authorization"] == "" and r.headers["x-fake-api-key"] == ""


def test_keyless_provider_gets_no_client_key_without_pass_client_key(pt_stack, idp):
    r = httpx.post(f"{pt_stack.base_url}/v1/chat/completions", headers={
        "content-type": "application/json", "cf-access-jwt-assertion": idp.token(),
        "authorization": "Bearer sk-client-own-key", "x-api-key": "sk-other"},
        content=BODY.replace(b"passthrough-model", b"keyless-model"))
    assert r.status_code == 200, r.text
    assert r.headers["x-fake-authorization"] == "" and r.headers["x-fake-api-key"] == ""


def test_provider_whose_key_reads_nothing_answers_503(pt_stack):
    r = httpx.post(f"{pt_stack.base_url}/v1/chat/completions", headers={
        "content-type": "application/json", "authorization": "Bearer key-ic"},
        content=BODY.replace(b"passthrough-model", b"unkeyed-model"))
    assert r.status_code == 503 and r.json()["error"]["code"] == "provider_key_missing", r.text


def test_look_alike_identity_headers_never_reach_the_provider(pt_stack):
    r = httpx.post(f"{pt_stack.base_url}/v1/chat/completions", content=BODY, headers={
        "content-type": "application/json", "authorization": "Bearer key-ic", "x-forwarded-user": "admin",
        "x-forwarded-email": "ceo@example.com", "x-auth-request-user": "admin", "x_tollgate_user": "admin",
        "x-remote-user": "admin"})
    assert r.status_code == 200, r.text
    sent = set(r.headers["x-fake-header-names"].split(","))
    assert not sent & {"x-forwarded-user", "x-forwarded-email", "x-auth-request-user", "x_tollgate_user",
                       "x-tollgate-user", "x-remote-user"}, sent
