"""Provider keys: a provider without a gateway key receives the client's own key, but only when
that header was not the client's Tollgate credential."""

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
prices:
  models:
    passthrough-model: {input: 1, output: 2}
"""


@pytest.fixture(scope="module")
def pt_stack(policy_dir, idp, tmp_path_factory):
    pdir = tmp_path_factory.mktemp("pt-policies")
    for f in policy_dir.glob("*.yaml"):
        shutil.copy(f, pdir / f.name)
    (pdir / "zz-passthrough.yaml").write_text(PASSTHROUGH)
    providers = (pdir / "providers.yaml").read_text()  # first matching route wins: put ours first
    (pdir / "providers.yaml").write_text(providers.replace(
        "routes:\n", "routes:\n  - models: [passthrough-*]\n    provider: fake-passthrough\n", 1))
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
