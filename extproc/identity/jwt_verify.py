"""Verifying one issuer's JWTs and mapping their claims to an Identity."""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any, NamedTuple

import jwt
import orjson

from .jwks import JwksSource, KeyRef
from .model import AuthError, Identity
from .policy import CORE_ATTRIBUTES, JwtIssuerConfig, ServiceTokenEntry

MAX_TOKEN_CHARS = 16 * 1024
_B64URL = re.compile(r"^[A-Za-z0-9_-]*$")
_SHOWABLE_ALG = re.compile(r"^[A-Za-z0-9]{1,10}$")

# Signature, iss and aud are checked by PyJWT; exp/nbf/iat by us, against the injected clock.
_PYJWT = jwt.PyJWT()
_DECODE_OPTIONS: dict[str, Any] = {
    "verify_signature": True,
    "verify_exp": False,
    "verify_nbf": False,
    "verify_iat": False,
    "verify_iss": True,
    "verify_aud": True,
    "require": [],
}

_MISSING = object()


class Verified(NamedTuple):
    """A verified token: who it is, its exp, and which JWKS key verified it. The key is what
    lets a cached verification be revoked when the issuer withdraws that key."""

    identity: Identity
    exp: float
    key: KeyRef


def _b64url_json(segment: str) -> Any:
    if not segment or not _B64URL.match(segment):
        return _MISSING
    try:
        raw = base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
        return orjson.loads(raw)
    except (binascii.Error, ValueError):
        return _MISSING


def parse_jwt_header(value: str) -> dict[str, Any] | None:
    """The JOSE header if `value` looks like a compact JWS (three base64url segments, the first a
    JSON object), else None. Nothing is verified here."""
    if len(value) > MAX_TOKEN_CHARS or value.count(".") != 2:
        return None
    h, p, s = value.split(".")
    if not p or not _B64URL.match(p) or not _B64URL.match(s):
        return None
    header = _b64url_json(h)
    return header if isinstance(header, dict) else None


def unverified_payload(token: str) -> dict[str, Any] | None:
    payload = _b64url_json(token.split(".")[1])
    return payload if isinstance(payload, dict) else None


def claim_at(obj: Any, path: str) -> Any:
    """Claim by path: a literal key first (namespaced claims like "https://x.example/groups"
    contain dots), then nested objects split at dots."""
    if not isinstance(obj, Mapping):
        return _MISSING
    if path in obj:
        return obj[path]
    i = path.find(".")
    while i != -1:
        head = obj.get(path[:i], _MISSING)
        if isinstance(head, Mapping):
            found = claim_at(head, path[i + 1 :])
            if found is not _MISSING:
                return found
        i = path.find(".", i + 1)
    return _MISSING


def _as_str(v: Any) -> str | None:
    if isinstance(v, str):
        return v
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return str(v)
    return None


def _as_list(v: Any) -> list[str]:
    if v is _MISSING or v is None:
        return []
    if isinstance(v, (list, tuple)):
        return [s for s in (_as_str(x) for x in v) if s is not None]
    s = _as_str(v)
    return [s] if s is not None else []


def _num(payload: dict[str, Any], claim: str, name: str) -> float | None:
    if claim not in payload:
        return None
    v = payload[claim]
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise AuthError(401, "malformed", f"token claim {claim} must be a number (issuer {name!r})")
    return float(v)


