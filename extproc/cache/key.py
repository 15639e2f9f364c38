"""The cache key of a request: what makes two requests "the same" for the cache.

`digest` hashes, in order: a format version, the API (wire format and endpoint), the provider and
the model that serve the request (after any downgrade), whether it streams, and either the
request body in canonical form or the client's `x-tollgate-cache-key`. The canonical form is the
body as forwarded upstream (a clamped output cap or an added `stream_options` included), with
object keys sorted, no insignificant whitespace, and integral floats written as integers (`0.0`
and `0` are the same temperature), minus the rule's `ignore_fields`.

The Redis key puts the tenant scope in front (extproc/cache/store.py), so one team's digest can
never name another team's entry, custom keys included.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from typing import Any
from urllib.parse import quote

import orjson

VERSION = b"tollgate-cache-1"


class Uncanonical(ValueError):
    """The body cannot be written in canonical form (nested beyond what either JSON writer takes)."""


def _norm(v: Any) -> Any:
    if isinstance(v, float):
        return int(v) if v.is_integer() and abs(v) < 2**63 else v
    if isinstance(v, dict):
        return {k: _norm(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_norm(x) for x in v]
    return v


def canonical(body: dict[str, Any], ignore: Iterable[str] = ()) -> bytes:
    """`body` as canonical JSON bytes: sorted keys, compact, integral floats as ints."""
    ignore = set(ignore)
    try:
        obj = _norm({k: v for k, v in body.items() if k not in ignore} if ignore else body)
    except RecursionError:
        raise Uncanonical("nested too deeply") from None
    try:
        return orjson.dumps(obj, option=orjson.OPT_SORT_KEYS)
    except orjson.JSONEncodeError:  # deeper than orjson writes (255): the standard library, always for such a body
        pass
    try:
        return json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode()
    except (RecursionError, ValueError, TypeError):
        raise Uncanonical("nested too deeply") from None


def digest(*, api: str, provider: str, model: str, stream: bool, body: dict[str, Any] | None = None,
           custom: str | None = None, ignore: Iterable[str] = ()) -> str:
    """The hex sha256 naming one cached answer inside a scope. With `custom`, the client's key
    stands for the body (the API, provider, model and framing still count)."""
    h = hashlib.sha256(VERSION)
    for part in (api, provider, model, "stream" if stream else "json"):
        h.update(b"\0" + part.encode())
    if custom is not None:
        h.update(b"\0k\0" + custom.encode())
    else:
        assert body is not None
        h.update(b"\0b\0" + canonical(body, ignore))
    return h.hexdigest()


def scope_part(scope: str, attrs: dict[str, Any]) -> str | None:
    """The tenant part of the Redis key: `team=<team>`, `user=<user>` or `_` (global); None when
    the request has no such attribute (it is then not cached: team-less callers never share)."""
    if scope == "global":
        return "_"
    v = attrs.get(scope)
    if isinstance(v, list):
        v = ",".join(sorted(v))
    if not v:
        return None
    return f"{scope}={quote(v, safe='@._-+')}"
