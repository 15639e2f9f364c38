"""The response cache in Redis: one STRING per cached answer, written once.

Key layout (under the gateway's prefix, default `tollgate:`; listed with the budget keys in
extproc/budgets/store.py):

* `{prefix}cache:{scope}:{digest}` — STRING, one complete cached answer, with a TTL (PX). `{scope}`
  is `team=<team>`, `user=<user>` (values URL-quoted) or `_` for a global rule; `{digest}` is the
  hex sha256 of extproc/cache/key.py. The value is one line of JSON (the entry's header: status,
  content type, streamed or not, served model and provider, what the original cost, its usage and
  request id, when it was written), a newline, then the response body exactly as the client
  received it (JSON, or the whole SSE stream).

An entry is written with `SET ... NX PX` after the response has ended complete and has been
settled: never a partial entry, and of two identical misses running at once the first complete
answer wins; the other's write is a no-op (`exists`). An entry that cannot be read back (another
format version, garbage) is a miss, and is overwritten only when it expires.

Reads and writes go through the gateway's script pipe (extproc/budgets/pipe.py, the hot path's one
connection) when it has one, else through redis-py's client (a Redis the pipe cannot reach: TLS, a
Unix socket). Through the pooled client a hit's GET was its costliest step: measured in process,
a hit cost 582 us of CPU against a forwarded request's 399.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson
import redis.asyncio as aredis

from ..budgets.pipe import ScriptPipe

FORMAT = 1


def redis_key(prefix: str, scope: str, digest: str) -> str:
    return f"{prefix}cache:{scope}:{digest}"


@dataclass(frozen=True)
class Entry:
    """One cached answer."""

    status: int
    content_type: str
    stream: bool
    model: str | None  # the model the provider said served it
    provider: str | None
    cost_nusd: int  # what the original response cost: a hit's avoided cost
    request_id: str  # the request that was answered by the provider
    created: float  # unix time it was written
    body: bytes
    usage: dict[str, int] = field(default_factory=dict)

    def encode(self) -> bytes:
        head = {"v": FORMAT, "status": self.status, "ct": self.content_type, "stream": self.stream,
                "model": self.model, "provider": self.provider, "cost_nusd": self.cost_nusd,
                "request_id": self.request_id, "created": self.created, "usage": self.usage}
        return orjson.dumps(head) + b"\n" + self.body

    @classmethod
    def decode(cls, raw: bytes | None) -> Entry | None:
        if not raw:
            return None
        head_raw, sep, body = raw.partition(b"\n")
        if not sep:
            return None
        try:
            head: dict[str, Any] = orjson.loads(head_raw)
            if head.get("v") != FORMAT:
                return None
            return cls(status=int(head["status"]), content_type=str(head["ct"]), stream=bool(head["stream"]),
                       model=head.get("model"), provider=head.get("provider"), cost_nusd=int(head["cost_nusd"]),
                       request_id=str(head["request_id"]), created=float(head["created"]), body=body,
                       usage={k: int(v) for k, v in (head.get("usage") or {}).items()})
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError):
            return None


async def get(redis: "aredis.Redis | ScriptPipe", key: str) -> Entry | None:
    """The entry under `key`, or None (absent, expired or unreadable). Redis errors propagate."""
    if isinstance(redis, ScriptPipe):
        return Entry.decode(await redis.command("GET", key))
    return Entry.decode(await redis.get(key))


async def put(redis: "aredis.Redis | ScriptPipe", key: str, entry: Entry, ttl_seconds: int) -> bool:
    """Write `entry` unless one is there already: True if this call wrote it."""
    px = int(ttl_seconds * 1000)
    if isinstance(redis, ScriptPipe):
        # Not retried: a write that landed before its connection broke would then read "exists".
        return await redis.command("SET", key, entry.encode(), "NX", "PX", px, retry=False) is not None
    return bool(await redis.set(key, entry.encode(), nx=True, px=px))