class IssuerVerifier:
    def __init__(
        self,
        cfg: JwtIssuerConfig,
        source: JwksSource,
        clock: Callable[[], float],
        service_tokens: Mapping[str, ServiceTokenEntry],
    ) -> None:
        self.cfg = cfg
        self.name = cfg.name
        self.source = source
        self._clock = clock
        self._service_tokens = service_tokens  # client_id and name -> entry
        self.verified = 0  # full signature verifications, for tests and metrics

    def __repr__(self) -> str:
        return f"IssuerVerifier(name={self.name!r}, header={self.cfg.header!r})"

    def accepts_issuer(self, iss: Any) -> bool:
        return isinstance(iss, str) and iss in self.cfg.issuers

    def _fail(self, check: str, what: str, status: int = 401) -> AuthError:
        return AuthError(status, check, f"{what} (issuer {self.name!r})")

    async def verify(self, token: str, header: dict[str, Any]) -> Verified:
        """Verify `token` (whose unverified JOSE header is `header`); return the identity, exp and
        the key that verified it."""
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in self.cfg.algorithms:
            shown = f" {alg!r}" if isinstance(alg, str) and _SHOWABLE_ALG.match(alg) else ""
            raise self._fail(
                "algorithm",
                f"token algorithm{shown} is not allowed; allowed: {', '.join(self.cfg.algorithms)}",
            )
        kid = header.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise self._fail("malformed", "token kid header must be a string")

        keys = await self.source.current()
        if kid is not None and not keys.has_kid(kid):
            if await self.source.refetch_for_unknown_kid():
                keys = self.source.keyset or keys
            if not keys.has_kid(kid):
                raise self._fail("unknown_kid", "token was signed with a key (kid) not in the issuer's JWKS")
        candidates = keys.candidates(kid, alg, self.name)
        if not candidates:
            raise self._fail("unknown_kid", f"token has no kid and no key in the JWKS fits {alg}")

        payload: dict[str, Any] | None = None
        used: KeyRef | None = None
        for i, (key, ref) in enumerate(candidates):
            try:
                payload = _PYJWT.decode(
                    token,
                    key=key,
                    algorithms=[alg],
                    audience=self.cfg.audiences,
                    issuer=self.cfg.issuers,
                    options=_DECODE_OPTIONS,  # type: ignore[arg-type]
                )
                used = ref
                break
            except jwt.InvalidSignatureError:
                if i == len(candidates) - 1:
                    raise self._fail("signature", "token signature does not verify") from None
            except jwt.PyJWTError as e:
                raise self._map(e) from None
        assert payload is not None and used is not None
        self.verified += 1

        now = self._clock()
        leeway = self.cfg.leeway_seconds
        exp = _num(payload, "exp", self.name)
        if exp is None:
            raise self._fail("missing_claim", "token has no exp claim; it is required")
        if exp <= now - leeway:
            raise self._fail("expired", "token has expired (exp)")
        nbf = _num(payload, "nbf", self.name)
        if nbf is not None and nbf > now + leeway:
            raise self._fail("not_yet_valid", "token is not valid yet (nbf)")
        iat = _num(payload, "iat", self.name)
        if iat is not None and iat > now + leeway:
            raise self._fail("not_yet_valid", "token was issued in the future (iat)")

        return Verified(self._identity(payload), exp, used)

    def _map(self, e: jwt.PyJWTError) -> AuthError:
        if isinstance(e, jwt.InvalidAlgorithmError):
            return self._fail("algorithm", "token algorithm is not allowed")
        if isinstance(e, jwt.InvalidSignatureError):
            return self._fail("signature", "token signature does not verify")
        if isinstance(e, jwt.ExpiredSignatureError):
            return self._fail("expired", "token has expired (exp)")
        if isinstance(e, jwt.ImmatureSignatureError):
            return self._fail("not_yet_valid", "token is not valid yet")
        if isinstance(e, jwt.InvalidIssuerError):
            return self._fail("issuer", f"token issuer (iss) is not one of {self.cfg.issuers}")
        if isinstance(e, jwt.InvalidAudienceError):
            return self._fail("audience", "token audience (aud) is not one this gateway accepts")
        if isinstance(e, jwt.MissingRequiredClaimError):
            if e.claim == "iss":
                return self._fail("issuer", "token has no issuer (iss) claim")
            if e.claim == "aud":
                return self._fail("audience", "token has no audience (aud) claim")
            return self._fail("missing_claim", f"token has no {e.claim} claim; it is required")
        if isinstance(e, jwt.InvalidKeyError):
            return self._fail("signature", "the issuer's key can't verify this token")
        return self._fail("malformed", f"token is malformed ({type(e).__name__})")

    def _identity(self, payload: dict[str, Any]) -> Identity:
        claims = self.cfg.claims
        core: dict[str, Any] = {}
        extra: dict[str, str | list[str]] = {}
        for attr, path in claims.items():
            v = claim_at(payload, path)
            if v is _MISSING or v is None:
                continue
            if attr == "groups":
                core["groups"] = tuple(_as_list(v))
            elif attr in CORE_ATTRIBUTES:
                s = _as_str(v)
                if s is not None and s != "":
                    core[attr] = s
            elif isinstance(v, (list, tuple)):
                extra[attr] = _as_list(v)
            else:
                s = _as_str(v)
                if s is not None:
                    extra[attr] = s

        source = f"jwt:{self.name}"
        if self.cfg.service_token_claim:
            st = _as_str(claim_at(payload, self.cfg.service_token_claim))
            if st:
                entry = self._service_tokens.get(st)
                if entry is None:
                    return self._from_claims(core, extra, source, user=f"service:{st}", service_token=st)
                return Identity(
                    user=f"service:{entry.name}",
                    email=entry.email or core.get("email"),
                    groups=tuple(entry.groups) or core.get("groups", ()),
                    team=entry.team or core.get("team"),
                    app=entry.app or core.get("app"),
                    service_token=entry.name,
                    source=source,
                    extra=MappingProxyType({**extra, **entry.attributes}),
                )

        user = core.get("user")
        if not user:
            raise self._fail(
                "missing_claim",
                f"token has no usable {claims['user']!r} claim (mapped to user)",
            )
        return self._from_claims(core, extra, source, user=user, service_token=None)

    @staticmethod
    def _from_claims(core: dict[str, Any], extra: dict[str, Any], source: str, *, user: str,
                  service_token: str | None) -> Identity:
        """An identity whose attributes all come from the token's mapped claims."""
        return Identity(
            user=user,
            email=core.get("email"),
            groups=core.get("groups", ()),
            team=core.get("team"),
            app=core.get("app"),
            service_token=service_token,
            source=source,
            extra=MappingProxyType(extra),
        )
