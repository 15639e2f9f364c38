"""The admin API's access log: one JSON line per admin call, granted or refused.

Who read what: the caller's identity (and whether the `admin:` rule matched it), whose budgets a
status or dry run was about, a usage report's filters, and how the call ended. Written by the
ext_proc process that served the call to ``<state dir>/admin-access.jsonl`` (`serve
--state-dir`); every ext_proc of a host may share the file (see :class:`AdminAccessLog`).

The servicer wraps each method once with :func:`logged`; inside the call, the service tells the
record who the caller is (:func:`note_caller`) and whose data it reads (:func:`note_subject`).
Writing never fails the call: an error is logged and the call goes on. The line is appended with
one ``write`` of an ``O_APPEND`` descriptor: no thread, no buffering, microseconds.

Fields are added, never renamed (docs/admin-api.md lists them).
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import logging
import os
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol

import grpc
import orjson

from ..identity import Identity
from ..jsonl import append_line

log = logging.getLogger("tollgate.admin.access")

FILE_NAME = "admin-access.jsonl"
CORE_ATTRS = ("user", "email", "groups", "team", "app", "service_token", "source")
MAX_HEADER_CHARS = 256  # a forwarded header longer than this is cut (it is the caller's to set)


@dataclass(slots=True)
class AdminAccessRecord:
    """One admin call. ``None`` is written as ``null``; every field is always present."""

    ts: str  # when the call started, ISO 8601 UTC with milliseconds (as attribution records)
    method: str  # the gRPC method: GetUsage, GetBudgetStatus, DryRun
    outcome: str = "ok"  # "ok", or the gRPC status code's name: UNAUTHENTICATED, PERMISSION_DENIED, ...
    message: str | None = None  # the error message the caller got (None when ok)
    duration_ms: float = 0.0
    # The authenticated caller: user, email, groups, team, app, service_token, source
    # ("api_key:<name>", "jwt:<issuer>", "service_token", "anonymous"), admin (the `admin:` rule
    # matched), attributes (custom ones). None when authentication failed.
    caller: dict[str, Any] | None = None
    # Whose attributes a budget status or dry run used (or, refused, asked for): the caller's own,
    # or the identity an admin named. None for usage reports (they cover every identity the
    # filters match) and for calls refused before it was known.
    subject: dict[str, Any] | None = None
    subject_is_caller: bool | None = None
    read: dict[str, Any] = field(default_factory=dict)  # the request's arguments (method-specific)
    returned: dict[str, Any] | None = None  # a summary of the answer (method-specific; None unless ok)
    request_id: str | None = None  # x-request-id as Envoy forwarded it (ties the line to Envoy's log)
    peer: str | None = None  # the gRPC peer (Envoy's side of the connection), e.g. "ipv4:127.0.0.1:41234"
    forwarded_for: str | None = None  # x-forwarded-for, if the request carried one
    user_agent: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def caller_fields(who: Identity, admin: bool) -> dict[str, Any]:
    """The caller as it is logged: the core attributes (null when unset), admin, custom attributes."""
    attrs = who.attrs()
    out: dict[str, Any] = {k: attrs.get(k) for k in CORE_ATTRS}
    out["admin"] = admin
    out["attributes"] = {k: v for k, v in attrs.items() if k not in CORE_ATTRS}
    return out


class AdminAccessLog:
    """Appends records as JSON lines to ``path`` (its directory is created on first write).

    The file is opened for each record with ``O_APPEND`` and the line goes in one ``write``, so
    several processes can share it without interleaving lines, and a file moved away by log
    rotation is simply created again. Admin calls are rare; nothing is kept open. With no path,
    records go to the ``tollgate.admin.access`` logger instead (INFO), so there is still a trail.
    """

    def __init__(self, path: str | os.PathLike[str] | None) -> None:
        self.path = Path(path) if path is not None else None
        self.failures = 0

    @classmethod
    def in_state_dir(cls, state_dir: str | os.PathLike[str] | None) -> "AdminAccessLog":
        return cls(Path(state_dir) / FILE_NAME if state_dir is not None else None)

    def write(self, record: AdminAccessRecord) -> None:
        """Append one record. Never raises: a failure is logged and counted in ``failures``."""
        try:
            line = orjson.dumps(record.to_dict(), default=str) + b"\n"
            if self.path is None:
                log.info("%s", line[:-1].decode())
                return
            append_line(self.path, line)
        except Exception as e:  # noqa: BLE001 - the admin call must not fail for its log line
            self.failures += 1
            log.error("admin access log %s: could not write the record of %s by %s: %s: %s", self.path,
                      record.method, (record.caller or {}).get("user"), type(e).__name__, e)


# --------------------------------------------------------------------------------------------
# the record of the call in progress
# --------------------------------------------------------------------------------------------

_current: contextvars.ContextVar[AdminAccessRecord | None] = contextvars.ContextVar(
    "tollgate_admin_access_record", default=None)


def note_caller(who: Identity, admin: bool) -> None:
    """The call's caller is authenticated (no-op outside a logged call)."""
    rec = _current.get()
    if rec is not None:
        rec.caller = caller_fields(who, admin)


