"""JWT verification against a real JWKS served over loopback HTTP."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
from pathlib import Path

import jwt
import pytest
from cryptography.hazmat.primitives import serialization

from extproc.identity import AuthError, Identity

from identity_helpers import NOW, b64url, claims, issuer_cfg, mint, raw_token

H = "cf-access-jwt-assertion"


async def refused(auth, headers, check: str, *, status: int = 401, mentions: str | None = None) -> AuthError:
    with pytest.raises(AuthError) as ei:
        await auth.authenticate(headers)
    err = ei.value
    assert err.check == check, err
    assert err.status == status
    assert mentions is None or mentions in err.message, err.message
    # never echo the credential itself
    for v in headers.values():
        if len(v) > 20:
            assert v not in err.message and v.split(" ")[-1] not in err.message
    return err


@pytest.fixture
def auth(make_auth, jwks_server):
    return make_auth({"jwt": [issuer_cfg(jwks_server.url)]})


async def test_valid_token_maps_attributes(auth, rsa1):
    token = mint(rsa1)
    ident = await auth.authenticate({H: token})
    assert ident == Identity(
        user="user-42",
        email="ada@example.com",
        groups=("eng", "ics"),
        team="research",
        app=None,
        service_token=None,
        source="jwt:cloudflare-access",
        extra={"cost_center": "cc-7"},
    )
    assert ident.attrs() == {
        "user": "user-42",
        "email": "ada@example.com",
        "groups": ["eng", "ics"],
        "team": "research",
        "source": "jwt:cloudflare-access",
        "cost_center": "cc-7",
    }


async def test_string_group_is_a_one_element_list_and_namespaced_claims(make_auth, jwks_server, rsa1):
    cfg = issuer_cfg(jwks_server.url, claims={"groups": "https://example.com/groups", "app": "custom.app"})
    auth = make_auth({"jwt": [cfg]})
    token = mint(rsa1, **{"https://example.com/groups": "admins", "custom": {"app": "readme"}})
    ident = await auth.authenticate({H: token})
    assert ident.user == "user-42"  # user defaults to sub
    assert ident.groups == ("admins",)
    assert ident.app == "readme"
    assert ident.email is None


async def test_es256_and_eddsa(make_auth, jwks_server, ec1, ed1):
    jwks_server.serve(ec1, ed1)
    auth = make_auth({"jwt": [issuer_cfg(jwks_server.url)]})
    assert (await auth.authenticate({H: mint(ec1)})).user == "user-42"
    assert (await auth.authenticate({H: mint(ed1)})).user == "user-42"


async def test_rsa_key_without_alg_serves_ps256(make_auth, jwks_server, rsa2):
    jwks_server.serve(rsa2)
    auth = make_auth({"jwt": [issuer_cfg(jwks_server.url)]})
    assert (await auth.authenticate({H: mint(rsa2, alg="PS256")})).user == "user-42"
    assert (await auth.authenticate({H: mint(rsa2, alg="RS256", sub="b")})).user == "b"


async def test_expired(auth, rsa1, clock):
    await refused(auth, {H: mint(rsa1, exp=int(NOW) - 31)}, "expired", mentions="expired")
    # inside the leeway
    assert (await auth.authenticate({H: mint(rsa1, exp=int(NOW) - 29)})).user == "user-42"


async def test_exp_is_required(auth, rsa1):
    await refused(auth, {H: mint(rsa1, exp=None)}, "missing_claim", mentions="exp")


async def test_not_yet_valid(auth, rsa1):
    await refused(auth, {H: mint(rsa1, nbf=int(NOW) + 120)}, "not_yet_valid", mentions="nbf")
    await refused(auth, {H: mint(rsa1, iat=int(NOW) + 120)}, "not_yet_valid", mentions="iat")


async def test_wrong_issuer(auth, rsa1):
    await refused(auth, {H: mint(rsa1, iss="https://evil.example")}, "issuer", mentions="issuer")
    await refused(auth, {H: mint(rsa1, iss=None)}, "issuer", mentions="iss")


async def test_wrong_audience(auth, rsa1):
    await refused(auth, {H: mint(rsa1, aud="someone-else")}, "audience", mentions="audience")
    await refused(auth, {H: mint(rsa1, aud=None)}, "audience", mentions="aud")


async def test_bad_signature(auth, rsa1, rsa2):
    forged = mint(rsa2, kid=rsa1.kid)  # signed by another key, claims rsa1's kid
    await refused(auth, {H: forged}, "signature", mentions="signature")
    # tampered payload
    h, _, s = mint(rsa1).split(".")
    p = b64url(json.dumps(claims(sub="admin")).encode())
    await refused(auth, {H: f"{h}.{p}.{s}"}, "signature")


async def test_alg_none(auth, jwks_server):
    token = raw_token({"alg": "none", "typ": "JWT", "kid": "rsa-1"}, claims())
    await refused(auth, {H: token}, "algorithm", mentions="'none'")
    assert jwks_server.fetches == 0  # refused before any key lookup


async def test_hs256_signed_with_the_rsa_public_key(auth, rsa1, jwks_server):
    pem = rsa1.private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    header = b64url(json.dumps({"alg": "HS256", "typ": "JWT", "kid": "rsa-1"}).encode())
    payload = b64url(json.dumps(claims()).encode())
    sig = hmac.new(pem, f"{header}.{payload}".encode(), hashlib.sha256).digest()
    token = f"{header}.{payload}.{b64url(sig)}"
    await refused(auth, {H: token}, "algorithm", mentions="HS256")
    assert jwks_server.fetches == 0


async def test_alg_not_in_allow_list(make_auth, jwks_server, rsa1):
    auth = make_auth({"jwt": [issuer_cfg(jwks_server.url, algorithms=["ES256"])]})
    await refused(auth, {H: mint(rsa1)}, "algorithm", mentions="ES256")


async def test_alg_that_does_not_fit_the_kid(auth, jwks_server, rsa1, ec1):
    # an ES256 token naming an RSA kid
    await refused(auth, {H: mint(ec1, kid=rsa1.kid)}, "algorithm")


async def test_unknown_kid_refetches_once_then_refuses(auth, jwks_server, rsa1, rsa2, clock):
    # right after the initial load the floor forbids a refetch: same answer either way
    err = await refused(auth, {H: mint(rsa2)}, "unknown_kid", mentions="kid")
    assert "rsa-2" not in err.message
    assert jwks_server.fetches == 1
    clock.advance(61)
    await refused(auth, {H: mint(rsa2)}, "unknown_kid")
    assert jwks_server.fetches == 2  # exactly one refetch for the unknown kid, then refused
    assert (await auth.authenticate({H: mint(rsa1)})).user == "user-42"


async def test_key_rotation_accepted_after_refetch(auth, jwks_server, rsa1, rsa2, clock):
    assert (await auth.authenticate({H: mint(rsa1)})).user == "user-42"
    assert jwks_server.fetches == 1
    jwks_server.serve(rsa2)  # the IdP rotates
    clock.advance(61)  # past the refresh floor
    assert (await auth.authenticate({H: mint(rsa2, sub="after-rotation")})).user == "after-rotation"
    assert jwks_server.fetches == 2


async def test_refresh_floor_respected(auth, jwks_server, rsa1, rsa2, clock):
    assert (await auth.authenticate({H: mint(rsa1)})).user == "user-42"
    jwks_server.serve(rsa1, rsa2)
    for i in range(5):  # within the floor: no refetch at all, however many unknown kids arrive
        clock.advance(5)
        await refused(auth, {H: mint(rsa2, kid=f"junk-{i}")}, "unknown_kid")
    assert jwks_server.fetches == 1
    clock.advance(60)
    await refused(auth, {H: mint(rsa2, kid="junk-x")}, "unknown_kid")
    assert jwks_server.fetches == 2
    # the refetch picked up rsa-2, which is now known without another fetch
    assert (await auth.authenticate({H: mint(rsa2)})).user == "user-42"
    assert jwks_server.fetches == 2


async def test_concurrent_requests_share_one_fetch(auth, jwks_server, rsa1):
    jwks_server.delay = 0.05
    tokens = [mint(rsa1, sub=f"u{i}") for i in range(20)]
    idents = await asyncio.gather(*(auth.authenticate({H: t}) for t in tokens))
    assert [i.user for i in idents] == [f"u{i}" for i in range(20)]
    assert jwks_server.fetches == 1


async def test_jwks_cache_expiry_refreshes_in_background(auth, jwks_server, rsa1, clock):
    await auth.authenticate({H: mint(rsa1, exp=int(NOW) + 10_000)})
    clock.advance(3601)
    await auth.authenticate({H: mint(rsa1, sub="x", exp=int(NOW) + 10_000)})  # served from the stale set meanwhile
    for _ in range(50):
        if jwks_server.fetches == 2:
            break
        await asyncio.sleep(0.01)
    assert jwks_server.fetches == 2


async def test_jwks_unavailable(auth, jwks_server, rsa1):
    jwks_server.status = 500
    await refused(auth, {H: mint(rsa1)}, "jwks_unavailable", status=503, mentions="cloudflare-access")


async def test_malformed_tokens(auth, rsa1):
    await refused(auth, {H: "not-a-jwt"}, "malformed", mentions=H)
    await refused(auth, {H: "abc.def.ghi"}, "malformed")
    # correctly signed, but the payload is not a JSON object
    signed = jwt.PyJWS().encode(b"not json", rsa1.private, algorithm="RS256", headers={"kid": "rsa-1"})
    await refused(auth, {H: signed}, "malformed")
    # a kid that is not a string
    await refused(auth, {H: raw_token({"alg": "RS256", "kid": 7}, claims(), b"x")}, "malformed")


async def test_token_in_the_wrong_header(auth, rsa1):
    token = mint(rsa1)
    err = await refused(auth, {"authorization": f"Bearer {token}"}, "wrong_header", mentions=H)
    assert "authorization" in err.message
    # not JWT-shaped: just no credentials
    await refused(auth, {"authorization": "Bearer sk-upstream-key"}, "missing")


async def test_verified_token_cache_avoids_reverification(auth, rsa1, clock, monkeypatch):
    calls = 0
    real = jwt.PyJWT.decode

    def counting(self, *a, **kw):
        nonlocal calls
        calls += 1
        return real(self, *a, **kw)

    monkeypatch.setattr(jwt.PyJWT, "decode", counting)
    token = mint(rsa1, exp=int(NOW) + 100)
    for _ in range(5):
        assert (await auth.authenticate({H: token})).user == "user-42"
    assert calls == 1
    assert auth.stats()["jwt_cache_hits"] == 4
    assert auth.stats()["jwt_verified"] == 1
    # cached only until exp: then it is verified again (and refused, leeway is 30 s)
    clock.advance(131)
    await refused(auth, {H: token}, "expired")
    assert calls == 2


async def test_token_cache_is_bounded(make_auth, jwks_server, rsa1):
    auth = make_auth({"jwt": [issuer_cfg(jwks_server.url)]}, token_cache_size=3)
    for i in range(10):
        await auth.authenticate({H: mint(rsa1, sub=f"u{i}")})
    assert auth.stats()["jwt_cache_size"] == 3


async def test_missing_user_claim(auth, rsa1):
    await refused(auth, {H: mint(rsa1, sub=None)}, "missing_claim", mentions="sub")


async def test_service_token_claim_maps_to_service_identity(make_auth, jwks_server, rsa1):
    cfg = {
        "jwt": [issuer_cfg(jwks_server.url, service_token_claim="common_name")],
        "service_tokens": {
            "tokens": [
                {
                    "name": "code-review-bot",
                    "client_id": "3f1c.access",
                    "secret_sha256": "0" * 64,
                    "team": "platform",
                    "app": "code-review",
                    "groups": ["bots"],
                    "attributes": {"tier": "batch"},
                }
            ]
        },
    }
    auth = make_auth(cfg)
    ident = await auth.authenticate({H: mint(rsa1, sub="", common_name="3f1c.access", custom={})})
    assert ident.user == "service:code-review-bot"
    assert ident.service_token == "code-review-bot"
    assert (ident.team, ident.app, ident.groups) == ("platform", "code-review", ("bots",))
    assert ident.extra == {"tier": "batch"}
    assert ident.source == "jwt:cloudflare-access"
    # an unknown service token still gets a service identity, with claim-derived attributes only
    other = await auth.authenticate({H: mint(rsa1, sub="", common_name="other.access")})
    assert other.user == "service:other.access" and other.team == "research"


async def test_jwks_file_read_at_start_and_reread_on_unknown_kid(make_auth, tmp_path: Path, rsa1, rsa2, clock):
    f = tmp_path / "jwks.json"
    f.write_text(json.dumps({"keys": [rsa1.jwk]}))
    cfg = issuer_cfg(None, jwks_file=str(f))
    del cfg["jwks_url"]
    auth = make_auth({"jwt": [cfg]})
    assert auth.stats()["jwks_fetches"] == 1
    f.write_text(json.dumps({"keys": [rsa1.jwk, rsa2.jwk]}))
    assert (await auth.authenticate({H: mint(rsa1)})).user == "user-42"
    await refused(auth, {H: mint(rsa2)}, "unknown_kid")  # within the floor of the start-up read
    clock.advance(61)
    assert (await auth.authenticate({H: mint(rsa2)})).user == "user-42"
    assert auth.stats()["jwks_fetches"] == 2


def test_jwks_file_missing_fails_at_start(make_auth, tmp_path):
    cfg = issuer_cfg(None, jwks_file=str(tmp_path / "nope.json"))
    del cfg["jwks_url"]
    with pytest.raises(Exception, match="nope.json"):
        make_auth({"jwt": [cfg]})


async def test_hmac_keys_in_the_jwks_are_ignored(make_auth, jwks_server, rsa1):
    jwks_server.keys = [{"kty": "oct", "kid": "hs", "k": b64url(b"secret" * 8)}, rsa1.jwk]
    auth = make_auth({"jwt": [issuer_cfg(jwks_server.url)]})
    assert (await auth.authenticate({H: mint(rsa1)})).user == "user-42"
    token = jwt.encode(claims(), b"secret" * 8, algorithm="HS256", headers={"kid": "hs"})
    await refused(auth, {H: token}, "algorithm")


async def test_token_without_kid_tries_fitting_keys(make_auth, jwks_server, rsa1, rsa2, ec1):
    jwks_server.serve(ec1, rsa1, rsa2)
    auth = make_auth({"jwt": [issuer_cfg(jwks_server.url)]})
    assert (await auth.authenticate({H: mint(rsa2, kid=None)})).user == "user-42"
    from identity_helpers import Key
    from cryptography.hazmat.primitives.asymmetric import rsa as _rsa

    stranger = Key("x", "RS256", _rsa.generate_private_key(public_exponent=65537, key_size=2048), {})
    await refused(auth, {H: mint(stranger, kid=None)}, "signature")


async def test_bearer_jwt_and_api_keys_share_authorization(make_auth, jwks_server, rsa1):
    from extproc.identity import hash_secret

    cfg = {
        "jwt": [issuer_cfg(jwks_server.url, header="authorization")],
        "api_keys": {"keys": [{"name": "demo", "key_sha256": hash_secret("tg-demo-key"), "team": "demo"}]},
    }
    auth = make_auth(cfg)
    assert (await auth.authenticate({"authorization": f"Bearer {mint(rsa1)}"})).source == "jwt:cloudflare-access"
    assert (await auth.authenticate({"authorization": "Bearer tg-demo-key"})).source == "api_key:demo"
    # a JWT-shaped value is a JWT: a bad one is refused, not tried as an API key
    await refused(auth, {"authorization": f"Bearer {mint(rsa1, aud='x')}"}, "audience")
    await refused(auth, {"authorization": "Bearer nope"}, "unknown_key")


async def test_two_issuers_on_one_header_selected_by_iss(make_auth, jwks_server, rsa1):
    second = issuer_cfg(jwks_server.url, name="okta", issuers=["https://okta.example"])
    auth = make_auth({"jwt": [issuer_cfg(jwks_server.url), second]})
    assert (await auth.authenticate({H: mint(rsa1)})).source == "jwt:cloudflare-access"
    assert (await auth.authenticate({H: mint(rsa1, iss="https://okta.example")})).source == "jwt:okta"
    await refused(auth, {H: mint(rsa1, iss="https://evil.example")}, "issuer")


async def test_default_fetcher_is_closed(make_auth, jwks_server, rsa1):
    auth = make_auth({"jwt": [issuer_cfg(jwks_server.url)]})
    await auth.authenticate({H: mint(rsa1)})
    await auth.close()
    await auth.close()  # idempotent


async def test_injected_fetcher(make_auth, rsa1):
    urls = []

    async def fetch(url):
        urls.append(url)
        return {"keys": [rsa1.jwk]}

    auth = make_auth({"jwt": [issuer_cfg("https://idp.example/certs")]}, http=fetch)
    assert (await auth.authenticate({H: mint(rsa1)})).user == "user-42"
    assert urls == ["https://idp.example/certs"]
