"""Issue 15, item 3: withdrawing a signing key revokes the tokens it verified.

A verified-token cache entry is bound to the JWKS key that verified it (kid + RFC 7638
thumbprint); a hit counts only while the issuer's current key set still holds that key, and no
entry outlives `token_cache_seconds`. The clock is injected, the JWKS is served over loopback.
"""

from __future__ import annotations

import asyncio

import pytest
from pydantic import ValidationError

from extproc.identity import AuthError, Authenticator
from extproc.identity.jwks import KeyRef, KeySet, jwk_thumbprint
from extproc.identity.policy import JwtIssuerConfig

from identity_helpers import NOW, Clock, JwksServer, Key, issuer_cfg, mint

H = "cf-access-jwt-assertion"
TEN_YEARS = int(NOW) + 10 * 365 * 86400
CACHE_S = 60  # jwks_cache_seconds in these tests


async def _refused(auth: Authenticator, token: str, check: str) -> AuthError:
    with pytest.raises(AuthError) as ei:
        await auth.authenticate({H: token})
    assert ei.value.check == check and ei.value.status == 401, ei.value
    return ei.value


async def _wait_for_new_keyset(auth: Authenticator, old: KeySet | None) -> None:
    """Let the background JWKS refresh a request started finish installing its key set."""
    source = auth._issuers[0].source
    for _ in range(200):
        if source.keyset is not old:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the JWKS refresh did not install a new key set")


def _stats(auth: Authenticator) -> tuple[int, int]:
    s = auth.stats()
    return s["jwt_verified"], s["jwt_cache_hits"]


@pytest.fixture
def make(make_auth, jwks_server):
    def build(**over) -> Authenticator:
        over.setdefault("jwks_cache_seconds", CACHE_S)
        over.setdefault("jwks_refresh_floor_seconds", CACHE_S)
        return make_auth({"jwt": [issuer_cfg(jwks_server.url, **over)]})

    return build


async def test_key_dropped_from_jwks_revokes_its_cached_tokens_at_the_next_refresh(
    make, jwks_server: JwksServer, rsa1: Key, rsa2: Key, clock: Clock
):
    jwks_server.serve(rsa1, rsa2)
    auth = make()
    doomed = mint(rsa2, sub="rsa2-user", exp=TEN_YEARS)
    kept = mint(rsa1, sub="rsa1-user", exp=TEN_YEARS)
    assert (await auth.authenticate({H: doomed})).user == "rsa2-user"
    assert (await auth.authenticate({H: kept})).user == "rsa1-user"
    assert (await auth.authenticate({H: doomed})).user == "rsa2-user"
    assert _stats(auth) == (2, 1)  # the third request was a cache hit

    jwks_server.serve(rsa1)  # the IdP withdraws rsa-2
    clock.advance(CACHE_S / 2)
    # Not refreshed yet: the gateway can't know, the token is still served from the cache.
    assert (await auth.authenticate({H: doomed})).user == "rsa2-user"
    assert jwks_server.fetches == 1

    clock.advance(CACHE_S / 2 + 1)
    old = auth._issuers[0].source.keyset
    # The JWKS is stale: this cache hit starts the refresh and is served from the old keys
    # meanwhile (stale-while-revalidate), even though every request here is a cache hit.
    assert (await auth.authenticate({H: doomed})).user == "rsa2-user"
    await _wait_for_new_keyset(auth, old)
    assert jwks_server.fetches == 2

    verified, hits = _stats(auth)
    await _refused(auth, doomed, "unknown_kid")  # the first request after the refresh
    assert auth.stats()["jwt_verified"] == verified  # refused in full verification, before the signature
    await _refused(auth, doomed, "unknown_kid")  # and stays refused
    # The other key's cached tokens are untouched: still hits, no re-verification.
    assert (await auth.authenticate({H: kept})).user == "rsa1-user"
    assert _stats(auth) == (verified, hits + 1)


async def test_kid_republished_with_other_material_revokes_its_cached_tokens(
    make, jwks_server: JwksServer, rsa1: Key, rsa2: Key, clock: Clock
):
    """The binding is to the key, not the kid: same kid, new material = the old key is gone."""
    auth = make()
    token = mint(rsa1, exp=TEN_YEARS)
    assert (await auth.authenticate({H: token})).user == "user-42"
    jwks_server.keys = [{**rsa2.jwk, "kid": rsa1.kid, "alg": "RS256"}]
    clock.advance(CACHE_S + 1)
    old = auth._issuers[0].source.keyset
    await auth.authenticate({H: token})  # starts the refresh
    await _wait_for_new_keyset(auth, old)
    await _refused(auth, token, "signature")


