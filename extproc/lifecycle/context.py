"""What one request carries through its phases, and where it is in its life."""

from __future__ import annotations

import asyncio
import enum
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..errors import Shape

if TYPE_CHECKING:
    from ..budgets import Admission
    from ..config import Config
    from ..identity import Identity
    from ..pricing import ModelPrice
    from ..providers import Api, ParsedRequest


class State(enum.Enum):
    """Where a request is. Only ADMITTING, RESERVED and FORWARDED can hold a lease."""

    NEW = "new"  # headers seen, nothing reserved
    ADMITTING = "admitting"  # the reserve call is running (it may land even if the stream dies now)
    RESERVED = "reserved"  # a lease is held; the request has not been handed to Envoy yet
    FORWARDED = "forwarded"  # Envoy has the request for the provider: from now on it may cost money
    SETTLED = "settled"  # terminal: charged (real cost or a documented estimate) and recorded
    RELEASED = "released"  # terminal: the lease was dropped, nothing charged
    REFUSED = "refused"  # terminal: answered by the gateway, nothing reserved

    @property
    def terminal(self) -> bool:
        return self in (State.SETTLED, State.RELEASED, State.REFUSED)


# Which transitions are legal; anything else is a bug, raised loudly in tests.
_NEXT = {
    State.NEW: {State.ADMITTING, State.REFUSED, State.FORWARDED},  # FORWARDED: no budget engine
    State.ADMITTING: {State.RESERVED, State.REFUSED, State.RELEASED},
    State.RESERVED: {State.FORWARDED, State.RELEASED, State.REFUSED},
    State.FORWARDED: {State.SETTLED},
}


@dataclass
class RequestContext:
    """Everything known about one request; the phase objects read and fill it in."""

    config: "Config"  # one config for the whole request, even if a reload happens meanwhile
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    started: float = field(default_factory=time.monotonic)
    state: State = State.NEW
    path: str = ""
    shape: Shape = "openai"
    envoy_request_id: str = ""
    identity: "Identity | None" = None
    metadata: dict[str, str | list[str]] = field(default_factory=dict)
    api: "Api | None" = None
    req: "ParsedRequest | None" = None
    price: "ModelPrice | None" = None
    provider: str | None = None
    model_served: str | None = None
    admission: "Admission | None" = None
    decision: str = "allowed"
    decision_reason: str | None = None
    error_code: str | None = None
    status: int = 0  # the response's HTTP status, once known
    gateway_error: str | None = None  # Envoy's response code details when Envoy itself answered
    streamed: bool = False
    pending_admit: "asyncio.Task[Admission] | None" = None  # a reserve still running when the stream died

    def to(self, state: State) -> None:
        if state not in _NEXT.get(self.state, ()):
            raise RuntimeError(f"request {self.request_id}: illegal transition {self.state.value} -> {state.value}")
        self.state = state

    @property
    def holds_lease(self) -> bool:
        adm = self.admission
        return self.state in (State.RESERVED, State.FORWARDED) and adm is not None and bool(adm.counters)

    def attrs(self) -> dict[str, str | list[str]]:
        attrs: dict[str, str | list[str]] = dict(self.metadata)
        if self.identity is not None:
            attrs.update(self.identity.attrs())
        return attrs
