"""Service tokens, API keys, anonymous, source order and no fall-through."""

from __future__ import annotations

import pytest

from extproc.identity import AuthError, Identity, hash_secret

from identity_helpers import issuer_cfg, mint

BOT_SECRET = "bot-secret-0123456789abcdef"
DEMO_KEY = "tg-demo-key-0123456789"


def config(jwks_url: str | None = None, *, anonymous: dict | None = None) -> dict:
    cfg: dict = {
        "service_tokens": {
            "tokens": [
                {
                    "name": "code-review-bot",
                    "client_id": "3f1c.access",
                    "secret_sha256": hash_secret(BOT_SECRET),
                    "team": "platform",
                    "app": "code-review",
                    "groups": ["bots"],
                    "attributes": {"tier": "batch"},
                }
            ]
        },
        "api_keys": {
            "keys": [
                {
                    "name": "demo",
                    "key_sha256": hash_secret(DEMO_KEY),
                    "user": "demo",
                    "email": "demo@example.com",
                    "groups": ["ics"],
                    "team": "demo-team",
                    "app": "readme",
                }
            ]
        },
    }
    if jwks_url:
        cfg["jwt"] = [issuer_cfg(jwks_url)]
    if anonymous is not None:
        cfg["anonymous"] = anonymous
    return cfg


async def refused(auth, headers, check, mentions=None) -> AuthError:
    with pytest.raises(AuthError) as ei:
        await auth.authenticate(headers)
    err = ei.value
    assert err.check == check, err
    assert err.status == 401
    assert mentions is None or mentions in err.message, err.message
    for secret in (BOT_SECRET, DEMO_KEY, hash_secret(BOT_SECRET), hash_secret(DEMO_KEY)):
        assert secret not in err.message and secret not in repr(err)
    return err


async def test_service_token(make_auth):
    auth = make_auth(config())
    ident = await auth.authenticate({"cf-access-client-id": "3f1c.access", "cf-access-client-secret": BOT_SECRET})
    assert ident.user == "service:code-review-bot"
    assert (ident.team, ident.app, ident.groups) == ("platform", "code-review", ("bots",))
    assert ident.service_token == "code-review-bot" and ident.source == "service_token"
    assert ident.attrs()["tier"] == "batch"


async def test_service_token_refusals(make_auth):
    auth = make_auth(config())
    await refused(auth, {"cf-access-client-id": "3f1c.access", "cf-access-client-secret": "wrong"}, "bad_secret", "secret")
    await refused(auth, {"cf-access-client-id": "nope", "cf-access-client-secret": BOT_SECRET}, "bad_secret",
                  "unknown client id or wrong secret")  # the same answer: client ids cannot be enumerated
    await refused(auth, {"cf-access-client-id": "3f1c.access"}, "malformed", "cf-access-client-secret")
    await refused(auth, {"cf-access-client-secret": BOT_SECRET}, "malformed", "cf-access-client-id")


async def test_failed_service_token_does_not_fall_through(make_auth):
    auth = make_auth(config(anonymous={}))
    await refused(
        auth,
        {"cf-access-client-id": "3f1c.access", "cf-access-client-secret": "wrong", "x-api-key": DEMO_KEY},
        "bad_secret",
    )


async def test_api_keys_by_bearer_and_x_api_key(make_auth):
    auth = make_auth(config())
    for headers in ({"authorization": f"Bearer {DEMO_KEY}"}, {"authorization": f"bearer  {DEMO_KEY} "}, {"x-api-key": DEMO_KEY}):
        ident = await auth.authenticate(headers)
        assert ident == Identity(
            user="demo", email="demo@example.com", groups=("ics",), team="demo-team", app="readme",
            service_token=None, source="api_key:demo",
        )


async def test_api_key_refusals(make_auth):
    auth = make_auth(config(anonymous={}))
    await refused(auth, {"x-api-key": "sk-unknown-key-xyz-123456"}, "unknown_key", "x-api-key")
    await refused(auth, {"authorization": "Bearer sk-unknown-key-xyz-123456"}, "unknown_key", "authorization")
    await refused(auth, {"authorization": f"Basic {DEMO_KEY}"}, "malformed", "Bearer")


async def test_failed_jwt_does_not_fall_through_to_api_key(make_auth, jwks_server, rsa1):
    auth = make_auth(config(jwks_server.url, anonymous={}))
    headers = {"cf-access-jwt-assertion": mint(rsa1, aud="other"), "x-api-key": DEMO_KEY}
    await refused(auth, headers, "audience")


async def test_source_order(make_auth, jwks_server, rsa1):
    auth = make_auth(config(jwks_server.url))
    st = {"cf-access-client-id": "3f1c.access", "cf-access-client-secret": BOT_SECRET}
    j = {"cf-access-jwt-assertion": mint(rsa1)}
    k = {"x-api-key": DEMO_KEY}
    assert (await auth.authenticate({**st, **j, **k})).source == "service_token"
    assert (await auth.authenticate({**j, **k})).source == "jwt:cloudflare-access"
    assert (await auth.authenticate(k)).source == "api_key:demo"


async def test_jwt_shaped_api_key_is_still_an_api_key(make_auth, jwks_server, rsa1):
    jwt_like = mint(rsa1, aud="api")
    cfg = config(jwks_server.url)
    cfg["api_keys"]["keys"].append({"name": "jwt-shaped", "key_sha256": hash_secret(jwt_like)})
    auth = make_auth(cfg)
    assert (await auth.authenticate({"x-api-key": jwt_like})).source == "api_key:jwt-shaped"
    # any other JWT there is a JWT in the wrong header
    await refused(auth, {"x-api-key": mint(rsa1)}, "wrong_header", "cf-access-jwt-assertion")


async def test_anonymous_only_when_configured(make_auth):
    auth = make_auth(config())
    err = await refused(auth, {"user-agent": "curl"}, "missing", "no credentials")
    assert "x-api-key" in err.message and "cf-access-client-id" in err.message
    anon = make_auth(config(anonymous={"user": "guest", "team": "public", "attributes": {"tier": "free"}}))
    ident = await anon.authenticate({"x-api-key": " "})  # an empty header is no credential
    assert ident.user == "guest" and ident.source == "anonymous" and ident.team == "public"
    assert ident.attrs() == {"user": "guest", "groups": [], "team": "public", "source": "anonymous", "tier": "free"}


async def test_nothing_configured(make_auth):
    auth = make_auth({})
    await refused(auth, {"authorization": "Bearer x"}, "missing", "no identity sources")
    assert auth.credential_headers() == frozenset()


async def test_credential_headers(make_auth, jwks_server):
    auth = make_auth(config(jwks_server.url))
    assert auth.credential_headers() == frozenset(
        {"cf-access-jwt-assertion", "cf-access-client-id", "cf-access-client-secret", "authorization", "x-api-key"}
    )


def test_hash_secret_and_identity_attrs():
    assert hash_secret("abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    i = Identity(user="u", email=None, groups=("a",), team=None, app="x", service_token=None, source="anonymous",
                 extra={"cc": ["1", "2"]})
    assert i.attrs() == {"user": "u", "groups": ["a"], "app": "x", "source": "anonymous", "cc": ["1", "2"]}
    hash(i)  # usable as a dict key


def test_reprs_hide_secrets(make_auth):
    auth = make_auth(config())
    for text in (repr(auth), repr(auth._config)):
        assert hash_secret(BOT_SECRET) not in text and hash_secret(DEMO_KEY) not in text
