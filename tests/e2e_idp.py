"""A test identity provider for the end-to-end stack: real RSA and EC keys, a JWKS served over
HTTP on loopback, and token minting. Keys can be rotated while the stack runs."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

ISSUER = "https://idp.tollgate.test"
AUDIENCE = "tollgate-e2e"


class TestIdP:
    __test__ = False  # not a test class

    def __init__(self) -> None:
        self.keys: dict[str, tuple[str, Any]] = {}  # kid -> (alg, private key)
        self.published: list[str] = []  # kids in the served JWKS
        self.fetches = 0
        self.fail_status: int | None = None  # set to e.g. 500 to simulate an IdP outage
        self.add_key("rsa-1", "RS256")
        self.add_key("ec-1", "ES256")
        self.server: ThreadingHTTPServer | None = None

    def add_key(self, kid: str, alg: str, publish: bool = True) -> None:
        private = rsa.generate_private_key(public_exponent=65537, key_size=2048) if alg.startswith("RS") \
            else ec.generate_private_key(ec.SECP256R1())
        self.keys[kid] = (alg, private)
        if publish:
            self.published.append(kid)

    def jwks(self) -> dict[str, Any]:
        out = []
        for kid in self.published:
            alg, private = self.keys[kid]
            algo = RSAAlgorithm if alg.startswith("RS") else ECAlgorithm
            out.append({**algo.to_jwk(private.public_key(), as_dict=True), "kid": kid, "alg": alg, "use": "sig"})
        return {"keys": out}

    def claims(self, claims: dict[str, Any] | None = None, *, ttl: float = 300, **overrides: Any) -> dict[str, Any]:
        """A valid payload for this IdP, with `claims` and `overrides` laid over it."""
        now = int(time.time())
        return {"iss": ISSUER, "aud": AUDIENCE, "sub": "user-1", "email": "user1@example.com",
                "iat": now, "nbf": now, "exp": now + int(ttl), **(claims or {}), **overrides}

    def token(self, claims: dict[str, Any] | None = None, *, kid: str = "rsa-1", ttl: float = 300,
              headers: dict[str, Any] | None = None, sign_with: str | None = None, **overrides: Any) -> str:
        """A signed JWT whose header names `kid`; `sign_with` signs it with another kid's private
        key instead (a forged signature under a published kid)."""
        payload = self.claims(claims, ttl=ttl, **overrides)
        alg, private = self.keys[sign_with or kid]
        return jwt.encode(payload, private, algorithm=alg, headers={"kid": kid, **(headers or {})})

    def public_pem(self, kid: str) -> bytes:
        """The PEM of a key's public half (what an HS256 key-confusion attacker would use)."""
        return self.keys[kid][1].public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)

    @staticmethod
    def forge(header: dict[str, Any], payload: dict[str, Any], *, hmac_key: bytes | None = None) -> str:
        """A hand-built compact JWS: HMAC-SHA256 signed with `hmac_key`, or unsigned (empty
        signature) without one. PyJWT refuses to build either attack token itself."""
        def b64(data: bytes) -> str:
            return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

        signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(payload).encode())}"
        sig = b"" if hmac_key is None else hmac.new(hmac_key, signing_input.encode(), hashlib.sha256).digest()
        return f"{signing_input}.{b64(sig)}"

    @property
    def port(self) -> int:
        assert self.server is not None
        return self.server.server_address[1]

    def start(self) -> "TestIdP":
        idp = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                idp.fetches += 1
                if idp.fail_status is not None:
                    self.send_response(idp.fail_status)
                    self.send_header("content-length", "0")
                    self.end_headers()
                    return
                body = json.dumps(idp.jwks()).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
