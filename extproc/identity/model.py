"""Identity (who is calling), AuthError (why they were refused) and the secret hash helper."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

_EMPTY: Mapping[str, str | list[str]] = MappingProxyType({})


@dataclass(frozen=True, slots=True)
class Identity:
    """A verified caller. `source` is "jwt:<issuer name>", "service_token", "api_key:<name>" or
    "anonymous"; `extra` holds custom attributes (never the core names or source/service_token)."""

    user: str
    email: str | None = None
    groups: tuple[str, ...] = ()
    team: str | None = None
    app: str | None = None
    service_token: str | None = None
    source: str = "anonymous"
    extra: Mapping[str, str | list[str]] = field(default_factory=lambda: _EMPTY, hash=False)

    def attrs(self) -> dict[str, str | list[str]]:
        """Flat attribute dict for budgets and logs; None values are omitted, groups is a list."""
        out: dict[str, str | list[str]] = {"user": self.user}
        if self.email is not None:
            out["email"] = self.email
        out["groups"] = list(self.groups)
        if self.team is not None:
            out["team"] = self.team
        if self.app is not None:
            out["app"] = self.app
        if self.service_token is not None:
            out["service_token"] = self.service_token
        out["source"] = self.source
        for k, v in self.extra.items():
            if k not in out and v is not None:
                out[k] = list(v) if isinstance(v, (list, tuple)) else v
        return out


class AuthError(Exception):
    """A refused request. `check` is machine-readable ("missing", "expired", "signature", ...),
    `message` is for humans and never contains a secret or the token."""

    def __init__(self, status: int, check: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.check = check
        self.message = message

    def __repr__(self) -> str:
        return f"AuthError(status={self.status}, check={self.check!r}, message={self.message!r})"

    def __str__(self) -> str:
        return f"{self.check}: {self.message}"


def hash_secret(secret: str) -> str:
    """sha256 hex of a secret, as stored in the policy (`key_sha256`, `secret_sha256`)."""
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()
