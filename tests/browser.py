"""Debian's headless Chromium driven over the Chrome DevTools Protocol (a websocket, with aiohttp):
what tests/test_dashboard.py and tests/bench_dashboard.py load the dashboard in.

Chromium is started on a free loopback debugging port with a fresh profile directory, in its own
session (extproc/procs.py Proc), and stopped by PID (its process group) by `chromium()`'s exit,
however the caller ends. No network beyond loopback is needed: the flags turn off every
background fetch (component updates, sync, QUIC, first-run).
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import shutil
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp

from extproc.procs import Proc, free_port, wait_for_port

CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--hide-scrollbars", "--mute-audio"]


def available() -> bool:
    return Path(CHROMIUM).exists() or shutil.which("chromium") is not None


class Page:
    """One tab, spoken to over its own DevTools websocket."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self.events: list[dict[str, Any]] = []
        self._waiters: dict[str, list[asyncio.Future[Any]]] = {}
        self._reader = asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> None:
        async for msg in self.ws:
            if msg.type != aiohttp.WSMsgType.TEXT:
                continue
            data = json.loads(msg.data)
            fut = self._pending.pop(data.get("id", -1), None)
            if fut is not None and not fut.done():
                fut.set_result(data)
            elif "method" in data:
                self.events.append(data)
                for fut in self._waiters.pop(data["method"], []):
                    if not fut.done():
                        fut.set_result(data)

    async def send(self, method: str, timeout: float = 60.0, **params: Any) -> dict[str, Any]:
        i = next(self._ids)
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[i] = fut
        await self.ws.send_str(json.dumps({"id": i, "method": method, "params": params}))
        data = await asyncio.wait_for(fut, timeout)
        if "error" in data:
            raise RuntimeError(f"{method}: {data['error']}")
        return data.get("result", {})

    async def evaluate(self, expression: str, timeout: float = 60.0) -> Any:
        """The value of a JS expression (promises awaited), as JSON."""
        r = await self.send("Runtime.evaluate", timeout=timeout, expression=expression, awaitPromise=True,
                            returnByValue=True)
        if "exceptionDetails" in r:
            raise RuntimeError(f"JS error: {r['exceptionDetails']}")
        return r.get("result", {}).get("value")

    async def goto(self, url: str, *, headers: dict[str, str] | None = None, width: int = 1280,
                   height: int = 1600) -> None:
        """Navigate with `headers` added to every request the tab makes, and wait for the load event."""
        await self.send("Page.enable")
        await self.send("Network.enable")
        await self.send("Network.setExtraHTTPHeaders", headers=headers or {})
        await self.send("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1,
                        mobile=False)
        loaded = self.next_event("Page.loadEventFired")
        await self.send("Page.navigate", url=url)
        await asyncio.wait_for(loaded, 60)

    def next_event(self, method: str) -> "asyncio.Future[Any]":
        """A future for the next `method` event (register it before causing the event)."""
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(method, []).append(fut)
        return fut

    async def wait_state(self, *states: str, timeout: float = 60.0) -> str:
        """Wait (event-driven, in the page) until <body data-state> is one of `states`."""
        want = json.dumps(list(states))
        return await self.evaluate(f"""new Promise((resolve) => {{
            const want = {want};
            const done = () => document.body && want.includes(document.body.dataset.state);
            if (done()) return resolve(document.body.dataset.state);
            const obs = new MutationObserver(() => {{ if (done()) {{ obs.disconnect(); resolve(document.body.dataset.state); }} }});
            obs.observe(document.documentElement, {{attributes: true, subtree: true, attributeFilter: ["data-state"]}});
        }})""", timeout=timeout)

    async def screenshot(self, path: Path) -> Path:
        r = await self.send("Page.captureScreenshot", format="png", captureBeyondViewport=True)
        path.write_bytes(base64.b64decode(r["data"]))
        return path

    async def close(self) -> None:
        self._reader.cancel()
        await self.ws.close()


class Browser:
    def __init__(self, port: int, session: aiohttp.ClientSession) -> None:
        self.port = port
        self.session = session

    async def new_page(self) -> Page:
        async with self.session.put(f"http://127.0.0.1:{self.port}/json/new?about:blank") as r:
            target = await r.json(content_type=None)
        ws = await self.session.ws_connect(target["webSocketDebuggerUrl"], max_msg_size=0)
        return Page(ws)


@asynccontextmanager
async def chromium(log_dir: Path) -> AsyncIterator[Browser]:
    """A headless Chromium with a fresh profile under a temporary directory; stopped (SIGTERM,
    then SIGKILL, to its process group) and the profile removed on exit."""
    port = free_port()
    profile = Path(tempfile.mkdtemp(prefix="chromium-profile-", dir=log_dir))
    proc = Proc("chromium", [CHROMIUM, *FLAGS, f"--user-data-dir={profile}", f"--remote-debugging-port={port}",
                             "--remote-debugging-address=127.0.0.1", "about:blank"],
                log_path=log_dir / "chromium.log", ports=[port])
    proc.start()
    try:
        wait_for_port(port, timeout=30, proc=proc)
        async with aiohttp.ClientSession() as session:
            yield Browser(port, session)
    finally:
        proc.stop()
        shutil.rmtree(profile, ignore_errors=True)
