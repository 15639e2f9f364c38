"""JWKS sources: an issuer's public keys from a URL (aiohttp) or a file, cached and refetched.

* Cached for `jwks_cache_seconds`; once stale, a background refresh starts and requests keep
  using the old keys meanwhile (no latency spike on the hot path every hour).
* A token whose `kid` is unknown triggers one refetch, no more often than
  `jwks_refresh_floor_seconds` (so garbage kids can't make us hammer the IdP).
* Concurrent callers share one in-flight fetch.
* Only asymmetric signing keys are kept: `kty: oct` (HMAC) keys and `use: enc` keys are dropped.
* Every kept key has a `KeyRef` (kid + RFC 7638 thumbprint of its public material), so a cached
  verification can be checked against the current key set in one set lookup: withdrawing a key
  from the JWKS revokes the tokens it verified at the next refresh (issue 15, item 3).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, NamedTuple

import jwt
import orjson

from .model import AuthError

log = logging.getLogger("tollgate.identity")

# url -> the parsed JSON document. Injectable so tests and the integrator can swap the transport.
JwksFetcher = Callable[[str], Awaitable[Any]]

MAX_JWKS_BYTES = 1 << 20


class JwksFetchError(Exception):
    """The JWKS could not be fetched or parsed. The message names the source, never key material."""


class HttpJwksFetcher:
    """Default fetcher: one lazily created aiohttp session, short timeouts, size-capped bodies."""

    def __init__(self, timeout_seconds: float = 3.0) -> None:
        self._timeout_seconds = timeout_seconds
        self._session: Any = None

    async def __call__(self, url: str) -> Any:
        import aiohttp  # off the import path of callers that inject their own fetcher

        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self._timeout_seconds),
                headers={"accept": "application/json", "user-agent": "tollgate-jwks"},
            )
        try:
            async with self._session.get(url) as resp:
                if resp.status != 200:
                    raise JwksFetchError(f"GET {url} returned HTTP {resp.status}")
                body = await resp.content.read(MAX_JWKS_BYTES + 1)
        except JwksFetchError:
            raise
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
            raise JwksFetchError(f"GET {url} failed: {type(e).__name__}") from None
        return _parse(body, f"JWKS from GET {url}")

    async def close(self) -> None:
        if self._session is not None and not self._session.closed:
            await self._session.close()
        self._session = None


def _read_file(path: str) -> Any:
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise JwksFetchError(f"can't read JWKS file {path}: {e.strerror or type(e).__name__}") from None
    return _parse(data, f"JWKS file {path}")


def _parse(data: bytes, what: str) -> Any:
    """A JWKS document, bounded in size, whether it came over HTTP or from a file."""
    if len(data) > MAX_JWKS_BYTES:
        raise JwksFetchError(f"{what} is larger than {MAX_JWKS_BYTES} bytes")
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        raise JwksFetchError(f"{what} is not JSON") from None


# alg -> (kty, allowed crv values or None)
_ALG_KEY_TYPES: dict[str, tuple[str, frozenset[str] | None]] = {
    "RS256": ("RSA", None),
    "RS384": ("RSA", None),
    "RS512": ("RSA", None),
    "PS256": ("RSA", None),
    "ES256": ("EC", frozenset({"P-256"})),
    "ES384": ("EC", frozenset({"P-384"})),
    "EdDSA": ("OKP", frozenset({"Ed25519", "Ed448"})),
}


def _fits(jwk_data: dict[str, Any], alg: str) -> bool:
    want = _ALG_KEY_TYPES.get(alg)
    if want is None:
        return False
    kty, crvs = want
    if jwk_data.get("kty") != kty:
        return False
    if crvs is not None and jwk_data.get("crv") not in crvs:
        return False
    declared = jwk_data.get("alg")
    return declared is None or declared == alg


# RFC 7638: the members of a public JWK that define the key, per kty.
_THUMBPRINT_MEMBERS: dict[str, tuple[str, ...]] = {
    "RSA": ("e", "kty", "n"),
    "EC": ("crv", "kty", "x", "y"),
    "OKP": ("crv", "kty", "x"),
}


class KeyRef(NamedTuple):
    """Which JWKS key verified a token: its kid (None for a kid-less key) and the RFC 7638
    thumbprint of its public material. The kid alone is not enough: an IdP that republishes a
    kid with new material has withdrawn the old key."""

    kid: str | None
    thumbprint: str


def jwk_thumbprint(jwk_data: dict[str, Any]) -> str:
    """RFC 7638 JWK thumbprint (base64url sha256 of the canonical required members)."""
    kty = jwk_data.get("kty")
    members = _THUMBPRINT_MEMBERS.get(kty if isinstance(kty, str) else "", ("kty",))
    canonical = orjson.dumps({m: jwk_data.get(m) for m in members}, option=orjson.OPT_SORT_KEYS)
    return base64.urlsafe_b64encode(hashlib.sha256(canonical).digest()).rstrip(b"=").decode()


class KeySet:
    """One fetched JWKS. PyJWK objects are built per (key, alg) on first use, because PyJWT binds
    a PyJWK to one algorithm and a JWK without `alg` may serve e.g. both RS256 and PS256."""

    def __init__(self, doc: Any, source: str) -> None:
        if not isinstance(doc, dict) or not isinstance(doc.get("keys"), list):
            raise JwksFetchError(f"{source}: not a JWKS (expected an object with a 'keys' list)")
        self.by_kid: dict[str, dict[str, Any]] = {}
        self.kidless: list[dict[str, Any]] = []
        for i, k in enumerate(doc["keys"]):
            if not isinstance(k, dict):
                continue
            kid = k.get("kid")
            label = f"kid {kid!r}" if isinstance(kid, str) else f"key #{i}"
            if k.get("kty") == "oct" or k.get("use", "sig") != "sig":
                continue
            try:
                jwt.PyJWK(k)  # validates kty/crv and the key material
            except jwt.PyJWTError as e:
                log.warning("%s: skipping %s: %s", source, label, type(e).__name__)
                continue
            if isinstance(kid, str):
                self.by_kid.setdefault(kid, k)
            else:
                self.kidless.append(k)
        if not self.by_kid and not self.kidless:
            raise JwksFetchError(f"{source}: JWKS has no usable signing keys")
        self._parsed: dict[tuple[int, str], jwt.PyJWK] = {}
        # id(jwk dict) -> its KeyRef, and the set of them: what the verified-token cache checks
        # on every hit, so it is built once per fetch rather than per request.
        self._ref_of: dict[int, KeyRef] = {}
        for kid, d in self.by_kid.items():
            self._ref_of[id(d)] = KeyRef(kid, jwk_thumbprint(d))
        for d in self.kidless:
            self._ref_of[id(d)] = KeyRef(None, jwk_thumbprint(d))
        self.key_refs: frozenset[KeyRef] = frozenset(self._ref_of.values())

    def __repr__(self) -> str:
        return f"KeySet(kids={sorted(self.by_kid)}, kidless={len(self.kidless)})"

    def has_kid(self, kid: str) -> bool:
        return kid in self.by_kid

    def candidates(self, kid: str | None, alg: str, issuer_name: str) -> list[tuple[jwt.PyJWK, KeyRef]]:
        """Keys that may have signed a token with this kid/alg, each with its KeyRef (so the
        caller can record which one verified). Caller checks has_kid first."""
        if kid is not None:
            data = self.by_kid[kid]
            if not _fits(data, alg):
                raise AuthError(
                    401,
                    "algorithm",
                    f"token algorithm {alg} does not match the type of its signing key "
                    f"(issuer {issuer_name!r})",
                )
            pool = [data]
        else:
            pool = [d for d in (*self.by_kid.values(), *self.kidless) if _fits(d, alg)]
        out = []
        for d in pool:
            ck = (id(d), alg)
            pk = self._parsed.get(ck)
            if pk is None:
                pk = self._parsed[ck] = jwt.PyJWK(d, algorithm=alg)
            out.append((pk, self._ref_of[id(d)]))
        return out


class JwksSource:
    def __init__(
        self,
        *,
        issuer_name: str,
        url: str | None,
        file: str | None,
        fetcher: JwksFetcher,
        clock: Callable[[], float],
        cache_seconds: float,
        floor_seconds: float,
    ) -> None:
        self.issuer_name = issuer_name
        self._url = url
        self._file = file
        self._fetcher = fetcher
        self._clock = clock
        self._cache_seconds = cache_seconds
        self._floor_seconds = floor_seconds
        self.keyset: KeySet | None = None
        self._loaded_at = float("-inf")
        self._last_attempt = float("-inf")
        self._last_error: str | None = None
        self._inflight: asyncio.Task[None] | None = None
        self.fetch_count = 0  # attempts, for tests and metrics
        if file is not None:
            # Read at start so a broken file fails the config load, not the first request.
            self.fetch_count += 1
            self._install(_read_file(file))

    @property
    def description(self) -> str:
        return f"JWKS {self._url}" if self._url else f"JWKS file {self._file}"

    def _install(self, doc: Any) -> None:
        now = self._clock()
        self.keyset = KeySet(doc, self.description)
        self._loaded_at = now
        self._last_attempt = now
        self._last_error = None

    async def _fetch_doc(self) -> Any:
        if self._file is not None:
            return await asyncio.to_thread(_read_file, self._file)
        assert self._url is not None
        return await self._fetcher(self._url)

    async def _do_refresh(self) -> None:
        self.fetch_count += 1
        self._last_attempt = self._clock()
        try:
            doc = await self._fetch_doc()
            self._install(doc)
            log.info("%s: loaded %d key(s) for issuer %r", self.description,
                     len(self.keyset.by_kid) + len(self.keyset.kidless), self.issuer_name)
        except asyncio.CancelledError:
            raise
        except JwksFetchError as e:
            self._last_error = str(e)
            log.warning("issuer %r: %s", self.issuer_name, e)
        except Exception as e:  # a broken injected fetcher must not take the request down oddly
            self._last_error = f"{self.description}: {type(e).__name__}"
            log.warning("issuer %r: fetching %s failed: %s", self.issuer_name, self.description,
                        type(e).__name__)

    def _start_refresh(self) -> asyncio.Task[None]:
        if self._inflight is None or self._inflight.done():
            self._inflight = asyncio.get_running_loop().create_task(self._do_refresh())
        return self._inflight

    async def _refresh(self) -> None:
        await asyncio.shield(self._start_refresh())

    def _unavailable(self) -> AuthError:
        return AuthError(
            503,
            "jwks_unavailable",
            f"can't verify tokens of issuer {self.issuer_name!r}: its signing keys are unavailable",
        )

    def _stale(self, now: float) -> bool:
        return now - self._loaded_at >= self._cache_seconds and now - self._last_attempt >= min(
            self._floor_seconds, self._cache_seconds
        )

    def cached_keyset(self) -> KeySet | None:
        """The key set as it stands, for a verified-token cache hit: no await, so the hit stays a
        dict lookup plus a set membership test. Starts the same background refresh `current()`
        would when the keys are stale; without that, a gateway whose callers all hold cached
        tokens would never refetch the JWKS and so never notice a withdrawn key."""
        if self.keyset is not None and self._stale(self._clock()):
            self._start_refresh()
        return self.keyset

    async def current(self) -> KeySet:
        """The key set to verify with; fetches on first use, refreshes in the background when stale."""
        now = self._clock()
        if self.keyset is None:
            if self._inflight is not None and not self._inflight.done():
                await self._refresh()
            elif now - self._last_attempt >= min(self._floor_seconds, 1.0):
                await self._refresh()
            if self.keyset is None:
                raise self._unavailable()
            return self.keyset
        if self._stale(now):
            self._start_refresh()  # stale-while-revalidate
        return self.keyset

    async def refetch_for_unknown_kid(self) -> bool:
        """Refetch once for an unknown kid unless the floor forbids it. True if fresh keys were
        awaited (the caller should look again); raises jwks_unavailable if that fetch failed."""
        joining = self._inflight is not None and not self._inflight.done()
        if not joining and self._clock() - self._last_attempt < self._floor_seconds:
            return False
        await self._refresh()
        if self._last_error is not None:
            raise self._unavailable()
        return True

    async def close(self) -> None:
        task, self._inflight = self._inflight, None
        if task is not None and not task.done():
            task.cancel()
            try:
                await task
            except (asyncio.CancelledError, Exception):
                pass
