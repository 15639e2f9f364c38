"""Issue 15, item 3 through the real stack: a signing key withdrawn from the IdP's JWKS revokes
the tokens it signed, including ones the gateway has already verified and cached, within one
JWKS refresh, however far away their exp is.

This module runs its own IdP (so withdrawing a key can't disturb other tests) and its own stack
whose policy refreshes the JWKS every couple of seconds instead of hourly.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from extproc.stack import Stack
from tests.conftest import running_stack
from tests.e2e_idp import TestIdP

JWT_HEADER = "cf-access-jwt-assertion"
JWKS_CACHE_S = 2.0  # the test issuer's jwks_cache_seconds in this module's policy
KID = "rsa-withdrawn"
TEN_YEARS = 10 * 365 * 86400


@pytest.fixture(scope="module")
def own_idp() -> Iterator[TestIdP]:
    server = TestIdP()
    server.add_key(KID, "RS256")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def revocation_stack(policy_dir: Path, own_idp: TestIdP, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    pol = tmp_path_factory.mktemp("revocation-policies")
    for f in policy_dir.glob("*.yaml"):
        shutil.copy(f, pol / f.name)
    doc = yaml.safe_load((pol / "test-identity.yaml").read_text())
    issuer = next(j for j in doc["identity"]["jwt"] if j["name"] == "test-idp")
    issuer["jwks_cache_seconds"] = JWKS_CACHE_S
    issuer["jwks_refresh_floor_seconds"] = 0
    # token_cache_seconds stays at its default (300 s): the revocation must come from the key
    # binding, not from the cache's maximum lifetime.
    issuer.pop("token_cache_seconds", None)
    (pol / "test-identity.yaml").write_text(yaml.safe_dump(doc))
    with running_stack(pol, own_idp, tmp_path_factory.mktemp("revocation-stack")) as s:
        yield s


def _post(stack: Stack, token: str) -> httpx.Response:
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
    return httpx.post(f"{stack.base_url}/v1/chat/completions", content=json.dumps(body).encode(),
                      headers={"content-type": "application/json", JWT_HEADER: token}, timeout=10)


def test_a_key_dropped_from_the_jwks_revokes_its_cached_tokens_within_one_refresh(revocation_stack, own_idp):
    idp = own_idp
    token = idp.token({"sub": "soon-revoked"}, kid=KID, ttl=TEN_YEARS)
    other = idp.token({"sub": "still-trusted"}, kid="rsa-1", ttl=TEN_YEARS)

    # Verified once, then served from the verified-token cache.
    for t in (token, other, token):
        r = _post(revocation_stack, t)
        assert r.status_code == 200, r.text

    idp.published.remove(KID)  # the IdP withdraws the key
    dropped_at = idp.fetches
    time.sleep(JWKS_CACHE_S + 0.3)  # the gateway's copy of the JWKS is now stale

    # The first request now finds the JWKS stale and starts a refresh; it and any request before
    # the refreshed key set is installed are still served from the old keys. The refresh fetches
    # a JWKS without the key, and from then on the cached token must be refused.
    deadline = time.monotonic() + 5
    while True:
        refreshes = idp.fetches - dropped_at  # JWKS fetches that came before this request
        r = _post(revocation_stack, token)
        if r.status_code != 200 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert r.status_code == 401, (
        f"token of a withdrawn key still served ({r.status_code}) after {refreshes} JWKS refresh(es)")
    err = r.json()["error"]
    assert err["code"] == "unknown_kid", err
    assert refreshes == 1, f"revoked only after {refreshes} JWKS refreshes"
    assert token not in r.text

    # Only that key's tokens are refused: another key's cached token still passes.
    r = _post(revocation_stack, other)
    assert r.status_code == 200, r.text