async def test_unchanged_jwks_refresh_keeps_cached_tokens(make, jwks_server, rsa1, clock):
    """A refresh that returns the same keys (a new KeySet object) does not flush the cache."""
    auth = make()
    token = mint(rsa1, exp=TEN_YEARS)
    await auth.authenticate({H: token})
    clock.advance(CACHE_S + 1)
    old = auth._issuers[0].source.keyset
    await auth.authenticate({H: token})
    await _wait_for_new_keyset(auth, old)
    await auth.authenticate({H: token})
    assert _stats(auth) == (1, 2)


async def test_jwks_outage_keeps_cached_tokens_of_known_keys(make, jwks_server, rsa1, clock):
    """An IdP that can't be reached withdraws nothing: the last good key set stays in force."""
    auth = make()
    token = mint(rsa1, exp=TEN_YEARS)
    await auth.authenticate({H: token})
    jwks_server.status = 500
    clock.advance(CACHE_S + 1)
    await auth.authenticate({H: token})  # starts a refresh that fails
    for _ in range(200):
        if jwks_server.fetches == 2 and auth._issuers[0].source._inflight.done():
            break
        await asyncio.sleep(0.01)
    assert jwks_server.fetches == 2
    assert (await auth.authenticate({H: token})).user == "user-42"
    assert _stats(auth) == (1, 2)


async def test_cache_entry_lives_at_most_token_cache_seconds(make, rsa1, clock):
    auth = make(token_cache_seconds=10)
    token = mint(rsa1, exp=TEN_YEARS)
    await auth.authenticate({H: token})
    clock.advance(9)
    await auth.authenticate({H: token})
    assert _stats(auth) == (1, 1)
    clock.advance(2)  # 11 s after verification: verified again, then cached again
    await auth.authenticate({H: token})
    assert _stats(auth) == (2, 1)
    await auth.authenticate({H: token})
    assert _stats(auth) == (2, 2)


async def test_cache_lifetime_never_exceeds_exp(make, rsa1, clock):
    auth = make(token_cache_seconds=3600)
    token = mint(rsa1, exp=int(NOW) + 100)
    await auth.authenticate({H: token})
    clock.advance(131)  # past exp + leeway (30 s)
    await _refused(auth, token, "expired")


async def test_token_cache_seconds_zero_disables_the_cache(make, rsa1):
    auth = make(token_cache_seconds=0)
    token = mint(rsa1, exp=TEN_YEARS)
    for _ in range(3):
        await auth.authenticate({H: token})
    assert _stats(auth) == (3, 0)
    assert auth.stats()["jwt_cache_size"] == 0


def test_token_cache_seconds_setting():
    base = issuer_cfg("https://idp.example/jwks")
    assert JwtIssuerConfig.model_validate(base).token_cache_seconds == 300
    assert JwtIssuerConfig.model_validate({**base, "token_cache_seconds": 30}).token_cache_seconds == 30
    with pytest.raises(ValidationError):
        JwtIssuerConfig.model_validate({**base, "token_cache_seconds": -1})


def test_jwk_thumbprint_matches_rfc_7638():
    # RFC 7638 section 3.1's example key and its thumbprint.
    jwk = {
        "kty": "RSA",
        "n": "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_BJECP"
        "ebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_FDW2QvzqY36"
        "8QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4vMQFh6WeZu0fM4lFd"
        "2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw",
        "e": "AQAB",
        "alg": "RS256",
        "kid": "2011-04-29",
    }
    assert jwk_thumbprint(jwk) == "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"
    ks = KeySet({"keys": [jwk]}, "test")
    assert ks.key_refs == {KeyRef("2011-04-29", "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs")}


def test_keyset_refs_cover_kidless_keys_and_ignore_dropped_ones(rsa1, rsa2, ec1):
    kidless = {k: v for k, v in ec1.jwk.items() if k != "kid"}
    hmac_key = {"kty": "oct", "k": "c2VjcmV0", "kid": "hs"}
    ks = KeySet({"keys": [rsa1.jwk, rsa2.jwk, kidless, hmac_key]}, "test")
    assert {r.kid for r in ks.key_refs} == {"rsa-1", "rsa-2", None}
    assert len({r.thumbprint for r in ks.key_refs}) == 3
