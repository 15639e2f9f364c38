"""Shared fixtures. Every process a fixture starts is stopped by PID, even when a test fails."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from extproc.procs import free_port, redis_proc, wait_for_port


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real redis-server on a free loopback port for the whole session."""
    port = free_port()
    proc = redis_proc(port, tmp_path_factory.mktemp("redis")).start()
    try:
        wait_for_port(port, proc=proc)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.stop()
