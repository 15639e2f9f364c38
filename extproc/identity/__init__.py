"""Identity for LLM traffic: verified JWTs (JWKS), service tokens, API keys, anonymous.

    auth = Authenticator(IdentityConfig.model_validate(policy["identity"]))
    identity = await auth.authenticate(lowercase_headers)   # raises AuthError
"""

from .authenticator import Authenticator
from .jwks import HttpJwksFetcher, JwksFetcher, JwksFetchError
from .model import AuthError, Identity, hash_secret
from .policy import (
    ALLOWED_ALGORITHMS,
    AnonymousIdentity,
    ApiKeyEntry,
    ApiKeysConfig,
    IdentityConfig,
    JwtIssuerConfig,
    ServiceTokenEntry,
    ServiceTokensConfig,
)

__all__ = [
    "ALLOWED_ALGORITHMS",
    "AnonymousIdentity",
    "ApiKeyEntry",
    "ApiKeysConfig",
    "AuthError",
    "Authenticator",
    "HttpJwksFetcher",
    "Identity",
    "IdentityConfig",
    "JwksFetchError",
    "JwksFetcher",
    "JwtIssuerConfig",
    "ServiceTokenEntry",
    "ServiceTokensConfig",
    "hash_secret",
]
