"""A webhook receiver for the alert tests: a real aiohttp server on a free loopback port.

It runs on its own event loop in a thread (so synchronous tests and the ext_procs of a real stack
can post to it), keeps every JSON body it gets per path, and answers as each path is told:
`fail(path, 500, 500)` answers 500 twice then 200; `hang(path)` never answers (until stopped).
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable
from typing import Any

from aiohttp import web

from extproc.procs import free_port


class Receiver:
    def __init__(self) -> None:
        self.port = free_port()
        self._lock = threading.Lock()
        self._got: dict[str, list[dict[str, Any]]] = {}
        self._attempts: dict[str, int] = {}
        self._plans: dict[str, list[int]] = {}
        self._hang: set[str] = set()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._runner: web.AppRunner | None = None
        self._stopping: asyncio.Event | None = None

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}/{path.lstrip('/')}"

    def start(self) -> "Receiver":
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self

    async def _start(self) -> None:
        self._stopping = asyncio.Event()
        app = web.Application()
        app.router.add_post("/{path:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def _handle(self, request: web.Request) -> web.Response:
        path = "/" + request.match_info["path"]
        body = await request.read()
        with self._lock:
            self._attempts[path] = self._attempts.get(path, 0) + 1
            if path in self._hang:
                hang = True
            else:
                hang = False
                plan = self._plans.get(path) or []
                status = plan.pop(0) if plan else 200
                if status == 200:
                    self._got.setdefault(path, []).append(json.loads(body))
        if hang:
            assert self._stopping is not None
            await self._stopping.wait()
            return web.Response(status=503)
        return web.json_response({"ok": status == 200}, status=status)

    def fail(self, path: str, *statuses: int) -> None:
        with self._lock:
            self._plans[path] = list(statuses)

    def hang(self, path: str) -> None:
        with self._lock:
            self._hang.add(path)

    def got(self, path: str) -> list[dict[str, Any]]:
        """Bodies answered 200 on `path`, in order."""
        with self._lock:
            return list(self._got.get(path, []))

    def attempts(self, path: str) -> int:
        with self._lock:
            return self._attempts.get(path, 0)

    def wait_for(self, check: Callable[[], bool], timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while not check():
            assert time.monotonic() < deadline, f"not within {timeout} s"
            time.sleep(0.05)

    def stop(self) -> None:
        async def _stop() -> None:
            if self._stopping is not None:
                self._stopping.set()
            if self._runner is not None:
                await self._runner.cleanup()

        try:
            asyncio.run_coroutine_threadsafe(_stop(), self._loop).result(10)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)

