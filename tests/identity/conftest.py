"""Fixtures for the identity tests: real keys, a local JWKS server, a fake clock."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from extproc.identity import Authenticator, IdentityConfig

from identity_helpers import Clock, JwksServer, Key, jwk_of


@pytest.fixture(scope="session")
def rsa1() -> Key:
    k = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return Key("rsa-1", "RS256", k, jwk_of(k.public_key(), "rsa-1", "RS256"))


@pytest.fixture(scope="session")
def rsa2() -> Key:
    k = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    # no "alg" in the JWK: the key must serve whatever allowed RSA alg the token names
    return Key("rsa-2", "RS256", k, jwk_of(k.public_key(), "rsa-2", None))


@pytest.fixture(scope="session")
def ec1() -> Key:
    k = ec.generate_private_key(ec.SECP256R1())
    return Key("ec-1", "ES256", k, jwk_of(k.public_key(), "ec-1", "ES256"))


@pytest.fixture(scope="session")
def ed1() -> Key:
    k = ed25519.Ed25519PrivateKey.generate()
    return Key("ed-1", "EdDSA", k, jwk_of(k.public_key(), "ed-1", None))


@pytest.fixture
def clock() -> Clock:
    return Clock()


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
