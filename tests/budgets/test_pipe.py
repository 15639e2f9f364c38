"""The budget scripts' (and the response cache's) pipelined connection (extproc/budgets/pipe.py) against a real redis-server
of its own, which these tests stop, freeze and restart: what the pooled redis-py client it
replaced guaranteed must still hold."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import redis.asyncio as aredis
from redis.asyncio.connection import Connection
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from extproc.budgets.pipe import ScriptPipe, _pack_py, pack, sha1
from extproc.procs import Proc, free_port, redis_proc, wait_for_port

ECHO = "return {KEYS[1], ARGV[1], tonumber(ARGV[2]) + 1}"


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[tuple[Proc, int, Path]]:
    port = free_port()
    proc = redis_proc(port, tmp_path / "redis").start()
    try:
        wait_for_port(port, proc=proc)
        yield proc, port, tmp_path / "redis"
    finally:
        try:
            os.kill(proc.pid, signal.SIGCONT)
        except OSError:
            pass
        proc.stop()


def _restart(port: int, data: Path, old: Proc) -> Proc:
    old.stop()
    new = redis_proc(port, data).start()
    wait_for_port(port, proc=new)
    return new


@pytest.mark.parametrize("args", [
    ("EVALSHA", "ab" * 20, 2, "k:1", "k:2", "", "req-1", 1.5, 0.1, 1e20, 1777777777.123456, -3, 0, b"\x00\xff{}"),
    ("GET", "caf\u00e9"),
])
def test_pack_matches_redis_py(args: tuple) -> None:
    """The bytes on the wire are what redis-py's own encoder sends for the same arguments."""
    expect = b"".join(Connection().pack_command(*args))
    assert pack(args) == expect
    assert _pack_py(args) == expect


def test_pack_takes_what_hiredis_refuses() -> None:
    assert pack(("SET", "k", True, bytearray(b"v"))) == b"*4\r\n$3\r\nSET\r\n$1\r\nk\r\n$1\r\n1\r\n$1\r\nv\r\n"
    with pytest.raises(TypeError):
        pack(("SET", "k", object()))


async def test_evalsha_loads_the_script_on_noscript_and_pipelines(own_redis) -> None:
    _, port, _ = own_redis
    pipe = ScriptPipe("127.0.0.1", port)
    try:
        # Not loaded yet: NOSCRIPT, answered by EVAL (which also loads it).
        assert await pipe.evalsha(sha1(ECHO), ECHO, ["k"], ["v", 1]) == [b"k", b"v", 2]
        r = redis.Redis(port=port)
        assert r.script_exists(sha1(ECHO)) == [True]
        r.close()
        # Many calls in flight on the one connection: each gets its own reply, in order.
        got = await asyncio.gather(*(pipe.evalsha(sha1(ECHO), ECHO, [f"k{i}"], [f"v{i}", i]) for i in range(500)))
        assert got == [[f"k{i}".encode(), f"v{i}".encode(), i + 1] for i in range(500)]
        with pytest.raises(ResponseError):
            await pipe.evalsha(sha1("return redis.call('NOPE')"), "return redis.call('NOPE')", [], [])
        # An error reply leaves the connection usable.
        assert await pipe.evalsha(sha1(ECHO), ECHO, ["k"], ["v", 5]) == [b"k", b"v", 6]
    finally:
        await pipe.close()


async def test_reconnects_after_a_redis_restart_without_failing_the_call(own_redis) -> None:
    """After a restart the pipe's connection is dead; the next call is retried once on a new one
    (the pooled client's Retry(1) did the same), and the script, flushed with the old process, is
    loaded again."""
    proc, port, data = own_redis
    pipe = ScriptPipe("127.0.0.1", port)
    try:
        assert await pipe.evalsha(sha1(ECHO), ECHO, ["k"], ["v", 1]) == [b"k", b"v", 2]
        proc = _restart(port, data, proc)
        assert await pipe.evalsha(sha1(ECHO), ECHO, ["k"], ["v", 2]) == [b"k", b"v", 3]
    finally:
        await pipe.close()
        proc.stop()


async def test_redis_down_is_a_connection_error_and_recovers(own_redis) -> None:
    proc, port, data = own_redis
    pipe = ScriptPipe("127.0.0.1", port)
    try:
        proc.stop()
        with pytest.raises((RedisConnectionError, RedisTimeoutError)):
            await pipe.evalsha(sha1(ECHO), ECHO, ["k"], ["v", 1])
        proc = redis_proc(port, data).start()
        wait_for_port(port, proc=proc)
        assert await pipe.evalsha(sha1(ECHO), ECHO, ["k"], ["v", 1]) == [b"k", b"v", 2]
    finally:
        await pipe.close()
        proc.stop()


