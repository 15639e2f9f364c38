"""The response cache (issue 12): exact-match answers from Redis, inside the request lifecycle.

    policy.py  the `cache:` policy section: rules with `match`, TTLs, size limit, scope, uncachable
    key.py     the key: provider, served model, API, framing and the canonical request body
    store.py   the Redis entry (one STRING per answer, written once with SET NX) and its layout
    flow.py    one request's use of it, called from the processor's phases (CacheFlow)

A hit is one more way a request ends (State.CACHED, Settler.cached): identity, model access and
the budget reservation run first, so whoever would be refused is refused; then the lease is
settled at $0 in the same call that writes the record (`cache: hit`, `avoided_cost_nusd`) and the
rollups, and the stored body is replayed byte for byte as an ImmediateResponse. Replaying what the
provider sent (rather than re-synthesising it per wire format) keeps every field of the answer,
its SSE event framing and its usage exactly as a live answer: the openai and anthropic SDKs,
streaming or not, read a hit like the answer it copies. The user docs are docs/cache.md.
"""

from .flow import CACHE_HEADER, CacheFlow
from .policy import CacheList, CacheRule

__all__ = ["CACHE_HEADER", "CacheFlow", "CacheList", "CacheRule"]
