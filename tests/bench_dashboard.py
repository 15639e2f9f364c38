"""How long the dashboard takes to load with a big history: a measurement, not a test.

    .venv/bin/python -m tests.bench_dashboard [--users 1000] [--days 90] [--runs 3]

Starts the real stack on free ports (its own Redis, the fake provider, one ext_proc, Envoy), seeds
its Redis with `--days` days of usage rollups for `--users` users (20 teams, 4 models on 2
providers, each user on 1 to 3 models a day, every decision kind) and one live
`engineer-monthly` counter per user, then loads the page in headless Chromium as an admin and
prints, per view, the median over `--runs` loads of:

* `page`: from navigation start to the page's `ready` state (data fetched, every panel drawn),
  as the page itself measures it (`performance.now()` at ready);
* `api`: the GetDashboard call alone, through Envoy (httpx, same query).

Views: the default (last 30 days, by team), all `--days` days by user (the largest answer), and a
non-admin's own view. Everything, Chromium included, shares the machine's cores; the numbers are
printed, never asserted. Every process is stopped by PID at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import random
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import httpx
import orjson
import redis

from extproc.stack import Stack, StackPorts
from extproc.usage import DECISION_FIELD, METRICS, usage_key
from tests import browser
from tests.conftest import FAKE_GATEWAY_KEY, REPO
from tests.e2e_idp import TestIdP

TEAMS = [f"team-{i:02d}" for i in range(20)]
MODELS = [("gpt-4o", "openai", 2_500, 10_000), ("gpt-4o-mini", "openai", 150, 600),
          ("claude-sonnet-4-6", "anthropic", 3_000, 15_000), ("claude-haiku-4-5", "anthropic", 1_000, 5_000)]


def seed(r: redis.Redis, users: int, days: int, today: dt.date) -> int:
    """Rollups as the settle script writes them (`metric|tuple` fields), and the counters."""
    rng = random.Random(13)
    fields = 0
    for back in range(days):
        day = today - dt.timedelta(days=back)
        h: dict[str, int] = {}
        for u in range(users):
            user = f"user{u:04d}@example.com"
            team = TEAMS[u % len(TEAMS)]
            for model, provider, nin, nout in rng.sample(MODELS, rng.randint(1, 3)):
                tup = orjson.dumps([user, team, "", ["ics"], model, provider, ""]).decode()
                n = rng.randint(1, 40)
                tin, tout = n * rng.randint(200, 2000), n * rng.randint(50, 800)
                vals = {"requests": n, "input_tokens": tin, "output_tokens": tout, "cost_nusd": tin * nin + tout * nout}
                for m in METRICS:
                    h[f"{m}|{tup}"] = vals.get(m, 0)
                h[f"{DECISION_FIELD}allowed|{tup}"] = n - n // 10
                h[f"{DECISION_FIELD}downgraded|{tup}"] = n // 10
                if rng.random() < 0.05:
                    h[f"{DECISION_FIELD}blocked|{tup}"] = rng.randint(1, 5)
        key = usage_key("tollgate:", day)
        items = list(h.items())
        for i in range(0, len(items), 20_000):
            r.hset(key, mapping=dict(items[i:i + 20_000]))
        fields += len(items)
    period = today.strftime("%Y-%m")
    nxt = (today.replace(day=1) + dt.timedelta(days=32)).replace(day=1)
    until = dt.datetime(nxt.year, nxt.month, 1, tzinfo=dt.timezone.utc).timestamp()
    pipe = r.pipeline(transaction=False)
    for u in range(users):
        key = f"tollgate:b:engineer-monthly:{period}:user=user{u:04d}@example.com"
        pipe.hset(key, mapping={"spent": rng.randint(0, 500_000_000_000), "reserved": 0, "limit": 500_000_000_000,
                                "until": until})
    pipe.execute()
    return fields


async def measure(stack: Stack, runs: int, days: int, work: Path,
                  screenshot: Path | None = None) -> list[tuple[str, float, float]]:
    today = dt.datetime.now(dt.timezone.utc).date()
    first90 = (today - dt.timedelta(days=days - 1)).isoformat()
    views = [("admin, last 30 days by team", "key-admin", {}),
             (f"admin, {days} days by user", "key-admin", {"from": first90, "to": today.isoformat(), "by": "user"}),
             ("non-admin (own data), last 30 days", "key-ic", {})]
    out = []
    async with browser.chromium(work) as chrome:
        for name, key, params in views:
            page_ms, api_ms = [], []
            for _ in range(runs):
                t0 = time.perf_counter()
                r = httpx.get(f"{stack.admin_api_url}/admin/v1/dashboard", params=params, timeout=300,
                              headers={"authorization": f"Bearer {key}"})
                api_ms.append((time.perf_counter() - t0) * 1000)
                assert r.status_code == 200, r.text[:300]
                page = await chrome.new_page()
                frag = "&".join(f"{k}={v}" for k, v in params.items())
                await page.goto(f"{stack.admin_api_url}/dashboard#{frag}", headers={"authorization": f"Bearer {key}"})
                state = await page.wait_state("ready", "error", "signin", timeout=600)
                assert state == "ready", state
                page_ms.append(await page.evaluate("window.tollgateReadyMs"))
                if screenshot is not None and not out and not page_ms[1:]:
                    await page.screenshot(screenshot)
                await page.close()
            out.append((name, statistics.median(page_ms), statistics.median(api_ms)))
            print(f"  {name:40s} page {statistics.median(page_ms):8.0f} ms   api {statistics.median(api_ms):8.0f} ms"
                  f"   (page runs: {', '.join(f'{x:.0f}' for x in page_ms)})", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--users", type=int, default=1000)
    ap.add_argument("--days", type=int, default=90)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--screenshot", type=Path, help="save the first view's page as a PNG here")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-dashboard-"))
    policies = work / "policies"
    policies.mkdir()
    for src in (REPO / "policies", REPO / "tests" / "policies"):
        for f in sorted(src.glob("*.yaml")):
            shutil.copy(f, policies / f.name)
    idp = TestIdP().start()
    stack = Stack(policies, work / "stack", StackPorts.free(1),
                  extra_env={"TOLLGATE_FAKE_KEY": FAKE_GATEWAY_KEY, "TEST_JWKS_PORT": str(idp.port)})
    try:
        stack.start()
        r = redis.Redis.from_url(stack.redis_url)
        t0 = time.perf_counter()
        fields = seed(r, args.users, args.days, dt.datetime.now(dt.timezone.utc).date())
        mem = r.info("memory")["used_memory"] / 2**20
        print(f"seeded {args.days} days x {args.users} users: {fields:,} rollup fields + {args.users} counters "
              f"in {time.perf_counter() - t0:.1f} s; Redis used_memory {mem:.0f} MiB", flush=True)
        asyncio.run(measure(stack, args.runs, args.days, work, args.screenshot))
    finally:
        stack.stop()
        idp.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