async def test_a_hung_redis_times_out_every_waiting_call_then_recovers(own_redis) -> None:
    """SIGSTOP: the connection is open but nothing answers. Every call in flight fails with a
    timeout near `timeout` (not Envoy's 3 s), and once Redis runs again a new connection works."""
    proc, port, _ = own_redis
    pipe = ScriptPipe("127.0.0.1", port, timeout=0.3)
    try:
        assert await pipe.evalsha(sha1(ECHO), ECHO, ["k"], ["v", 1]) == [b"k", b"v", 2]
        os.kill(proc.pid, signal.SIGSTOP)
        started = time.monotonic()
        results = await asyncio.gather(*(pipe.evalsha(sha1(ECHO), ECHO, ["k"], ["v", i]) for i in range(20)),
                                       return_exceptions=True)
        waited = time.monotonic() - started
        assert all(isinstance(r, RedisTimeoutError) for r in results), results
        assert waited < 2.5, waited  # the hung Redis must not hold a request to Envoy's message timeout
        os.kill(proc.pid, signal.SIGCONT)
        assert await pipe.evalsha(sha1(ECHO), ECHO, ["k"], ["v", 7]) == [b"k", b"v", 8]
    finally:
        await pipe.close()


async def test_for_client_follows_the_client_db_and_password(tmp_path: Path) -> None:
    port = free_port()
    proc = Proc("redis", ["redis-server", "--bind", "127.0.0.1", "--port", str(port), "--save", "",
                          "--requirepass", "s3cret", "--dir", str(tmp_path)], log_path=tmp_path / "redis.log",
                ports=[port]).start()
    try:
        wait_for_port(port, proc=proc)
        client = aredis.Redis.from_url(f"redis://:s3cret@127.0.0.1:{port}/3")
        pipe = ScriptPipe.for_client(client)
        assert pipe is not None
        try:
            await pipe.evalsha(sha1("return redis.call('SET', KEYS[1], ARGV[1])"),
                               "return redis.call('SET', KEYS[1], ARGV[1])", ["where"], ["db3"])
            assert await client.get("where") == b"db3"  # the same database as the client's
        finally:
            await pipe.close()
            await client.aclose()
        assert ScriptPipe.for_client(aredis.Redis.from_url("rediss://127.0.0.1:6379/0")) is None  # TLS: the pool
    finally:
        proc.stop()


async def test_plain_commands_fail_as_redis_py_ones_and_retry_only_when_asked(own_redis) -> None:
    """The cache's GET and SET on the pipe: a Redis error is redis-py's ResponseError (the cache
    reads it as a miss, or a dropped write) and leaves the connection usable; after a restart a
    GET is retried on a new connection, a SET NX (retry=False) fails instead of running twice."""
    proc, port, data = own_redis
    pipe = ScriptPipe("127.0.0.1", port)
    try:
        assert await pipe.command("SET", "k", b"v", "NX", "PX", 60_000, retry=False) == b"OK"
        assert await pipe.command("SET", "k", b"w", "NX", "PX", 60_000, retry=False) is None  # already there
        with pytest.raises(ResponseError, match="WRONGTYPE"):
            await pipe.command("HGET", "k", "field")
        assert await pipe.command("GET", "k") == b"v"  # the same connection, still in step
        proc = _restart(port, data, proc)
        with pytest.raises((RedisConnectionError, RedisTimeoutError)):  # the dead connection's error, not retried
            await pipe.command("SET", "k2", b"v", "NX", retry=False)
        proc = _restart(port, data, proc)
        assert await pipe.command("GET", "k2") is None  # retried once on a fresh connection
    finally:
        await pipe.close()
        proc.stop()


async def test_a_unix_socket_redis_gets_the_pipe_and_survives_a_restart(tmp_path: Path) -> None:
    """A client of a Redis on a Unix socket (the local stack's, extproc/stack.py) gets a pipe on
    that socket, in the client's database; after Redis restarts (a new socket file at the same
    path) the next call is retried once on a new connection, as over TCP."""
    port, data = free_port(), tmp_path / "redis"
    sock = tmp_path / "redis.sock"
    proc = redis_proc(port, data, sock).start()
    try:
        wait_for_port(port, proc=proc)
        client = aredis.Redis.from_url(f"unix://{sock}?db=2")
        pipe = ScriptPipe.for_client(client)
        assert pipe is not None and pipe._path == str(sock) and pipe._db == 2
        try:
            assert await pipe.evalsha(sha1(ECHO), ECHO, ["k"], ["v", 1]) == [b"k", b"v", 2]
            assert await pipe.command("SET", "where", b"db2") == b"OK"
            assert await client.get("where") == b"db2"  # the client's database, over the same socket
            proc.stop()
            proc = redis_proc(port, data, sock).start()
            wait_for_port(port, proc=proc)
            assert await pipe.evalsha(sha1(ECHO), ECHO, ["k"], ["v", 2]) == [b"k", b"v", 3]
        finally:
            await pipe.close()
            await client.aclose()
    finally:
        proc.stop()
