"""Validation of the `identity:` policy section."""

from __future__ import annotations

import pytest
import yaml
from pydantic import ValidationError

from extproc.identity import IdentityConfig, hash_secret

SPEC_YAML = f"""
identity:
  jwt:
    - name: cloudflare-access
      header: cf-access-jwt-assertion
      issuers: ["https://myteam.cloudflareaccess.com"]
      audiences: ["aud-tag"]
      jwks_url: "https://myteam.cloudflareaccess.com/cdn-cgi/access/certs"
      algorithms: [RS256]
      leeway_seconds: 30
      jwks_refresh_floor_seconds: 60
      jwks_cache_seconds: 3600
      claims:
        user: sub
        email: email
        groups: custom.groups
        team: custom.team
        cost_center: custom.cc
      service_token_claim: common_name
  service_tokens:
    id_header: cf-access-client-id
    secret_header: cf-access-client-secret
    tokens:
      - name: code-review-bot
        client_id: "3f1c.access"
        secret_sha256: "{hash_secret('s3cret')}"
        team: platform
        app: code-review
        groups: [bots]
        attributes: {{}}
  api_keys:
    headers: [authorization, x-api-key]
    keys:
      - name: demo
        key_sha256: "{hash_secret('k3y').upper()}"
        user: demo
        email: demo@example.com
        groups: [ics]
        team: demo-team
        app: readme
  anonymous: null
"""


def issuer(**over):
    base = {
        "name": "idp",
        "issuers": ["https://idp.example"],
        "audiences": ["aud"],
        "jwks_url": "https://idp.example/jwks",
    }
    base.update(over)
    return {k: v for k, v in base.items() if v is not None}


def invalid(config: dict, *fragments: str) -> str:
    with pytest.raises(ValidationError) as ei:
        IdentityConfig.model_validate(config)
    text = str(ei.value)
    for f in fragments:
        assert f in text, text
    return text


def test_spec_example_parses():
    cfg = IdentityConfig.model_validate(yaml.safe_load(SPEC_YAML)["identity"])
    j = cfg.jwt[0]
    assert j.algorithms == ["RS256"] and j.claims["groups"] == "custom.groups"
    assert cfg.api_keys.keys[0].key_sha256 == hash_secret("k3y")  # normalised to lower case
    assert cfg.anonymous is None


def test_empty_and_defaults():
    cfg = IdentityConfig.model_validate({})
    assert cfg.jwt == [] and cfg.service_tokens is None and cfg.api_keys is None
    j = IdentityConfig.model_validate({"jwt": [issuer()]}).jwt[0]
    assert j.header == "cf-access-jwt-assertion"
    assert j.algorithms == ["RS256"]
    assert j.claims == {"user": "sub", "email": "email"}
    assert (j.leeway_seconds, j.jwks_refresh_floor_seconds, j.jwks_cache_seconds) == (30, 60, 3600)
    st = IdentityConfig.model_validate({"service_tokens": {}}).service_tokens
    assert (st.id_header, st.secret_header) == ("cf-access-client-id", "cf-access-client-secret")
    ak = IdentityConfig.model_validate({"api_keys": {}}).api_keys
    assert ak.headers == ["authorization", "x-api-key"]


def test_claims_without_user_default_to_sub():
    j = IdentityConfig.model_validate({"jwt": [issuer(claims={"email": "mail"})]}).jwt[0]
    assert j.claims == {"email": "mail", "user": "sub"}


def test_header_names_are_lower_cased():
    j = IdentityConfig.model_validate({"jwt": [issuer(header="Authorization")]}).jwt[0]
    assert j.header == "authorization"


@pytest.mark.parametrize("alg", ["none", "None"])
def test_alg_none_refused(alg):
    invalid({"jwt": [issuer(algorithms=["RS256", alg])]}, "'none' is never accepted")


@pytest.mark.parametrize("alg", ["HS256", "HS512"])
def test_hmac_refused(alg):
    invalid({"jwt": [issuer(algorithms=[alg])]}, f"{alg!r} is never accepted", "HMAC")


def test_unknown_alg_refused():
    invalid({"jwt": [issuer(algorithms=["rs256"])]}, "'rs256' is not supported", "RS256")
    invalid({"jwt": [issuer(algorithms=[])]}, "algorithms")


def test_exactly_one_jwks_source():
    invalid({"jwt": [issuer(jwks_file="/etc/jwks.json")]}, "exactly one of jwks_url or jwks_file")
    invalid({"jwt": [issuer(jwks_url=None)]}, "exactly one of jwks_url or jwks_file")


def test_plain_http_jwks_only_on_loopback():
    invalid({"jwt": [issuer(jwks_url="http://idp.example/jwks")]}, "https")
    IdentityConfig.model_validate({"jwt": [issuer(jwks_url="http://127.0.0.1:8080/jwks")]})
    IdentityConfig.model_validate({"jwt": [issuer(jwks_url="http://localhost/jwks")]})


def test_unknown_keys_refused():
    invalid({"jwt": [issuer(jwks_uri="https://x")]}, "jwks_uri", "Extra inputs are not permitted")
    invalid({"jwts": []}, "jwts", "Extra inputs are not permitted")
    invalid({"api_keys": {"keys": [{"name": "a", "key": "plaintext"}]}}, "key")


def test_issuers_and_audiences_required():
    invalid({"jwt": [issuer(audiences=[])]}, "audiences")
    invalid({"jwt": [issuer(issuers=None)]}, "issuers")


def test_secret_hash_must_be_a_hash_and_is_not_echoed():
    text = invalid(
        {"api_keys": {"keys": [{"name": "a", "key_sha256": "sk-live-plaintext-key"}]}},
        "64-character hex sha256",
    )
    assert "sk-live-plaintext-key" not in text
    assert "<redacted>" in text
    # a plaintext secret under a wrong key name is not echoed either
    text = invalid({"api_keys": {"keys": [{"name": "a", "key": "sk-live-plaintext-key"}]}}, "Extra inputs")
    assert "sk-live-plaintext-key" not in text
    invalid(
        {"service_tokens": {"tokens": [{"name": "a", "client_id": "c", "secret_sha256": "abc"}]}},
        "secret_sha256",
    )


def test_hashes_not_in_repr():
    h = hash_secret("k")
    cfg = IdentityConfig.model_validate({"api_keys": {"keys": [{"name": "a", "key_sha256": h}]}})
    assert h not in repr(cfg)


def test_duplicates_and_clashes():
    invalid({"jwt": [issuer(), issuer()]}, "duplicate issuer name")
    h1, h2 = hash_secret("1"), hash_secret("2")
    invalid({"api_keys": {"keys": [{"name": "a", "key_sha256": h1}, {"name": "a", "key_sha256": h2}]}}, "duplicate name")
    invalid({"api_keys": {"keys": [{"name": "a", "key_sha256": h1}, {"name": "b", "key_sha256": h1}]}}, "same key_sha256")
    tok = {"client_id": "c", "secret_sha256": h1}
    invalid({"service_tokens": {"tokens": [{"name": "a", **tok}, {"name": "b", **tok}]}}, "duplicate client_id")
    invalid({"service_tokens": {"id_header": "x-api-key"}, "api_keys": {}}, "also used for JWTs or API keys")


def test_reserved_attribute_names():
    invalid({"jwt": [issuer(claims={"source": "iss"})]}, "'source' is set by Tollgate")
    invalid({"anonymous": {"attributes": {"team": "x"}}}, "'team' is not a custom attribute")
    invalid({"jwt": [issuer(claims={"groups": "a..b"})]}, "empty segment")
