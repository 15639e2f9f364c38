"""One pipelined Redis connection for the budget scripts and the response cache's reads and
writes: the hot path's only Redis client.

Every forwarded request runs two scripts (reserve, then settle). Through redis-py each call took
a connection from the pool, packed its arguments through the generic encoder, ran a retry
wrapper and armed a read timeout: about a fifth of the ext_proc's Python samples under load
(py-spy, `make bench`), for work Redis itself finishes in microseconds. Here every call is one
`write` of a command packed by hiredis onto one shared connection, and Redis's replies, which come
back in the order the commands were sent, are matched to a FIFO of futures by hiredis.

It keeps the guarantees the pooled client gave (extproc/app.py `redis_client`):
* a reply that takes longer than `timeout` fails the calls waiting on that connection with
  TimeoutError and drops the connection (a hung Redis turns into a clear error well inside
  Envoy's 3 s message timeout; the next call reconnects);
* a call that fails because the connection was lost is retried once, at once, on a new one
  (after a Redis restart the old connection is dead; every script is idempotent per request,
  so running one twice is safe);
* NOSCRIPT (Redis restarted, or SCRIPT FLUSH) is answered by sending the script's text (EVAL),
  which also loads it again.
Errors are redis-py's exception types, so BudgetStore maps them as before. The deadline is
checked by one timer per connection, not one per call.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
from typing import Any

import hiredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError


def pack(args: tuple[Any, ...]) -> bytes:
    """One RESP command: an array of bulk strings (ints as decimal, floats as repr, like redis-py).

    hiredis packs in C (2.5x faster than the same loop in Python for a settle's ~50 arguments);
    it refuses other types (bool, bytearray), which `_pack_py` sends as redis-py would."""
    try:
        return hiredis.pack_command(args)
    except TypeError:
        return _pack_py(args)


def _pack_py(args: tuple[Any, ...]) -> bytes:
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        if isinstance(a, (bytes, bytearray, memoryview)):
            b = bytes(a)
        elif isinstance(a, str):
            b = a.encode()
        elif isinstance(a, int):
            b = b"%d" % a
        elif isinstance(a, float):
            b = repr(a).encode()
        else:
            raise TypeError(f"cannot send {type(a).__name__} to Redis")
        out.append(b"$%d\r\n%b\r\n" % (len(b), b))
    return b"".join(out)


class _Conn(asyncio.Protocol):
    """One TCP connection: writes commands, resolves their futures in order."""

    def __init__(self, loop: asyncio.AbstractEventLoop, timeout: float) -> None:
        self._loop = loop
        self._timeout = timeout
        self._reader = hiredis.Reader()
        self._pending: collections.deque[tuple[float, asyncio.Future[Any]]] = collections.deque()
        self._transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self.lost = False

    # ---- asyncio.Protocol ----
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        reader = self._reader
        reader.feed(data)
        pending = self._pending
        while True:
            try:
                reply = reader.gets()
            except hiredis.ProtocolError as e:
                self._fail(RedisConnectionError(f"Redis protocol error: {e}"))
                return
            if reply is False:
                return
            if not pending:  # a reply nobody asked for: the stream is out of step
                self._fail(RedisConnectionError("unexpected reply from Redis"))
                return
            _, fut = pending.popleft()
            if not fut.done():  # a caller that was cancelled left its slot
                fut.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(RedisConnectionError(f"Redis connection lost: {exc}" if exc else "Redis closed the connection"))

    # ---- calls ----
    def send(self, command: bytes) -> "asyncio.Future[Any]":
        if self.lost or self._transport is None:
            raise RedisConnectionError("Redis connection lost")
        # Written at once (uvloop sends it in this call when nothing is queued before it). Holding
        # commands to write them together at the end of the loop turn saved few syscalls (1.3
        # commands per write under load at 32 connections) and cost every call a loop turn.
        # Before its future joins the FIFO: a write that raises leaves the FIFO in step.
        self._transport.write(command)
        fut = self._loop.create_future()
        deadline = self._loop.time() + self._timeout
        self._pending.append((deadline, fut))
        if self._timer is None:
            self._timer = self._loop.call_at(deadline, self._check)
        return fut

    def _check(self) -> None:
        self._timer = None
        if not self._pending:
            return
        deadline = self._pending[0][0]
        if deadline <= self._loop.time():
            self._fail(RedisTimeoutError(f"Redis did not answer within {self._timeout:g} s"))
        else:
            self._timer = self._loop.call_at(deadline, self._check)

    def _fail(self, exc: Exception) -> None:
        """Fail every waiting call and drop the connection: after a timeout or an error its
        replies can no longer be matched to their calls."""
        self.lost = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        while self._pending:
            _, fut = self._pending.popleft()
            if not fut.done():
                fut.set_exception(exc)
        if self._transport is not None:
            self._transport.abort()

    def close(self) -> None:
        self._fail(RedisConnectionError("closed"))


class ScriptPipe:
    """EVALSHA over one pipelined connection to Redis, over TCP or a Unix socket (`path`),
    reconnecting as needed."""

    def __init__(self, host: str, port: int, *, path: str | None = None, db: int = 0, username: str | None = None,
                 password: str | None = None, timeout: float = 0.5, connect_timeout: float = 0.5) -> None:
        self._host, self._port, self._path, self._db = host, port, path, db
        self._username, self._password = username, password
        self._timeout, self._connect_timeout = timeout, connect_timeout
        self._conn: _Conn | None = None
        self._connecting: asyncio.Task[_Conn] | None = None
        self._closed = False

    @classmethod
    def for_client(cls, redis: Any) -> "ScriptPipe | None":
        """A pipe to the same server as a redis-py client: plain TCP or a Unix socket (None for
        anything else, e.g. TLS: the store then keeps using the client)."""
        from redis.asyncio.connection import Connection, UnixDomainSocketConnection

        pool = redis.connection_pool
        kw = pool.connection_kwargs
        if pool.connection_class is UnixDomainSocketConnection:
            where: dict[str, Any] = {"host": "", "port": 0, "path": kw["path"]}
        elif pool.connection_class is Connection:
            where = {"host": kw.get("host", "localhost"), "port": int(kw.get("port", 6379))}
        else:
            return None
        return cls(**where, db=int(kw.get("db", 0) or 0),
                   username=kw.get("username"), password=kw.get("password"),
                   timeout=kw.get("socket_timeout") or 0.5, connect_timeout=kw.get("socket_connect_timeout") or 0.5)

    async def _connect(self) -> _Conn:
        loop = asyncio.get_running_loop()
        conn = _Conn(loop, self._timeout)
        where = self._path or f"{self._host}:{self._port}"
        connecting = (loop.create_unix_connection(lambda: conn, self._path) if self._path
                      else loop.create_connection(lambda: conn, self._host, self._port))
        try:
            await asyncio.wait_for(connecting, self._connect_timeout)
        except asyncio.TimeoutError:
            raise RedisTimeoutError(f"connecting to Redis at {where} timed out") from None
        except OSError as e:
            raise RedisConnectionError(f"cannot connect to Redis at {where}: {e}") from e
        setup: list[tuple[Any, ...]] = []
        if self._password is not None:
            setup.append(("AUTH", self._username, self._password) if self._username else ("AUTH", self._password))
        if self._db:
            setup.append(("SELECT", self._db))
        for cmd in setup:
            reply = await conn.send(pack(cmd))
            if isinstance(reply, hiredis.ReplyError):
                conn.close()
                raise RedisConnectionError(f"Redis refused {cmd[0]}: {reply}")
        return conn

    async def _ready(self) -> _Conn:
        conn = self._conn
        if conn is not None and not conn.lost:
            return conn
        if self._closed:
            raise RedisConnectionError("the script pipe is closed")
        if self._connecting is None:
            self._connecting = asyncio.get_running_loop().create_task(self._connect())
        task = self._connecting
        try:
            conn = await asyncio.shield(task)
        finally:
            if self._connecting is task and task.done():
                self._connecting = None
        self._conn = conn
        return conn

    async def _call(self, command: bytes) -> Any:
        conn = self._conn
        if conn is None or conn.lost:
            conn = await self._ready()
        return await conn.send(command)

    async def evalsha(self, sha: str, script: str, keys: list[str], args: list[Any]) -> Any:
        """Run a script by its SHA1; with NOSCRIPT, by its text. Raises redis-py's exceptions."""
        tail = (len(keys), *keys, *args)
        command = pack(("EVALSHA", sha, *tail))
        try:
            reply = await self._call(command)
        except RedisConnectionError:
            reply = await self._call(command)  # once, on a fresh connection (see the module docstring)
        if isinstance(reply, hiredis.ReplyError):
            if str(reply).startswith("NOSCRIPT"):
                reply = await self._call(pack(("EVAL", script, *tail)))
                if not isinstance(reply, hiredis.ReplyError):
                    return reply
            raise ResponseError(str(reply))
        return reply

    async def command(self, *args: Any, retry: bool = True) -> Any:
        """Any other command on the same connection (the response cache's GET and SET): its reply,
        redis-py's exceptions. `retry` as for scripts, once on a fresh connection; off for a
        command whose second run would answer differently (SET NX)."""
        command = pack(args)
        try:
            reply = await self._call(command)
        except RedisConnectionError:
            if not retry:
                raise
            reply = await self._call(command)
        if isinstance(reply, hiredis.ReplyError):
            raise ResponseError(str(reply))
        return reply

    async def close(self) -> None:
        self._closed = True
        if self._connecting is not None:
            self._connecting.cancel()
        if self._conn is not None:
            self._conn.close()
            self._conn = None


def sha1(text: str) -> str:
    """The SHA1 Redis knows a script by."""
    return hashlib.sha1(text.encode()).hexdigest()
