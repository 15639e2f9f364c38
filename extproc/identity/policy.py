"""The `identity:` section of a Tollgate policy, as pydantic models.

Every model forbids unknown keys, so a typo in the policy fails validation instead of silently
turning a check off. Secret hashes are kept out of reprs.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from typing import Annotated, ClassVar
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

# Asymmetric algorithms only: a JWKS publishes public keys, so an HMAC "key" taken from it is
# public too, and "none" is no signature at all.
ALLOWED_ALGORITHMS: frozenset[str] = frozenset(
    {"RS256", "RS384", "RS512", "ES256", "ES384", "EdDSA", "PS256"}
)

# Attribute names with a fixed meaning; everything else a claim maps to lands in Identity.extra.
CORE_ATTRIBUTES: frozenset[str] = frozenset({"user", "email", "groups", "team", "app"})
RESERVED_ATTRIBUTES: frozenset[str] = frozenset({"source", "service_token"})

_HEADER_RE = re.compile(r"^[a-z0-9!#$%&'*+.^_`|~-]+$")
_ATTR_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]*$")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")

AttrValue = str | list[str]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, str_strip_whitespace=True)


def _header_name(value: str, what: str) -> str:
    name = value.strip().lower()
    if not name or not _HEADER_RE.match(name):
        raise ValueError(f"{what} must be an HTTP header name, got {value!r}")
    return name


def _sha256_hex(value: str, what: str) -> str:
    v = value.strip().lower()
    if not _SHA256_RE.match(v):
        # Never echo the value: it may be the secret itself, pasted by mistake.
        raise ValueError(
            f"{what} must be the 64-character hex sha256 of the secret "
            "(make it with `tollgate hash-key`), not the secret itself"
        )
    return v


class _Redacted:
    """Stands in for a rejected secret-hash value so pydantic's error text (which quotes the
    input) can't show a plaintext secret pasted where its hash belongs."""

    def __repr__(self) -> str:
        return "<redacted>"


def _redact_bad_hash(data: object, fld: str, known: Iterable[str]) -> object:
    """Redact a malformed hash and the values of unknown keys (e.g. `key: sk-...`)."""
    if not isinstance(data, dict):
        return data
    out = {k: (v if k in known else _Redacted()) for k, v in data.items()}
    if fld in out:
        v = out[fld]
        if not (isinstance(v, str) and _SHA256_RE.match(v.strip().lower())):
            out[fld] = _Redacted()
    return out


def _check_attributes(attrs: dict[str, AttrValue], what: str) -> dict[str, AttrValue]:
    for k in attrs:
        if not _ATTR_RE.match(k):
            raise ValueError(f"{what}: attribute name {k!r} must match {_ATTR_RE.pattern}")
        if k in CORE_ATTRIBUTES or k in RESERVED_ATTRIBUTES:
            raise ValueError(
                f"{what}: {k!r} is not a custom attribute; set it with its own key "
                f"(user, email, groups, team, app), source/service_token are set by Tollgate"
            )
    return attrs


class JwtIssuerConfig(_Model):
    """One JWT issuer: where the token comes from, how to verify it, how claims map to attributes."""

    name: Annotated[str, Field(min_length=1)]
    header: str = "cf-access-jwt-assertion"
    issuers: Annotated[list[str], Field(min_length=1)]
    audiences: Annotated[list[str], Field(min_length=1)]
    jwks_url: str | None = None
    jwks_file: str | None = None
    algorithms: Annotated[list[str], Field(min_length=1)] = ["RS256"]
    leeway_seconds: Annotated[float, Field(ge=0, le=600)] = 30
    jwks_refresh_floor_seconds: Annotated[float, Field(ge=0)] = 60
    jwks_cache_seconds: Annotated[float, Field(gt=0)] = 3600
    # How long a verified token is served from the cache at most (never past its exp). A cached
    # token is also dropped as soon as a JWKS refresh no longer holds the key that verified it;
    # this bound covers what that can't see (e.g. an IdP that can't be reached). 0: no caching.
    token_cache_seconds: Annotated[float, Field(ge=0)] = 300
    claims: dict[str, str] = {"user": "sub", "email": "email"}
    service_token_claim: str | None = None

    @field_validator("header")
    @classmethod
    def _v_header(cls, v: str) -> str:
        return _header_name(v, "jwt.header")

    @field_validator("issuers", "audiences")
    @classmethod
    def _v_nonempty_strings(cls, v: list[str]) -> list[str]:
        if any(not s for s in v):
            raise ValueError("entries must be non-empty strings")
        return v

    @field_validator("algorithms")
    @classmethod
    def _v_algorithms(cls, v: list[str]) -> list[str]:
        for alg in v:
            if alg.lower() == "none":
                raise ValueError("algorithm 'none' is never accepted: it means an unsigned token")
            if alg.upper().startswith("HS"):
                raise ValueError(
                    f"algorithm {alg!r} is never accepted: HMAC keys are shared secrets and "
                    "can't be published in a JWKS (use RS256, ES256, EdDSA, ...)"
                )
            if alg not in ALLOWED_ALGORITHMS:
                raise ValueError(
                    f"algorithm {alg!r} is not supported; use one of "
                    f"{', '.join(sorted(ALLOWED_ALGORITHMS))} (names are case-sensitive)"
                )
        return list(dict.fromkeys(v))

    @field_validator("jwks_url")
    @classmethod
    def _v_jwks_url(cls, v: str | None) -> str | None:
        if v is None:
            return v
        parts = urlsplit(v)
        if parts.scheme not in ("https", "http") or not parts.hostname:
            raise ValueError(f"jwks_url must be an https:// URL, got {v!r}")
        if parts.scheme == "http" and not _is_loopback(parts.hostname):
            raise ValueError(
                "jwks_url must use https:// (plain http is only allowed for loopback hosts): "
                "whoever can alter the JWKS in transit can mint tokens"
            )
        return v

    @field_validator("claims")
    @classmethod
    def _v_claims(cls, v: dict[str, str]) -> dict[str, str]:
        out: dict[str, str] = {}
        for attr, path in v.items():
            if not _ATTR_RE.match(attr):
                raise ValueError(f"claims: attribute name {attr!r} must match {_ATTR_RE.pattern}")
            if attr in RESERVED_ATTRIBUTES:
                raise ValueError(f"claims: {attr!r} is set by Tollgate and can't come from a claim")
            if not path or any(not seg for seg in path.split(".")):
                raise ValueError(f"claims.{attr}: claim path {path!r} is empty or has an empty segment")
            out[attr] = path
        out.setdefault("user", "sub")
        return out

    @model_validator(mode="after")
    def _v_jwks_source(self) -> "JwtIssuerConfig":
        if (self.jwks_url is None) == (self.jwks_file is None):
            raise ValueError(
                f"jwt issuer {self.name!r}: set exactly one of jwks_url or jwks_file"
            )
        return self


