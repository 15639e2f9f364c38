"""Issue 4 through the real stack: verified identity (JWT/JWKS, service tokens, API keys),
anti-spoofing, and model access by identity.

Every refusal is checked for its status, its provider-shaped error body whose `code` names the
failed check, and the attribution record the ext_proc wrote for it. What reached the provider is
read back from the fake provider's `x-fake-*` echo headers.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import anthropic
import httpx
import openai
import pytest
import yaml

from tests.conftest import FAKE_GATEWAY_KEY, REPO, JsonLog
from tests.e2e_idp import TestIdP

JWT_HEADER = "cf-access-jwt-assertion"
CHAT = "/v1/chat/completions"
MESSAGES = "/v1/messages"
SERVICE_HEADERS = {"cf-access-client-id": "review-bot.access", "cf-access-client-secret": "bot-secret"}
INTERN_ALLOWED = {"gpt-4o-mini", "gpt-4.1-nano"}


def _policy_key(name: str) -> dict[str, Any]:
    """An API key's entry in the test identities (read here, so edits to its groups don't break us)."""
    doc = yaml.safe_load((REPO / "tests" / "policies" / "test-identity.yaml").read_text())
    return next(k for k in doc["identity"]["api_keys"]["keys"] if k["name"] == name)


# ---- helpers ---------------------------------------------------------------------------------

def _body(model: str, path: str) -> dict[str, Any]:
    if path == MESSAGES:
        return {"model": model, "max_tokens": 20, "messages": [{"role": "user", "content": "hi"}]}
    return {"model": model, "messages": [{"role": "user", "content": "hi"}]}


def _post(stack, headers: dict[str, str], *, model: str = "gpt-4o-mini", path: str = CHAT) -> httpx.Response:
    """A raw request with exactly these headers (plus content-type): no SDK-added credential."""
    return httpx.post(f"{stack.base_url}{path}", content=json.dumps(_body(model, path)).encode(),
                      headers={"content-type": "application/json", **headers}, timeout=10)


def _jwt(token: str) -> dict[str, str]:
    return {JWT_HEADER: token}


def _openai_error(r: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert r.status_code == status, (r.status_code, r.text)
    assert r.headers["content-type"].startswith("application/json")
    err = r.json()["error"]
    assert set(err) >= {"message", "type", "param", "code"}, err
    assert err["code"] == code, err
    assert isinstance(err["message"], str) and err["message"]
    return err


def _refusal_record(attribution: JsonLog, r: httpx.Response, status: int, code: str) -> dict[str, Any]:
    rec = attribution.get(r.headers["x-tollgate-request-id"])
    assert rec["status"] == status and rec["decision"] == "refused" and rec["error_code"] == code, rec
    assert rec["cost_usd"] == 0 and rec["input_tokens"] == 0
    return rec


def _header_names(r: httpx.Response) -> list[str]:
    """The request header names the fake provider received."""
    return [h for h in r.headers["x-fake-header-names"].split(",") if h]


def _assert_no_identity_headers_upstream(r: httpx.Response) -> None:
    names = _header_names(r)
    assert names, "the fake provider reported no headers"
    leaked = [h for h in names if h.startswith("x-tollgate-") or h.startswith("cf-access-")]
    assert not leaked, f"identity/routing headers reached the provider: {leaked}"


def _access_line(stack, request_id: str) -> dict[str, Any]:
    return JsonLog(stack.access_log).get(request_id)


@pytest.fixture(scope="module")
def keys(idp: TestIdP) -> TestIdP:
    """The IdP with an extra, never-published RSA key to forge signatures with."""
    if "rsa-rogue" not in idp.keys:
        idp.add_key("rsa-rogue", "RS256", publish=False)
    return idp


# ---- valid JWTs --------------------------------------------------------------------------------

@pytest.mark.parametrize("kid, alg", [("rsa-1", "RS256"), ("ec-1", "ES256")])
def test_valid_jwt_passes_and_its_attributes_are_attributed(stack, idp, attribution, kid, alg):
    sub = f"jwt-user-{alg.lower()}"
    token = idp.token({"sub": sub, "email": f"{sub}@example.com",
                       "custom": {"groups": ["engineers", "ml-readers"], "team": "research"}}, kid=kid)
    r = _post(stack, _jwt(token))
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"].startswith("tok0")
    # The provider saw the gateway's key and none of the client's identity headers.
    assert r.headers["x-fake-authorization"] == f"Bearer {FAKE_GATEWAY_KEY}"
    _assert_no_identity_headers_upstream(r)

    request_id = r.headers["x-tollgate-request-id"]
    rec = attribution.get(request_id)
    assert rec["user"] == sub and rec["email"] == f"{sub}@example.com"
    assert rec["groups"] == ["engineers", "ml-readers"] and rec["team"] == "research"
    assert rec["auth_source"] == "jwt:test-idp" and rec["service_token"] is None
    assert rec["status"] == 200 and rec["decision"] == "allowed" and rec["provider"] == "fake"

    line = _access_line(stack, request_id)
    assert line["user"] == sub and line["email"] == f"{sub}@example.com"
    assert line["groups"] == "engineers,ml-readers" and line["team"] == "research"
    assert line["auth_source"] == "jwt:test-idp"
    assert str(line["status"]) == "200"


def test_jwt_works_through_the_openai_sdk(stack, idp, attribution):
    token = idp.token({"sub": "sdk-user", "custom": {"team": "sdk-team"}}, kid="ec-1")
    # The SDK insists on an api_key; the verified JWT is the identity (JWTs are tried first) and
    # the SDK's authorization header is stripped along with the JWT.
    client = openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key="unused", max_retries=0,
                           default_headers=_jwt(token))
    raw = client.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hello"}])
    raw.parse()
    assert raw.headers["x-fake-authorization"] == f"Bearer {FAKE_GATEWAY_KEY}"
    rec = attribution.get(raw.headers["x-tollgate-request-id"])
    assert (rec["user"], rec["team"], rec["auth_source"]) == ("sdk-user", "sdk-team", "jwt:test-idp")


# ---- refused JWTs ----------------------------------------------------------------------------

def _expired(idp: TestIdP) -> str:
    return idp.token(ttl=-60)  # expired a minute ago; leeway is 5 s


def _not_yet_valid(idp: TestIdP) -> str:
    return idp.token(nbf=int(time.time()) + 120)


def _issued_in_future(idp: TestIdP) -> str:
    return idp.token(iat=int(time.time()) + 120)


def _wrong_issuer(idp: TestIdP) -> str:
    return idp.token(iss="https://evil.example")


def _wrong_audience(idp: TestIdP) -> str:
    return idp.token(aud="some-other-app")


def _bad_signature(idp: TestIdP) -> str:
    return idp.token(kid="rsa-1", sign_with="rsa-rogue")  # published kid, unpublished signing key


def _tampered_payload(idp: TestIdP) -> str:
    h, _, s = idp.token({"sub": "nobody"}).split(".")
    _, p, _ = idp.token({"sub": "ceo"}).split(".")
    return f"{h}.{p}.{s}"


def _alg_none(idp: TestIdP) -> str:
    return TestIdP.forge({"alg": "none", "typ": "JWT", "kid": "rsa-1"}, idp.claims())


def _alg_none_capitalised(idp: TestIdP) -> str:
    return TestIdP.forge({"alg": "None", "typ": "JWT", "kid": "rsa-1"}, idp.claims())


def _hs256_with_rsa_public_pem(idp: TestIdP) -> str:
    return TestIdP.forge({"alg": "HS256", "typ": "JWT", "kid": "rsa-1"}, idp.claims(),
                         hmac_key=idp.public_pem("rsa-1"))


def _es256_under_rsa_kid(idp: TestIdP) -> str:
    return idp.token(kid="rsa-1", sign_with="ec-1")  # alg ES256 names an RSA key


def _unknown_kid(idp: TestIdP) -> str:
    return idp.token(kid="rsa-rogue")  # validly signed, but its kid was never published


def _no_user_claim(idp: TestIdP) -> str:
    return idp.token(sub="")  # user <- sub, and an empty sub is no user


@pytest.mark.parametrize("make, code, words", [
    (_expired, "expired", "expired"),
    (_not_yet_valid, "not_yet_valid", "not valid yet"),
    (_issued_in_future, "not_yet_valid", "future"),
    (_wrong_issuer, "issuer", "issuer"),
    (_wrong_audience, "audience", "audience"),
    (_bad_signature, "signature", "signature"),
    (_tampered_payload, "signature", "signature"),
    (_alg_none, "algorithm", "algorithm"),
    (_alg_none_capitalised, "algorithm", "algorithm"),
    (_hs256_with_rsa_public_pem, "algorithm", "algorithm"),
    (_es256_under_rsa_kid, "algorithm", "algorithm"),
    (_unknown_kid, "unknown_kid", "kid"),
    (_no_user_claim, "missing_claim", "claim"),
], ids=lambda v: v.__name__.lstrip("_") if callable(v) else None)
def test_bad_jwt_is_refused_naming_the_check(stack, keys, attribution, make: Callable[[TestIdP], str],
                                             code: str, words: str):
    r = _post(stack, _jwt(make(keys)))
    err = _openai_error(r, 401, code)
    assert err["type"] == "authentication_error"
    assert words in err["message"].lower(), err["message"]
    assert "test-idp" in err["message"]  # names the issuer whose check failed
    rec = _refusal_record(attribution, r, 401, code)
    assert rec["user"] is None and rec["auth_source"] is None


@pytest.mark.parametrize("value", ["garbage", "not.a.jwt", "a.b", "Bearer x.y.z"])
def test_malformed_jwt_is_refused(stack, attribution, value):
    r = _post(stack, _jwt(value))
    err = _openai_error(r, 401, "malformed")
    assert JWT_HEADER in err["message"] and "JWT" in err["message"]
    _refusal_record(attribution, r, 401, "malformed")


def test_jwt_in_a_header_no_issuer_reads_is_wrong_header(stack, idp, attribution):
    token = idp.token()
    for headers in ({"authorization": f"Bearer {token}"}, {"x-api-key": token}):
        r = _post(stack, headers)
        err = _openai_error(r, 401, "wrong_header")
        assert JWT_HEADER in err["message"], err["message"]
        assert token not in r.text  # the token is never echoed back
        _refusal_record(attribution, r, 401, "wrong_header")


def test_key_rotation_new_kid_is_fetched_once_published(stack, idp, attribution):
    kid = "rsa-rotated"
    if kid not in idp.keys:
        idp.add_key(kid, "RS256", publish=False)
    token = idp.token({"sub": "rotated-user"}, kid=kid)
    before = idp.fetches
    r = _post(stack, _jwt(token))
    _openai_error(r, 401, "unknown_kid")
    assert idp.fetches > before  # the unknown kid triggered a refetch (refresh floor is 0)
    idp.published.append(kid)  # the IdP rotates the new key in
    r = _post(stack, _jwt(token))
    assert r.status_code == 200, r.text
    assert attribution.get(r.headers["x-tollgate-request-id"])["user"] == "rotated-user"
    # Old keys keep working after the rotation.
    assert _post(stack, _jwt(idp.token(kid="rsa-1"))).status_code == 200


def test_jwks_outage_keeps_known_keys_and_refuses_unknown_kids_with_503(stack, idp, attribution):
    kid = "rsa-during-outage"
    if kid not in idp.keys:
        idp.add_key(kid, "RS256", publish=False)
    known = idp.token({"sub": "outage-user"}, kid="ec-1")
    unknown = idp.token({"sub": "outage-user"}, kid=kid)
    idp.fail_status = 500
    try:
        before = idp.fetches
        r = _post(stack, _jwt(unknown))
        err = _openai_error(r, 503, "jwks_unavailable")
        assert "test-idp" in err["message"]
        assert idp.fetches > before  # it did try the IdP
        _refusal_record(attribution, r, 503, "jwks_unavailable")
        # Tokens signed with keys fetched before the outage still verify.
        r = _post(stack, _jwt(known))
        assert r.status_code == 200, r.text
    finally:
        idp.fail_status = None


def test_leeway_accepts_a_token_expired_a_moment_ago(stack, idp, attribution):
    r = _post(stack, _jwt(idp.token({"sub": "leeway-user"}, ttl=-2)))  # leeway_seconds: 5
    assert r.status_code == 200, r.text
    assert attribution.get(r.headers["x-tollgate-request-id"])["user"] == "leeway-user"


def test_audience_list_containing_ours_passes(stack, idp):
    token = idp.token(aud=["another-app", "tollgate-e2e"])
    assert _post(stack, _jwt(token)).status_code == 200


# ---- no / unknown credentials ------------------------------------------------------------------

def test_no_credential_is_401_missing(stack, attribution):
    r = _post(stack, {})
    err = _openai_error(r, 401, "missing")
    assert err["type"] == "authentication_error"
    assert JWT_HEADER in err["message"] and "API key" in err["message"], err["message"]
    _refusal_record(attribution, r, 401, "missing")


def test_no_credential_on_anthropic_path_has_anthropic_shape(stack):
    r = _post(stack, {}, model="claude-sonnet-4-6", path=MESSAGES)
    assert r.status_code == 401
    body = r.json()
    assert body["type"] == "error" and body["error"]["type"] == "authentication_error"
    assert body["error"]["code"] == "missing"


@pytest.mark.parametrize("headers", [{"authorization": "Bearer key-nobody"}, {"x-api-key": "key-nobody"}])
def test_unknown_api_key_is_401(stack, attribution, headers):
    r = _post(stack, headers)
    err = _openai_error(r, 401, "unknown_key")
    assert "key-nobody" not in err["message"]
    _refusal_record(attribution, r, 401, "unknown_key")


def test_unknown_api_key_through_the_sdk(stack):
    client = openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key="key-nobody", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}])
    assert e.value.status_code == 401 and e.value.code == "unknown_key"


# ---- API keys ----------------------------------------------------------------------------------

@pytest.mark.parametrize("headers", [{"authorization": "Bearer key-ic"}, {"x-api-key": "key-ic"}],
                         ids=["authorization", "x-api-key"])
def test_api_key_in_either_header_maps_to_its_identity(stack, attribution, headers):
    r = _post(stack, headers)
    assert r.status_code == 200, r.text
    rec = attribution.get(r.headers["x-tollgate-request-id"])
    want = _policy_key("ic")
    assert rec["user"] == "ic@example.com" and rec["email"] == want["email"]
    assert rec["groups"] == want["groups"] and rec["team"] == want["team"] and rec["auth_source"] == "api_key:ic"


def test_api_keys_through_both_sdks(stack, attribution):
    oai = openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key="key-ic", max_retries=0)  # authorization
    raw = oai.chat.completions.with_raw_response.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}])
    assert attribution.get(raw.headers["x-tollgate-request-id"])["user"] == "ic@example.com"
    claude = anthropic.Anthropic(base_url=stack.base_url, api_key="key-ic", max_retries=0)  # x-api-key
    raw = claude.messages.with_raw_response.create(model="claude-sonnet-4-6", max_tokens=10,
                                                   messages=[{"role": "user", "content": "x"}])
    assert raw.headers["x-fake-api-key"] == FAKE_GATEWAY_KEY
    assert attribution.get(raw.headers["x-tollgate-request-id"])["user"] == "ic@example.com"


# ---- service tokens --------------------------------------------------------------------------

def test_service_token_headers_map_to_the_service_identity(stack, attribution):
    r = _post(stack, SERVICE_HEADERS)
    assert r.status_code == 200, r.text
    _assert_no_identity_headers_upstream(r)  # neither client id nor secret went upstream
    request_id = r.headers["x-tollgate-request-id"]
    rec = attribution.get(request_id)
    assert rec["user"] == "service:code-review-bot" and rec["team"] == "platform" and rec["app"] == "code-review"
    assert rec["service_token"] == "code-review-bot" and rec["auth_source"] == "service_token"
    line = _access_line(stack, request_id)
    assert line["user"] == "service:code-review-bot" and line["service_token"] == "code-review-bot"
    assert line["app"] == "code-review" and line["auth_source"] == "service_token"


def test_service_token_wrong_secret_is_401_bad_secret(stack, attribution):
    r = _post(stack, {**SERVICE_HEADERS, "cf-access-client-secret": "not-the-secret"})
    err = _openai_error(r, 401, "bad_secret")
    assert "secret" in err["message"] and "not-the-secret" not in err["message"]
    _refusal_record(attribution, r, 401, "bad_secret")


@pytest.mark.parametrize("headers, code", [
    ({"cf-access-client-id": "nobody.access", "cf-access-client-secret": "bot-secret"}, "bad_secret"),
    ({"cf-access-client-id": "review-bot.access"}, "malformed"),
])
def test_service_token_unknown_or_incomplete(stack, headers, code):
    _openai_error(_post(stack, headers), 401, code)


def test_service_token_failure_does_not_fall_back_to_an_api_key(stack):
    r = _post(stack, {**SERVICE_HEADERS, "cf-access-client-secret": "wrong", "authorization": "Bearer key-ic"})
    _openai_error(r, 401, "bad_secret")


def test_jwt_with_service_token_common_name_maps_to_the_service(stack, idp, attribution):
    token = idp.token({"sub": "", "common_name": "review-bot.access"})
    r = _post(stack, _jwt(token))
    assert r.status_code == 200, r.text
    rec = attribution.get(r.headers["x-tollgate-request-id"])
    assert rec["user"] == "service:code-review-bot" and rec["service_token"] == "code-review-bot"
    assert rec["team"] == "platform" and rec["app"] == "code-review" and rec["auth_source"] == "jwt:test-idp"


# ---- anti-spoofing ---------------------------------------------------------------------------

SPOOF = {"x-tollgate-upstream": "openai", "x-tollgate-metadata": json.dumps({"team": "finance", "cost_center": "x"}),
         "x-tollgate-user": "ceo", "x-tollgate-request-id": "forged"}


@pytest.mark.parametrize("path, model", [(CHAT, "gpt-4o"), (MESSAGES, "claude-sonnet-4-6")], ids=["openai", "anthropic"])
@pytest.mark.parametrize("cred", [{"authorization": "Bearer key-ic"}, {"x-api-key": "key-ic"}],
                         ids=["authorization", "x-api-key"])
def test_spoofed_gateway_headers_gain_nothing(stack, attribution, path, model, cred):
    r = _post(stack, {**SPOOF, **cred}, model=model, path=path)
    # Still routed to the fake provider (x-tollgate-upstream: openai would go to api.openai.com).
    assert r.status_code == 200, r.text
    assert r.headers["x-fake-model"] == model
    assert r.headers["x-tollgate-request-id"] != "forged"
    rec = attribution.get(r.headers["x-tollgate-request-id"])
    assert rec["provider"] == "fake"
    assert rec["user"] == "ic@example.com" and rec["team"] == "web" and rec["auth_source"] == "api_key:ic"
    assert "cost_center" not in rec

    _assert_no_identity_headers_upstream(r)
    names = _header_names(r)
    if path == MESSAGES:  # Anthropic wire: the gateway key in x-api-key, no authorization at all
        assert r.headers["x-fake-api-key"] == FAKE_GATEWAY_KEY
        assert "authorization" not in names and r.headers["x-fake-authorization"] == ""
    else:  # OpenAI wire: the gateway key in authorization, the client's x-api-key gone
        assert r.headers["x-fake-authorization"] == f"Bearer {FAKE_GATEWAY_KEY}"
        assert "x-api-key" not in names and r.headers["x-fake-api-key"] == ""
    assert "key-ic" not in r.headers["x-fake-authorization"] + r.headers["x-fake-api-key"]


def test_spoofed_headers_with_a_jwt_and_every_credential_are_all_stripped(stack, idp, attribution):
    token = idp.token({"sub": "jwt-spoofer", "custom": {"team": "research"}})
    r = _post(stack, {**SPOOF, **_jwt(token), "x-api-key": "key-senior", "authorization": "Bearer key-alice"})
    assert r.status_code == 200, r.text
    rec = attribution.get(r.headers["x-tollgate-request-id"])
    assert (rec["user"], rec["team"]) == ("jwt-spoofer", "research")
    _assert_no_identity_headers_upstream(r)
    assert "x-api-key" not in _header_names(r)
    assert r.headers["x-fake-authorization"] == f"Bearer {FAKE_GATEWAY_KEY}"


def test_other_cloudflare_access_identity_headers_do_not_reach_the_provider(stack):
    r = _post(stack, {"x-api-key": "key-ic", "cf-access-authenticated-user-email": "ceo@example.com"})
    assert r.status_code == 200, r.text
    _assert_no_identity_headers_upstream(r)


def test_trusted_metadata_cannot_override_protected_attributes(stack, attribution):
    """Even a source trusted for x-tollgate-metadata (the budget tests' bot) can't set who it is."""
    meta = {"user": "ceo", "team": "finance", "groups": ["admins"], "source": "service_token", "suite": "none"}
    r = _post(stack, {"authorization": "Bearer key-budget", "x-tollgate-metadata": json.dumps(meta)})
    assert r.status_code == 200, r.text
    rec = attribution.get(r.headers["x-tollgate-request-id"])
    want = _policy_key("budget-bot")
    assert (rec["user"], rec["team"], rec["auth_source"]) == (want["user"], want["team"], "api_key:budget-bot")
    assert rec["groups"] == want.get("groups", [])
    _assert_no_identity_headers_upstream(r)


# ---- model access by identity ----------------------------------------------------------------

def test_intern_may_not_use_gpt_4o(stack, attribution):
    r = _post(stack, {"authorization": "Bearer key-intern"}, model="gpt-4o")
    err = _openai_error(r, 403, "model_not_allowed")
    assert err["type"] == "permission_error" and err["param"] == "model"
    assert set(err["allowed_models"]) == INTERN_ALLOWED
    assert "gpt-4o`" in err["message"]
    for m in INTERN_ALLOWED:
        assert m in err["message"]
    rec = attribution.get(r.headers["x-tollgate-request-id"])
    assert rec["status"] == 403 and rec["error_code"] == "model_not_allowed" and rec["decision"] == "refused"
    assert rec["user"] == "intern@example.com" and rec["model_requested"] == "gpt-4o" and rec["cost_usd"] == 0


def test_intern_refusal_through_the_sdk(stack):
    client = openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key="key-intern", max_retries=0)
    with pytest.raises(openai.PermissionDeniedError) as e:
        client.chat.completions.create(model="gpt-4.1", messages=[{"role": "user", "content": "x"}])
    assert e.value.status_code == 403 and e.value.code == "model_not_allowed"


@pytest.mark.parametrize("model", sorted(INTERN_ALLOWED))
def test_intern_may_use_allowed_models(stack, attribution, model):
    client = openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key="key-intern", max_retries=0)
    raw = client.chat.completions.with_raw_response.create(model=model, messages=[{"role": "user", "content": "x"}])
    assert raw.parse().model == model
    rec = attribution.get(raw.headers["x-tollgate-request-id"])
    assert rec["user"] == "intern@example.com" and rec["model_served"] == model and rec["status"] == 200


def test_intern_refusal_on_anthropic_path_has_anthropic_shape(stack, attribution):
    r = _post(stack, {"x-api-key": "key-intern"}, model="claude-sonnet-4-6", path=MESSAGES)
    assert r.status_code == 403, r.text
    body = r.json()
    assert body["type"] == "error" and set(body) == {"type", "error"}
    err = body["error"]
    assert err["type"] == "permission_error" and err["code"] == "model_not_allowed"
    assert "claude-sonnet-4-6" in err["message"] and set(err["allowed_models"]) == INTERN_ALLOWED
    assert attribution.get(r.headers["x-tollgate-request-id"])["error_code"] == "model_not_allowed"
    claude = anthropic.Anthropic(base_url=stack.base_url, api_key="key-intern", max_retries=0)
    with pytest.raises(anthropic.PermissionDeniedError):
        claude.messages.create(model="claude-sonnet-4-6", max_tokens=5, messages=[{"role": "user", "content": "x"}])


def test_jwt_intern_group_is_restricted_too(stack, idp):
    token = idp.token({"sub": "jwt-intern", "custom": {"groups": ["interns"], "team": "web"}})
    _openai_error(_post(stack, _jwt(token), model="gpt-4o"), 403, "model_not_allowed")
    assert _post(stack, _jwt(token), model="gpt-4o-mini").status_code == 200


def test_service_tokens_are_denied_o1(stack, idp, attribution):
    r = _post(stack, SERVICE_HEADERS, model="o1")
    err = _openai_error(r, 403, "model_not_allowed")
    assert "o1" not in err["allowed_models"] and "gpt-4o" in err["allowed_models"]
    assert attribution.get(r.headers["x-tollgate-request-id"])["user"] == "service:code-review-bot"
    assert _post(stack, SERVICE_HEADERS, model="gpt-4o").status_code == 200
    # The same rule holds when the service token arrives as a JWT (common_name).
    token = idp.token({"common_name": "review-bot.access"})
    _openai_error(_post(stack, _jwt(token), model="o1"), 403, "model_not_allowed")


@pytest.mark.parametrize("key", ["key-ic", "key-senior", "key-alice", "key-ml", "demo"])
def test_unrestricted_identities_may_use_any_priced_model(stack, key):
    for model in ("gpt-4o", "o1"):
        assert _post(stack, {"authorization": f"Bearer {key}"}, model=model).status_code == 200
