"""Fixtures for the identity tests: real keys, a local JWKS server, a fake clock, token minting."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import jwt
import pytest
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

from extproc.identity import Authenticator, IdentityConfig

ISSUER = "https://myteam.cloudflareaccess.com"
AUDIENCE = "aud-tag-123"
NOW = 1_750_000_000.0


@dataclass
class Key:
    kid: str
    alg: str
    private: Any
    jwk: dict[str, Any]


def _jwk(public: Any, kid: str, alg: str | None) -> dict[str, Any]:
    if isinstance(public, rsa.RSAPublicKey):
        d = RSAAlgorithm.to_jwk(public, as_dict=True)
    elif isinstance(public, ec.EllipticCurvePublicKey):
        d = ECAlgorithm.to_jwk(public, as_dict=True)
    else:
        d = OKPAlgorithm.to_jwk(public, as_dict=True)
    d = {**d, "kid": kid, "use": "sig"}
    if alg:
        d["alg"] = alg
    return d


@pytest.fixture(scope="session")
def rsa1() -> Key:
    k = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return Key("rsa-1", "RS256", k, _jwk(k.public_key(), "rsa-1", "RS256"))


@pytest.fixture(scope="session")
def rsa2() -> Key:
    k = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    # no "alg" in the JWK: the key must serve whatever allowed RSA alg the token names
    return Key("rsa-2", "RS256", k, _jwk(k.public_key(), "rsa-2", None))


@pytest.fixture(scope="session")
def ec1() -> Key:
    k = ec.generate_private_key(ec.SECP256R1())
    return Key("ec-1", "ES256", k, _jwk(k.public_key(), "ec-1", "ES256"))


@pytest.fixture(scope="session")
def ed1() -> Key:
    k = ed25519.Ed25519PrivateKey.generate()
    return Key("ed-1", "EdDSA", k, _jwk(k.public_key(), "ed-1", None))


class Clock:
    def __init__(self, t: float = NOW) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


@pytest.fixture
def clock() -> Clock:
    return Clock()


@dataclass
class JwksServer:
    keys: list[dict[str, Any]] = field(default_factory=list)
    fetches: int = 0
    status: int = 200
    delay: float = 0.0
    port: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/cdn-cgi/access/certs"

    def serve(self, *keys: Key) -> None:
        self.keys = [k.jwk for k in keys]

    async def handle(self, request: web.Request) -> web.Response:
        self.fetches += 1
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.status != 200:
            return web.Response(status=self.status, text="nope")
        return web.json_response({"keys": self.keys})


@pytest.fixture
async def jwks_server(rsa1: Key) -> AsyncIterator[JwksServer]:
    """A JWKS endpoint on a free loopback port, serving rsa1 until a test swaps its keys."""
    srv = JwksServer()
    srv.serve(rsa1)
    app = web.Application()
    app.router.add_get("/cdn-cgi/access/certs", srv.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        srv.port = runner.addresses[0][1]
        yield srv
    finally:
        await runner.cleanup()


def claims(**over: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "iss": ISSUER,
        "aud": [AUDIENCE],
        "sub": "user-42",
        "email": "ada@example.com",
        "iat": int(NOW) - 10,
        "nbf": int(NOW) - 10,
        "exp": int(NOW) + 600,
        "custom": {"groups": ["eng", "ics"], "team": "research", "cost_center": "cc-7"},
    }
    for k, v in over.items():
        if v is None:
            base.pop(k, None)
        else:
            base[k] = v
    return base


def mint(key: Key, alg: str | None = None, kid: str | None | bool = True, **over: Any) -> str:
    headers: dict[str, Any] = {}
    if kid is True:
        headers["kid"] = key.kid
    elif isinstance(kid, str):
        headers["kid"] = kid
    return jwt.encode(claims(**over), key.private, algorithm=alg or key.alg, headers=headers)


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def raw_token(header: dict[str, Any], payload: dict[str, Any], signature: bytes = b"") -> str:
    return ".".join(
        [b64url(json.dumps(header).encode()), b64url(json.dumps(payload).encode()), b64url(signature)]
    )


def issuer_cfg(url: str | None = None, **over: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "name": "cloudflare-access",
        "header": "cf-access-jwt-assertion",
        "issuers": [ISSUER],
        "audiences": [AUDIENCE],
        "jwks_url": url,
        "algorithms": ["RS256", "ES256", "EdDSA", "PS256"],
        "leeway_seconds": 30,
        "jwks_refresh_floor_seconds": 60,
        "jwks_cache_seconds": 3600,
        "claims": {
            "user": "sub",
            "email": "email",
            "groups": "custom.groups",
            "team": "custom.team",
            "cost_center": "custom.cost_center",
        },
    }
    cfg.update(over)
    return cfg


@pytest.fixture
async def make_auth(clock: Clock) -> AsyncIterator[Callable[..., Authenticator]]:
    """Build Authenticators from plain dicts; all are closed at teardown."""
    made: list[Authenticator] = []

    def make(config: dict[str, Any], **kw: Any) -> Authenticator:
        kw.setdefault("clock", clock)
        a = Authenticator(IdentityConfig.model_validate(config), **kw)
        made.append(a)
        return a

    yield make
    for a in made:
        await a.close()
