"""Authenticator: request headers -> Identity, or AuthError naming the check that failed.

Order: service-token headers, JWT issuers (in policy order), API keys, anonymous. A credential
that is presented and fails is refused; it never falls through to a weaker source.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import time
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

from .jwks import HttpJwksFetcher, JwksFetcher, JwksSource, KeyRef
from .jwt_verify import IssuerVerifier, parse_jwt_header, unverified_payload
from .model import AuthError, Identity
from .policy import IdentityConfig, ServiceTokenEntry

log = logging.getLogger("tollgate.identity")

DEFAULT_TOKEN_CACHE_SIZE = 10_000

# Headers a JWT commonly arrives in; seeing one there when no issuer reads it is a config or
# client mistake worth a precise error ("wrong_header") rather than "missing".
_COMMON_JWT_HEADERS = ("authorization", "cf-access-jwt-assertion", "x-api-key")


def _header(headers: Mapping[str, str], name: str) -> str | None:
    v = headers.get(name)
    if v is None:
        return None
    v = v.strip()
    return v or None


def _bearer(value: str) -> str | None:
    parts = value.split(None, 1)
    if len(parts) == 2 and parts[0].lower() == "bearer":
        tok = parts[1].strip()
        return tok or None
    return None


_NO_SECRET = "0" * 64  # compared against when the client id is unknown, so both failures take as long


def _sha256_hex(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


class Authenticator:
    def __init__(
        self,
        config: IdentityConfig,
        *,
        clock: Callable[[], float] = time.time,
        http: JwksFetcher | None = None,
        token_cache_size: int = DEFAULT_TOKEN_CACHE_SIZE,
    ) -> None:
        self._config = config
        self._clock = clock
        self._owned_fetcher: HttpJwksFetcher | None = None
        if http is None and any(j.jwks_url for j in config.jwt):
            http = self._owned_fetcher = HttpJwksFetcher()

        # --- service tokens
        st = config.service_tokens
        self._st_cfg = st
        self._st_by_client_id: dict[str, ServiceTokenEntry] = {}
        self._st_identity: dict[str, Identity] = {}
        lookup: dict[str, ServiceTokenEntry] = {}
        if st is not None:
            for e in st.tokens:
                self._st_by_client_id[e.client_id] = e
                self._st_identity[e.name] = Identity(
                    user=f"service:{e.name}",
                    email=e.email,
                    groups=tuple(e.groups),
                    team=e.team,
                    app=e.app,
                    service_token=e.name,
                    source="service_token",
                    extra=MappingProxyType(dict(e.attributes)),
                )
            # For service_token_claim: Cloudflare puts the client id in common_name; a name works too.
            lookup = {e.name: e for e in st.tokens} | self._st_by_client_id

        # --- JWT issuers, grouped by header in policy order
        self._issuers: list[IssuerVerifier] = []
        self._jwt_headers: dict[str, list[IssuerVerifier]] = {}
        for j in config.jwt:
            src = JwksSource(
                issuer_name=j.name,
                url=j.jwks_url,
                file=j.jwks_file,
                fetcher=http or _no_fetcher,
                clock=clock,
                cache_seconds=j.jwks_cache_seconds,
                floor_seconds=j.jwks_refresh_floor_seconds,
            )
            v = IssuerVerifier(j, src, clock, lookup)
            self._issuers.append(v)
            self._jwt_headers.setdefault(j.header, []).append(v)

        # --- API keys: sha256 hex -> identity
        ak = config.api_keys
        self._api_headers: tuple[str, ...] = tuple(ak.headers) if ak is not None else ()
        self._api_keys: dict[str, tuple[str, Identity]] = {}
        if ak is not None:
            for k in ak.keys:
                self._api_keys[k.key_sha256] = (
                    k.key_sha256,
                    Identity(
                        user=k.user or k.name,
                        email=k.email,
                        groups=tuple(k.groups),
                        team=k.team,
                        app=k.app,
                        service_token=None,
                        source=f"api_key:{k.name}",
                        extra=MappingProxyType(dict(k.attributes)),
                    ),
                )

        an = config.anonymous
        self._anonymous: Identity | None = None
        if an is not None:
            self._anonymous = Identity(
                user=an.user,
                email=an.email,
                groups=tuple(an.groups),
                team=an.team,
                app=an.app,
                service_token=None,
                source="anonymous",
                extra=MappingProxyType(dict(an.attributes)),
            )

        st_headers = {st.id_header, st.secret_header} if st is not None else set()
        self._wrong_header_candidates = tuple(
            h
            for h in dict.fromkeys((*_COMMON_JWT_HEADERS, *self._api_headers))
            if h not in self._jwt_headers and h not in st_headers
        )
        self._credential_headers = frozenset(
            {*self._jwt_headers, *self._api_headers, *st_headers}
        )
        self._how_to = self._describe_accepted()

        # Verified JWTs: (issuer name, sha256(token)) -> (expires_at, identity, key). expires_at
        # is min(exp, verified + token_cache_seconds); key is the JWKS key that verified it, and
        # a hit counts only while the issuer's current key set still holds that key, so a key
        # withdrawn from the JWKS revokes its tokens at the next refresh, not at their exp.
        # Dicts keep insertion order, so the first key is the oldest entry.
        self._token_cache: dict[tuple[str, bytes], tuple[float, Identity, KeyRef]] = {}
        self._token_cache_size = max(0, token_cache_size)
        self._cache_hits = 0

    def __repr__(self) -> str:
        return (
            f"Authenticator(jwt={[v.name for v in self._issuers]}, "
            f"service_tokens={len(self._st_by_client_id)}, api_keys={len(self._api_keys)}, "
            f"anonymous={self._anonymous is not None})"
        )

    # ------------------------------------------------------------------ public

    def credential_headers(self) -> frozenset[str]:
        """Every identity-bearing header this config reads; strip them before going upstream."""
        return self._credential_headers

    def is_tollgate_credential(self, name: str, value: str) -> bool:
        """Whether a header value is one of Tollgate's own credentials (a JWT an issuer here reads
        from that header, or a Tollgate API key): such a value never goes upstream, whoever sent it."""
        token = (_bearer(value) or "") if name == "authorization" else value
        if not token:
            return False
        if name in self._jwt_headers and parse_jwt_header(token) is not None:
            return True
        return name in self._api_headers and self._match_api_key(token) is not None

    def headers_to_strip(self, identity: Identity) -> frozenset[str]:
        """The credential headers to remove before the request goes upstream.

        All of them when an API key identified the caller. Otherwise the API-key headers
        (`authorization`, `x-api-key`) are not Tollgate's credential for this request: they may
        carry the client's own provider key, for providers configured to pass it through.
        """
        if identity.source.startswith("api_key"):
            return self._credential_headers
        return self._credential_headers - frozenset(self._api_headers)

    def stats(self) -> dict[str, int]:
        """Counters for metrics: full JWT verifications, verified-token cache hits, JWKS fetches."""
        return {
            "jwt_verified": sum(v.verified for v in self._issuers),
            "jwt_cache_hits": self._cache_hits,
            "jwt_cache_size": len(self._token_cache),
            "jwks_fetches": sum(v.source.fetch_count for v in self._issuers),
        }

    async def authenticate(self, headers: Mapping[str, str]) -> Identity:
        """`headers`: lower-case names -> values. Returns the Identity or raises AuthError."""
        # 1. service tokens
        st = self._st_cfg
        if st is not None:
            cid = _header(headers, st.id_header)
            secret = _header(headers, st.secret_header)
            if cid is not None or secret is not None:
                return self._service_token(cid, secret)

        # 2. JWT issuers
        for name, verifiers in self._jwt_headers.items():
            raw = _header(headers, name)
            if raw is None:
                continue
            shared = name in self._api_headers
            token = _bearer(raw) if name == "authorization" else raw
            if token is None:
                if shared:
                    continue  # the API-key step reports the malformed authorization header
                raise AuthError(401, "malformed", "authorization header must be 'Bearer <JWT>'")
            jose = parse_jwt_header(token)
            if jose is None:
                if shared:
                    continue  # not a JWT: an API key in a header both accept
                raise AuthError(401, "malformed", f"the {name} header does not hold a JWT")
            return await self._jwt(name, verifiers, token, jose)

        # 3. a JWT in a header no issuer reads
        if self._issuers:
            for name in self._wrong_header_candidates:
                raw = _header(headers, name)
                if raw is None:
                    continue
                token = (_bearer(raw) or "") if name == "authorization" else raw
                if not token or parse_jwt_header(token) is None:
                    continue
                if name in self._api_headers and self._match_api_key(token) is not None:
                    continue  # an API key that happens to be JWT-shaped
                expected = " or ".join(self._jwt_headers)
                raise AuthError(
                    401,
                    "wrong_header",
                    f"a JWT was sent in the {name} header, but JWTs are only read from {expected}",
                )

        # 4. API keys
        for name in self._api_headers:
            raw = _header(headers, name)
            if raw is None:
                continue
            key = _bearer(raw) if name == "authorization" else raw
            if key is None:
                raise AuthError(401, "malformed", "authorization header must be 'Bearer <API key>'")
            ident = self._match_api_key(key)
            if ident is None:
                raise AuthError(401, "unknown_key", f"the API key in the {name} header is not recognised")
            return ident

        # 5. anonymous
        if self._anonymous is not None:
            return self._anonymous
        raise AuthError(401, "missing", f"no credentials: send {self._how_to}")

    async def close(self) -> None:
        for v in self._issuers:
            await v.source.close()
        if self._owned_fetcher is not None:
            await self._owned_fetcher.close()

    # ------------------------------------------------------------------ steps

    def _service_token(self, client_id: str | None, secret: str | None) -> Identity:
        st = self._st_cfg
        assert st is not None
        if client_id is None or secret is None:
            missing = st.secret_header if client_id is not None else st.id_header
            raise AuthError(401, "malformed", f"service token is incomplete: the {missing} header is missing")
        digest = _sha256_hex(secret)
        entry = self._st_by_client_id.get(client_id)
        # One answer, and the same work, for an unknown client id and a wrong secret: the error
        # must not tell which client ids exist (issue 15, item 9).
        stored = entry.secret_sha256 if entry is not None else _NO_SECRET
        if not hmac.compare_digest(digest, stored) or entry is None:
            raise AuthError(401, "bad_secret", "service token not recognised: unknown client id or wrong secret")
        return self._st_identity[entry.name]

    def _match_api_key(self, key: str) -> Identity | None:
        # The dict lookup is keyed by sha256 of the presented key, which an attacker can't steer
        # towards a stored hash; the final equality is still a constant-time compare.
        digest = _sha256_hex(key)
        hit = self._api_keys.get(digest)
        if hit is None or not hmac.compare_digest(hit[0], digest):
            return None
        return hit[1]

    async def _jwt(
        self, header_name: str, verifiers: list[IssuerVerifier], token: str, jose: dict[str, Any]
    ) -> Identity:
        if len(verifiers) == 1:
            verifier = verifiers[0]
        else:
            # Several issuers read this header: pick by the (unverified) iss; verification follows.
            iss = (unverified_payload(token) or {}).get("iss")
            verifier = next((v for v in verifiers if v.accepts_issuer(iss)), None)
            if verifier is None:
                names = ", ".join(repr(v.name) for v in verifiers)
                raise AuthError(
                    401, "issuer",
                    f"token issuer (iss) is not accepted by any issuer reading {header_name} ({names})",
                )

        ck = (verifier.name, hashlib.sha256(token.encode("utf-8")).digest())
        hit = self._token_cache.get(ck)
        if hit is not None:
            expires_at, ident, key = hit
            keys = verifier.source.cached_keyset()
            if self._clock() < expires_at and keys is not None and key in keys.key_refs:
                self._cache_hits += 1
                return ident
            # Expired, past its cache lifetime, or its key left the JWKS: verify in full, which
            # refuses it with the ordinary error (expired, unknown_kid, signature, ...).
            del self._token_cache[ck]

        ident, exp, key = await verifier.verify(token, jose)
        now = self._clock()
        expires_at = min(exp, now + verifier.cfg.token_cache_seconds)
        if self._token_cache_size and now < expires_at:
            cache = self._token_cache
            cache.pop(ck, None)
            cache[ck] = (expires_at, ident, key)
            while len(cache) > self._token_cache_size:
                del cache[next(iter(cache))]
        return ident

    def _describe_accepted(self) -> str:
        ways: list[str] = []
        for name in self._jwt_headers:
            ways.append("authorization: Bearer <JWT>" if name == "authorization" else f"a JWT in {name}")
        if self._st_cfg is not None:
            ways.append(f"a service token in {self._st_cfg.id_header} + {self._st_cfg.secret_header}")
        for name in self._api_headers:
            ways.append("authorization: Bearer <API key>" if name == "authorization" else f"an API key in {name}")
        if not ways:
            return "nothing: this gateway has no identity sources configured"
        return ", or ".join(ways)


async def _no_fetcher(url: str) -> Any:  # only reachable for file-based issuers, which never call it
    raise RuntimeError("no JWKS fetcher configured")