class _HashedCredential(_Model):
    """What service tokens and API keys share: a secret kept only as its sha256, and the
    identity attributes it maps to."""

    _hash_field: ClassVar[str]
    _what: ClassVar[str]

    email: str | None = None
    team: str | None = None
    app: str | None = None
    groups: list[str] = []
    attributes: dict[str, AttrValue] = {}

    @model_validator(mode="before")
    @classmethod
    def _redact(cls, data: object) -> object:
        return _redact_bad_hash(data, cls._hash_field, cls.model_fields)

    @field_validator("*", mode="before")
    @classmethod
    def _v_hash(cls, v: object, info: ValidationInfo) -> object:
        if info.field_name != cls._hash_field:
            return v
        return _sha256_hex(v if isinstance(v, str) else "", cls._hash_field)

    @field_validator("attributes")
    @classmethod
    def _v_attrs(cls, v: dict[str, AttrValue]) -> dict[str, AttrValue]:
        return _check_attributes(v, f"{cls._what} attributes")


class ServiceTokenEntry(_HashedCredential):
    _hash_field = "secret_sha256"
    _what = "service token"

    name: Annotated[str, Field(min_length=1)]
    client_id: Annotated[str, Field(min_length=1)]
    secret_sha256: str = Field(repr=False)


class ServiceTokensConfig(_Model):
    id_header: str = "cf-access-client-id"
    secret_header: str = "cf-access-client-secret"
    tokens: list[ServiceTokenEntry] = []

    @field_validator("id_header", "secret_header")
    @classmethod
    def _v_header(cls, v: str) -> str:
        return _header_name(v, "service_tokens header")

    @model_validator(mode="after")
    def _v_unique(self) -> "ServiceTokensConfig":
        if self.id_header == self.secret_header:
            raise ValueError("service_tokens: id_header and secret_header must differ")
        _unique([t.name for t in self.tokens], "service_tokens.tokens: duplicate name")
        _unique([t.client_id for t in self.tokens], "service_tokens.tokens: duplicate client_id")
        return self


class ApiKeyEntry(_HashedCredential):
    _hash_field = "key_sha256"
    _what = "api key"

    name: Annotated[str, Field(min_length=1)]
    key_sha256: str = Field(repr=False)
    user: str | None = None  # defaults to the key's name


class ApiKeysConfig(_Model):
    headers: Annotated[list[str], Field(min_length=1)] = ["authorization", "x-api-key"]
    keys: list[ApiKeyEntry] = []

    @field_validator("headers")
    @classmethod
    def _v_headers(cls, v: list[str]) -> list[str]:
        return list(dict.fromkeys(_header_name(h, "api_keys.headers entry") for h in v))

    @model_validator(mode="after")
    def _v_unique(self) -> "ApiKeysConfig":
        _unique([k.name for k in self.keys], "api_keys.keys: duplicate name")
        # No value in the message: it would be a key hash.
        if len({k.key_sha256 for k in self.keys}) != len(self.keys):
            raise ValueError("api_keys.keys: two entries have the same key_sha256")
        return self


class AnonymousIdentity(_Model):
    user: Annotated[str, Field(min_length=1)] = "anonymous"
    email: str | None = None
    groups: list[str] = []
    team: str | None = None
    app: str | None = None
    attributes: dict[str, AttrValue] = {}

    @field_validator("attributes")
    @classmethod
    def _v_attrs(cls, v: dict[str, AttrValue]) -> dict[str, AttrValue]:
        return _check_attributes(v, "anonymous attributes")


class IdentityConfig(_Model):
    """The whole `identity:` section. Every part is optional; with nothing configured (and no
    anonymous identity) every request is refused as "missing"."""

    jwt: list[JwtIssuerConfig] = []
    service_tokens: ServiceTokensConfig | None = None
    api_keys: ApiKeysConfig | None = None
    anonymous: AnonymousIdentity | None = None

    @model_validator(mode="after")
    def _v_cross(self) -> "IdentityConfig":
        _unique([j.name for j in self.jwt], "jwt: duplicate issuer name")
        if self.service_tokens is not None:
            st = {self.service_tokens.id_header, self.service_tokens.secret_header}
            others = {j.header for j in self.jwt} | set(self.api_keys.headers if self.api_keys else ())
            clash = st & others
            if clash:
                raise ValueError(
                    f"service_tokens headers {sorted(clash)} are also used for JWTs or API keys"
                )
        return self


def _unique(values: list[str], msg: str) -> None:
    seen: set[str] = set()
    for v in values:
        if v in seen:
            raise ValueError(f"{msg} {v!r}")
        seen.add(v)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
