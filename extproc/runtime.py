"""One loaded policy directory, ready to serve: built whole, swapped whole, never mutated.

A `Runtime` is everything derived from the policy files: the validated config and price table,
the compiled budgets, the identity sources (with their JWKS fetchers), the provider keys read
from the environment or files. The process's long-lived parts (the Redis pool, metrics, sinks,
the outbox, the per-identity concurrency counts) belong to the `Gateway` and outlive every
runtime.

Each request holds the runtime that was current when its stream started, to its end (`hold` /
`release`): its admission and its settle use the same budgets, its identity the same sources. A
reload swaps `Gateway.runtime` between requests and `retire`s the old one, which closes what it
owns (the JWKS fetchers' HTTP sessions) once its last request has ended.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from .budgets import BudgetEngine
from .config import Config
from .identity import Authenticator
from .lifecycle.admitter import Admitter

if TYPE_CHECKING:
    import redis.asyncio as aioredis

    from .budgets.outbox import Outbox
    from .budgets.pipe import ScriptPipe
    from .metrics import Metrics

log = logging.getLogger("tollgate.runtime")


def read_provider_keys(config: Config) -> Mapping[str, str]:
    """Gateway-held provider keys, read once per load (env or file), never per request."""
    return MappingProxyType({name: key for name, p in config.providers.items() if p.key and (key := p.key.read())})


@dataclass(eq=False)
class Runtime:
    config: Config
    auth: Authenticator
    budgets: BudgetEngine | None
    admitter: Admitter
    provider_keys: Mapping[str, str]
    loaded_at: float = field(default_factory=time.time)
    owns_auth: bool = True  # False once a successor with the same identity config took `auth` over
    _holders: int = 0
    _retired: bool = False
    _closing: "asyncio.Task[None] | None" = None
    _closed: asyncio.Event = field(default_factory=asyncio.Event)

    @classmethod
    def build(cls, config: Config, *, redis: "aioredis.Redis | None", outbox: "Outbox | None", metrics: "Metrics",
              auth: Authenticator | None = None, pipe: "ScriptPipe | None" = None) -> "Runtime":
        # Even with no budgets the engine is built: its settle call also writes the usage rollups.
        # Leases run on Redis's clock (clock=None), so replicas agree on expiry.
        budgets = (BudgetEngine(list(config.doc.budgets), redis, outbox=outbox, pipe=pipe,
                                rate_limits=list(config.doc.rate_limits)) if redis is not None else None)
        return cls(config=config, auth=auth or Authenticator(config.doc.identity), budgets=budgets,
                   admitter=Admitter(budgets, metrics), provider_keys=read_provider_keys(config))

    @property
    def digest(self) -> str:
        return self.config.digest

    @property
    def holders(self) -> int:
        return self._holders

    def hold(self) -> "Runtime":
        self._holders += 1
        return self

    def release(self) -> None:
        self._holders -= 1
        if self._retired and self._holders == 0:
            self._close_soon()

    def retire(self) -> None:
        """No new request takes this runtime; close it once the last one holding it ends."""
        self._retired = True
        if self._holders == 0:
            self._close_soon()

    def _close_soon(self) -> None:
        if self._closing is None:
            self._closing = asyncio.get_running_loop().create_task(self._close_then_signal())

    async def _close_then_signal(self) -> None:
        try:
            await self.close()
        finally:
            self._closed.set()

    async def closed(self) -> None:
        """Wait until this runtime, retired, has seen its last request end and has closed (the
        xDS narrowing after a reload, shutdown): while requests still hold it, this waits."""
        await self._closed.wait()

    def succeeded_by(self, config: Config, **parts: Any) -> "Runtime":
        """The runtime for `config`, to replace this one. An unchanged identity section keeps
        this runtime's identity sources: their fetched JWKS and verified-token cache carry over, so
        a budget edit never makes JWT callers wait on (or fail with) the identity provider."""
        if config.doc.identity == self.config.doc.identity:
            self.owns_auth = False
            return Runtime.build(config, auth=self.auth, **parts)
        return Runtime.build(config, **parts)

    async def close(self) -> None:
        if not self.owns_auth:
            return
        try:
            await self.auth.close()
        except Exception:
            log.exception("closing the identity sources of policy %s failed", self.digest[:12])


def describe_changes(old: Config, new: Config) -> list[str]:
    """What an SRE wants to read after a reload: budgets added, removed, changed; credentials
    added or revoked; providers, routes, access and admin rules, prices. Names only, never a
    secret or its hash."""
    out: list[str] = []

    def names(items: Any, attr: str = "name") -> dict[str, Any]:
        return {getattr(x, attr): x for x in items}

    def diff(what: str, before: Mapping[str, Any], after: Mapping[str, Any], *, added: str = "added",
             removed: str = "removed", changed: str | None = "changed") -> None:
        for n in sorted(after.keys() - before.keys()):
            out.append(f"{what} {n} {added}")
        for n in sorted(before.keys() - after.keys()):
            out.append(f"{what} {n} {removed}")
        if changed:
            for n in sorted(before.keys() & after.keys()):
                if before[n] != after[n]:
                    out.append(f"{what} {n} {changed}")

    diff("rate limit", names(old.doc.rate_limits), names(new.doc.rate_limits))
    ob, nb = names(old.doc.budgets), names(new.doc.budgets)
    diff("budget", ob, nb, removed="removed (its counters stay in Redis until they expire)", changed=None)
    for n in sorted(ob.keys() & nb.keys()):
        a, b = ob[n], nb[n]
        if a == b:
            continue
        parts = []
        if a.limit_usd != b.limit_usd:
            parts.append("limit changed (spend kept)")
        if a.window != b.window or a.per != b.per:
            parts.append("window or per changed (new counters)")
        if a.match != b.match:
            parts.append("match changed (same counters)")
        rest = {k for k in type(a).model_fields if getattr(a, k) != getattr(b, k)} - {"limit_usd", "window", "per",
                                                                                     "match"}
        if rest:
            parts.append(f"{', '.join(sorted(rest))} changed")
        out.append(f"budget {n}: {'; '.join(parts)}")

    oi, ni = old.doc.identity, new.doc.identity
    diff("api key", names(oi.api_keys.keys if oi.api_keys else []), names(ni.api_keys.keys if ni.api_keys else []),
         removed="revoked")
    diff("service token", names(oi.service_tokens.tokens if oi.service_tokens else []),
         names(ni.service_tokens.tokens if ni.service_tokens else []), removed="revoked")
    if oi.model_dump(exclude={"api_keys", "service_tokens"}) != ni.model_dump(exclude={"api_keys", "service_tokens"}):
        out.append("identity sources changed (issuers, headers or anonymous access)")
    diff("provider", dict(old.doc.providers), dict(new.doc.providers))
    diff("alert", names(old.doc.alerts), names(new.doc.alerts))  # alerts (docs/alerts.md)
    for what, a, b in (("routes", old.doc.routes, new.doc.routes), ("access rules", old.doc.access, new.doc.access),
                       ("admin rules", old.doc.admin, new.doc.admin),
                       ("cache rules", old.doc.cache, new.doc.cache)):  # cache
        if a != b:
            out.append(f"{what} changed ({len(a)} -> {len(b)})")
    diff("price", dict(old.doc.prices.models), dict(new.doc.prices.models))
    if old.doc.prices.default != new.doc.prices.default or old.doc.prices.tools != new.doc.prices.tools:
        out.append("default price or tool fees changed")
    if old.doc.gateway != new.doc.gateway:
        out.append("gateway settings changed")
    return out
