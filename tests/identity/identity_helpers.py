"""Helpers for the identity tests: key/JWK plumbing, token minting, a fake clock, the JWKS server."""

from __future__ import annotations

import asyncio
import base64
import json
from dataclasses import dataclass, field
from typing import Any

import jwt
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

ISSUER = "https://myteam.cloudflareaccess.com"
AUDIENCE = "aud-tag-123"
NOW = 1_750_000_000.0


@dataclass
class Key:
    kid: str
    alg: str
    private: Any
    jwk: dict[str, Any]


def jwk_of(public: Any, kid: str, alg: str | None) -> dict[str, Any]:
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


class Clock:
    def __init__(self, t: float = NOW) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


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
