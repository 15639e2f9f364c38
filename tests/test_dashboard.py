"""The spend dashboard in a real browser against the real stack (Debian's headless Chromium, driven
over the DevTools protocol: tests/browser.py), plus its data on real Redis.

A stack of its own (own Redis, like tests/test_e2e_admin.py), so its usage holds exactly this
module's traffic and `tollgate report` can be compared with the page to the nano-dollar. The mix:
the README's trial walkthrough (allowed, downgraded, blocked), a clamped request from the
budget-bot identity, and plain requests from an admin, an IC (team web) and team ml. The page is
checked against `tollgate report` / `tollgate budgets` run as commands on the same Redis, and
against the decisions the clients were actually given; a non-admin sees only their own data.
Screenshots go to the test's tmp dir; with TOLLGATE_UPDATE_SCREENSHOT=1 the admin one is copied
to docs/dashboard.png (the README's).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import shutil
import subprocess
import sys
import uuid
from collections import Counter
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis.asyncio as aredis

from extproc.stack import Stack
from extproc.usage import aggregate, count_blocked, read_rollups, usage_write
from tests import browser
from tests.conftest import REPO, running_stack
from tests.e2e_idp import TestIdP

pytestmark = pytest.mark.skipif(not browser.available(), reason="needs Debian's chromium (make chromium-binary)")

ADMIN, IC, ML, TRIAL, BOT = "key-admin", "key-ic", "key-ml", "trial", "key-budget"


# ---- the rollup side, on real Redis ----------------------------------------------------------

async def test_decisions_are_rolled_up_per_day(redis_url):
    """Settled requests count their decision with their metrics; blocks are counted apart, and a
    tuple that was only ever blocked makes no report row (reports are unchanged) but counts."""
    prefix = f"dash-{uuid.uuid4().hex[:6]}:"
    r = aredis.Redis.from_url(redis_url)
    try:
        base = {"ts": "2026-12-10T10:00:00+00:00", "team": "ml", "groups": [], "model_served": "gpt-4o",
                "provider": "fake", "cost_nusd": 5}
        for user, decision in [("a", "allowed"), ("a", "allowed"), ("a", "downgraded"), ("b", "clamped")]:
            w = usage_write({**base, "user": user, "decision": decision}, prefix=prefix)
            for f, v in w.increments:
                await r.hincrby(w.usage_key, f, v)
        await count_blocked(r, {**base, "user": "a", "decision": "blocked"}, prefix=prefix)
        await count_blocked(r, {**base, "user": "c", "decision": "blocked"}, prefix=prefix)
        day = dt.date(2026, 12, 10)
        days = await read_rollups(r, day, day, prefix=prefix)
        by_user = aggregate(days, group_by=["user"])
        assert {row.key["user"]: (row.requests, row.cost_nusd) for row in by_user.rows} == {"a": (3, 15), "b": (1, 5)}
        assert {row.key["user"]: row.decisions for row in by_user.rows} == {
            "a": {"allowed": 2, "downgraded": 1, "blocked": 1}, "b": {"clamped": 1}}
        assert by_user.totals.decisions == {"allowed": 2, "downgraded": 1, "clamped": 1, "blocked": 2}
        assert by_user.totals.requests == 4  # blocks are not requests that reached a provider
        with_blocked = aggregate(days, group_by=["user"], blocked_only_rows=True)
        assert {row.key["user"] for row in with_blocked.rows} == {"a", "b", "c"}
    finally:
        keys = [k async for k in r.scan_iter(match=f"{prefix}*")]
        if keys:
            await r.delete(*keys)
        await r.aclose()


# ---- through the stack and the browser -------------------------------------------------------

@pytest.fixture(scope="module")
def dash_stack(policy_dir: Path, idp: TestIdP, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with running_stack(policy_dir, idp, tmp_path_factory.mktemp("dashboard-stack")) as s:
        yield s


def _chat(stack: Stack, key: str, model: str, max_tokens: int = 60, extra: dict[str, str] | None = None) -> str:
    """One chat request; returns the decision the client was told (`blocked` for a 429)."""
    r = httpx.post(f"{stack.base_url}/v1/chat/completions", timeout=20,
                   headers={"authorization": f"Bearer {key}", **(extra or {})},
                   json={"model": model, "max_tokens": max_tokens, "messages": [{"role": "user", "content": "hi there"}]})
    if r.status_code == 429:
        return "blocked"
    assert r.status_code == 200, r.text
    return r.headers["x-tollgate-decision"]


@pytest.fixture(scope="module")
def traffic(dash_stack: Stack) -> Counter:
    """The scripted mix; returns the decisions the clients were given."""
    told: Counter = Counter()
    for _ in range(5):  # the README walkthrough: allowed x2, downgraded x2, blocked
        told[_chat(dash_stack, TRIAL, "gpt-4o", max_tokens=200)] += 1
    clamp = {"x-tollgate-metadata": json.dumps({"suite": "clamp", "run": uuid.uuid4().hex})}
    told[_chat(dash_stack, BOT, "gpt-4o", max_tokens=4000, extra=clamp)] += 1
    for key, model, n in [(ADMIN, "gpt-4o", 3), (ADMIN, "gpt-4o-mini", 1), (IC, "gpt-4o-mini", 4),
                          (IC, "gpt-4o", 2), (ML, "gpt-4o", 3)]:
        for _ in range(n):
            told[_chat(dash_stack, key, model)] += 1
    assert told["blocked"] >= 1 and told["downgraded"] >= 1 and told["clamped"] == 1, told
    return told


def _cli(stack: Stack, *args: str) -> Any:
    out = subprocess.run([sys.executable, "-m", "extproc.cli", *args, "--redis-url", stack.redis_url,
                          "--format", "json"], capture_output=True, text=True, timeout=60, cwd=REPO, check=True)
    return json.loads(out.stdout)


def _report(stack: Stack, by: str, day: str, *extra: str) -> dict[str, Any]:
    return _cli(stack, "report", "--by", by, "--from", day, "--to", day, *extra)


# what the page shows, read out of its DOM
READ_PAGE = """(() => {
  const rows = (name) => [...document.querySelectorAll(`table[data-table="${name}"] tbody tr`)].map((tr) =>
      Object.fromEntries([...tr.querySelectorAll("td")].map((td) => [td.dataset.col, td.dataset.exact ?? td.textContent])));
  return {state: document.body.dataset.state, who: document.getElementById("who").textContent,
          scope: document.getElementById("scope").textContent,
          total: document.getElementById("total-cost").textContent,
          blocked: document.getElementById("total-blocked").textContent,
          top: rows("top"), budgets: rows("budgets"), decisions: rows("decisions"),
          csv_top: window.tollgateCsv("top"), csv_budgets: window.tollgateCsv("budgets"),
          bars: document.querySelectorAll("#spend-chart rect").length,
          ready_ms: window.tollgateReadyMs};
})()"""


def _dollars(text: str) -> Decimal:
    return Decimal(text.replace("$", "").replace(",", ""))


async def _open(page: browser.Page, url: str, *, headers: dict[str, str] | None = None) -> dict[str, Any]:
    await page.goto(url, headers=headers)
    state = await page.wait_state("ready", "signin", "error")
    data = await page.evaluate(READ_PAGE) if state == "ready" else {"state": state}
    return data


def _check_top(page_rows: list[dict], report: dict, by: str) -> None:
    shown = {r["key"] if r["key"] != "(none)" else "": (_dollars(r["cost_usd"]), int(r["requests"].replace(",", "")))
             for r in page_rows}
    expected = {r[by]: (Decimal(str(r["cost_nusd"])) / 10**9, r["requests"]) for r in report["rows"]}
    assert shown == expected


async def test_dashboard_in_chromium_matches_the_cli(dash_stack: Stack, traffic: Counter, tmp_path: Path):
    today = dt.datetime.now(dt.timezone.utc).date().isoformat()
    base = f"{dash_stack.admin_api_url}/dashboard"
    async with browser.chromium(tmp_path) as chrome:
        page = await chrome.new_page()
        await page.send("Network.enable")

        # no credential: the sign-in form; a wrong one: refused, still the form
        assert (await _open(page, f"{base}#from={today}&to={today}&by=team"))["state"] == "signin"
        await page.evaluate("""(() => { document.getElementById("cred").value = "not-a-key";
            document.getElementById("signin-form").requestSubmit(); })()""")
        await page.wait_state("signin")
        assert "refused" in await page.evaluate('document.getElementById("signin-msg").textContent')

        # the admin signs in with the form (the key is kept in sessionStorage for the tab)
        await page.evaluate(f"""(() => {{ document.getElementById("cred").value = "{ADMIN}";
            document.getElementById("signin-form").requestSubmit(); }})()""")
        assert await page.wait_state("ready", "error", "signin") == "ready"
        admin = await page.evaluate(READ_PAGE)
        assert "admin@example.com" in admin["who"] and "ADMIN" in admin["who"]
        by_team = _report(dash_stack, "team", today)
        _check_top(admin["top"], by_team, "team")
        assert {r["key"] for r in admin["top"]} >= {"demo-team", "web", "ml", "platform", "budget-tests"}
        assert _dollars(admin["total"]) == Decimal(str(by_team["totals"]["cost_nusd"])) / 10**9
        assert admin["bars"] > 0

        # decisions: what the clients were told, per decision, today
        (day_row,) = [d for d in admin["decisions"] if d["day"] == today]
        assert {k: int(day_row[k]) for k in ("allowed", "downgraded", "clamped", "blocked")} == {
            k: traffic[k] for k in ("allowed", "downgraded", "clamped", "blocked")}
        assert admin["blocked"] == str(traffic["blocked"])

        # every live counter, as `tollgate budgets` has it, with forecasts on calendar ones
        cli_budgets = {(b["budget"], b["counter"]): b for b in _cli(dash_stack, "budgets")["rows"]}
        shown = {(b["budget"], b["counter"]): b for b in admin["budgets"]}
        assert set(shown) == set(cli_budgets)
        for k, b in shown.items():
            assert _dollars(b["spent_usd"]) == Decimal(cli_budgets[k]["spent_nusd"]) / 10**9, k
        trial = shown[("trial-frontier", "user=trial")]
        assert trial["forecast"].startswith("user trial ") and "its day" in trial["forecast"], trial
        assert "trial-frontier" in admin["csv_budgets"] and admin["csv_top"].startswith("#,team,spend")

        # the same range split by user, through the selector (submitting sets the state to
        # `loading` synchronously, so the next `ready` is the new range's)
        await page.evaluate("""(() => { document.getElementById("by").value = "user";
            document.getElementById("controls").requestSubmit(); })()""")
        assert await page.wait_state("ready", "error") == "ready"
        by_user_page = await page.evaluate(READ_PAGE)
        _check_top(by_user_page["top"], _report(dash_stack, "user", today), "user")
        await page.evaluate('document.getElementById("by").value = "team"; '
                            'document.getElementById("controls").requestSubmit()')
        assert await page.wait_state("ready", "error") == "ready"
        shot = await page.screenshot(tmp_path / "dashboard-admin.png")
        assert shot.stat().st_size > 10_000
        if os.environ.get("TOLLGATE_UPDATE_SCREENSHOT"):
            shutil.copy(shot, REPO / "docs" / "dashboard.png")

        # nothing but this origin was fetched (data: URLs are the browser's own, never a fetch)
        urls = {e["params"]["request"]["url"] for e in page.events if e.get("method") == "Network.requestWillBeSent"}
        assert urls and all(u.startswith((dash_stack.admin_api_url, "data:", "blob:")) for u in urls), urls
        assert f"{dash_stack.admin_api_url}/dashboard" in urls
        await page.close()

        # an IC, with the credential added to every request (as Cloudflare Access or a proxy does)
        ic_page = await chrome.new_page()
        ic = await _open(ic_page, f"{base}#from={today}&to={today}&by=user",
                         headers={"authorization": f"Bearer {IC}"})
        assert ic["state"] == "ready" and "ic@example.com" in ic["who"] and "ADMIN" not in ic["who"]
        assert "ic@example.com" in ic["scope"]
        _check_top(ic["top"], _report(dash_stack, "user", today, "--where", "user=ic@example.com"), "user")
        assert [r["key"] for r in ic["top"]] == ["ic@example.com"]
        names = {(b["budget"], b["counter"]) for b in ic["budgets"]}
        assert ("engineer-monthly", "user=ic@example.com") in names
        assert not any("trial" in c or "admin" in c for _, c in names), names
        await ic_page.screenshot(tmp_path / "dashboard-ic.png")
        await ic_page.close()


def test_dashboard_api_refuses_bad_arguments_and_anonymous_callers(dash_stack: Stack):
    url = f"{dash_stack.admin_api_url}/admin/v1/dashboard"
    assert httpx.get(url, timeout=10).status_code == 401
    h = {"authorization": f"Bearer {ADMIN}"}
    r = httpx.get(url, params={"by": "colour"}, headers=h, timeout=10)
    assert r.status_code == 400 and "by" in r.json()["message"]
    r = httpx.get(url, params={"from": "2026-12-10", "to": "2026-12-01"}, headers=h, timeout=10)
    assert r.status_code == 400
    page = httpx.get(f"{dash_stack.admin_api_url}/dashboard", timeout=10)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    # self-contained: no external script, style, image or font (the browser test checks what is fetched)
    assert b"<script>" in page.content and b"<style>" in page.content
    assert not re.search(rb"""(src|href)\s*=\s*["']?(https?:)?//|url\(\s*["']?(https?:)?//|@import""", page.content)


def test_budget_status_forecast_through_the_admin_api(dash_stack: Stack, traffic: Counter):
    r = httpx.get(f"{dash_stack.admin_api_url}/admin/v1/budgets", params={"forecast": "true"},
                  headers={"authorization": f"Bearer {TRIAL}"}, timeout=10)
    assert r.status_code == 200, r.text
    frontier = next(b for b in r.json()["budgets"] if b["name"] == "trial-frontier")
    fc = frontier["forecast"]
    assert fc["sentence"].startswith("user trial") and "weighted mean" in fc["method"]
    assert int(fc["projected_nusd"]) >= int(frontier["spent_nusd"]) and fc["period_end"].endswith("Z")
    # `tollgate budgets --forecast`: the same forecast for the same counter
    rows = _cli(dash_stack, "budgets", "--forecast", "--policies", str(dash_stack.policies), "--where", "user=trial")["rows"]
    cli = next(r for r in rows if r["budget"] == "trial-frontier")
    # (the amounts move with the clock between the two calls: the sentence and method do not)
    assert cli["forecast"] == fc["sentence"] and cli["forecast_method"] == fc["method"]
    assert cli["projected_usd"] >= cli["spent_usd"]
    # without the flag: no forecast
    plain = httpx.get(f"{dash_stack.admin_api_url}/admin/v1/budgets", headers={"authorization": f"Bearer {TRIAL}"},
                      timeout=10).json()
    assert all(not b.get("forecast") for b in plain["budgets"])