def note_subject(attrs: Mapping[str, Any], is_caller: bool) -> None:
    """The call reads (or asks for) the data of the identity with these attributes."""
    rec = _current.get()
    if rec is not None:
        rec.subject = {k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in attrs.items()}
        rec.subject_is_caller = is_caller


class _Servicer(Protocol):
    access_log: AdminAccessLog
    clock: Callable[[], float]


Method = Callable[[Any, Any, grpc.aio.ServicerContext], Awaitable[Any]]  # (servicer, request, context)


def _header(metadata: Mapping[str, str], name: str) -> str | None:
    v = metadata.get(name)
    return v[:MAX_HEADER_CHARS] if v else None


def _outcome(context: grpc.aio.ServicerContext, error: BaseException | None) -> tuple[str, str | None]:
    if error is None:
        return "ok", None
    if isinstance(error, asyncio.CancelledError):
        return grpc.StatusCode.CANCELLED.name, "the call was cancelled"
    code = context.code()
    if isinstance(error, grpc.aio.AbortError) and code is not None:
        name = code.name if isinstance(code, grpc.StatusCode) else str(code)
        return name, context.details() or None
    return grpc.StatusCode.UNKNOWN.name, f"{type(error).__name__}: {error}"  # what grpc answers


def logged(read: Callable[[Any], dict[str, Any]],
           returned: Callable[[Any], dict[str, Any]] | None = None) -> Callable[[Method], Method]:
    """Wrap a servicer method so that each call, however it ends, writes one record.

    ``read(request)`` describes the request's arguments, ``returned(response)`` summarises a
    successful answer. The servicer provides ``access_log`` and ``clock`` (epoch seconds)."""

    def wrap(method: Method) -> Method:
        name = method.__name__

        @functools.wraps(method)
        async def call(self: _Servicer, request: Any, context: grpc.aio.ServicerContext) -> Any:
            started = time.perf_counter()
            rec = _begin(self, name, request, context, read)
            token = _current.set(rec)
            error: BaseException | None = None
            response: Any = None
            try:
                response = await method(self, request, context)
                return response
            except BaseException as e:
                error = e
                raise
            finally:
                _current.reset(token)
                _finish(self, rec, context, error, response, returned, started)

        return call

    return wrap


def _begin(servicer: _Servicer, name: str, request: Any, context: grpc.aio.ServicerContext,
           read: Callable[[Any], dict[str, Any]]) -> AdminAccessRecord:
    try:
        ts = datetime.fromtimestamp(servicer.clock(), timezone.utc).isoformat(timespec="milliseconds")
    except Exception:  # noqa: BLE001 - a broken test clock must not fail the call
        ts = datetime.now(timezone.utc).isoformat(timespec="milliseconds")
    rec = AdminAccessRecord(ts=ts, method=name)
    try:
        md = {k.lower(): v for k, v in (context.invocation_metadata() or ())
              if isinstance(v, str) and not k.endswith("-bin")}
        rec.request_id = _header(md, "x-request-id")
        rec.forwarded_for = _header(md, "x-forwarded-for")
        rec.user_agent = _header(md, "user-agent")
        rec.peer = context.peer() or None
    except Exception as e:  # noqa: BLE001
        log.debug("admin access log: no metadata for %s: %s", name, e)
    try:
        rec.read = read(request)
    except Exception as e:  # noqa: BLE001
        rec.read = {"error": f"{type(e).__name__}: {e}"}
    return rec


def _finish(servicer: _Servicer, rec: AdminAccessRecord, context: grpc.aio.ServicerContext,
            error: BaseException | None, response: Any, returned: Callable[[Any], dict[str, Any]] | None,
            started: float) -> None:
    try:
        rec.duration_ms = round((time.perf_counter() - started) * 1000.0, 3)
        rec.outcome, rec.message = _outcome(context, error)
        if error is None and returned is not None and response is not None:
            rec.returned = returned(response)
    except Exception as e:  # noqa: BLE001
        log.debug("admin access log: could not complete the record of %s: %s", rec.method, e)
    servicer.access_log.write(rec)
