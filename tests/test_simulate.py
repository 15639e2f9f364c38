"""`tollgate simulate` (what the gateway would do with one request, writing nothing) and `tollgate check`'s summary.

Unit tests run against the session Redis, in a database of their own (DB 7), seeded by the real
budget engine; the end-to-end tests ask `simulate` first, then send the same request through the
live stack and check that the gateway did what `simulate` said. Those use the budget-bot
identity with a fresh `run` per test (tests/policies/test-budgets.yaml counts per run), and
key-ic / key-intern only for one request each, so no other test's counters move.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis.asyncio as aredis

from extproc import decide
from extproc.budgets import BudgetEngine
from extproc.config import Config, load_config
from extproc.procs import free_port
from extproc.providers import api_for_path
from extproc.simulate import parse_as, render_text, simulate, source_map
from tests.conftest import REPO, JsonLog

TRIAL = {"user": "trial", "email": "trial@example.com", "groups": ["trial"], "team": "demo-team", "app": "readme",
         "source": "api_key:trial"}
IC = {"user": "ic@example.com", "email": "ic@example.com", "groups": ["ics", "engineers"], "team": "web",
      "source": "api_key:ic"}
INTERN = {"user": "intern@example.com", "email": "intern@example.com", "groups": ["interns"], "team": "web",
          "source": "api_key:intern"}


def bot(suite: str, run: str | None = None) -> dict[str, Any]:
    """The budget-bot identity with its trusted metadata (tests/policies/gateway.yaml)."""
    return {"user": "budget-bot", "groups": [], "team": "budget-tests", "source": "api_key:budget-bot",
            "suite": suite, "run": run or f"simulate-{uuid.uuid4().hex}"}


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "extproc.cli", *args], capture_output=True, text=True, timeout=60,
                          check=False)


# ---- fixtures ---------------------------------------------------------------------------------

@pytest.fixture
def pdir(tmp_path: Path) -> Path:
    """The shipped policies/ with tests/policies/ laid over them, as the e2e stack runs them."""
    out = tmp_path / "policies"
    out.mkdir()
    for src in (REPO / "policies", REPO / "tests" / "policies"):
        for f in sorted(src.glob("*.yaml")):
            shutil.copy(f, out / f.name)
    return out


@pytest.fixture
def config(pdir: Path) -> Config:
    return load_config(pdir)


@pytest.fixture
def db_url(redis_url: str) -> str:
    """The session Redis, database 7: these tests' own keyspace (flushed before each test)."""
    return redis_url.rsplit("/", 1)[0] + "/7"


@pytest.fixture
async def rds(db_url: str):
    client = aredis.Redis.from_url(db_url, socket_timeout=2, socket_connect_timeout=2)
    await client.flushdb()
    try:
        yield client
    finally:
        await client.aclose()


async def snapshot(client: aredis.Redis) -> tuple[int, dict[bytes, bytes | None]]:
    """DBSIZE and a DUMP of every key (type and content; TTLs tick, so they are left out)."""
    keys = sorted([k async for k in client.scan_iter(match="*")])
    return await client.dbsize(), {k: await client.dump(k) for k in keys}


async def admit(config: Config, client: aredis.Redis, attrs: dict, model: str, *, max_tokens: int | None,
                input_bytes: int, settle_nusd: int | None = None, path: str = "/v1/chat/completions"):
    """What the gateway does (extproc/lifecycle/admitter.py): check, then reserve on the real engine."""
    api = api_for_path(path)
    assert api is not None
    cand = decide.check(config, api, model, max_tokens, attrs, path)
    engine = BudgetEngine(list(config.doc.budgets), client)
    adm = await engine.admit(request_id=uuid.uuid4().hex, attrs=attrs, model=model, provider=cand.provider,
                             input_tokens=input_bytes, max_output_tokens=cand.cap,
                             min_output_tokens=min(16, cand.cap), cost_fn=cand.cost_fn,
                             provider_of=cand.provider_of, lease_seconds=120)
    if settle_nusd is not None and adm.admitted:
        assert await engine.settle(adm, settle_nusd) == "settled"
    return adm, cand


async def sim(config: Config, client: aredis.Redis, attrs: dict, model: str, **kw: Any) -> dict[str, Any]:
    return await simulate(config, client, attrs=attrs, model=model, smap=source_map(config.source), **kw)


def stable(report: dict) -> tuple:
    """The decision and budget rows without the seconds until a reset, which tick."""
    d = dict(report["decision"])
    d["headers"] = {k: v for k, v in d.get("headers", {}).items() if k != "retry-after"}
    if d.get("budget"):
        d["budget"] = {k: v for k, v in d["budget"].items() if k != "retry_after_seconds"}
    return d, [{k: v for k, v in r.items() if k != "retry_after_seconds"} for r in report["budgets"]]


# ---- unit: arguments -------------------------------------------------------------------------

def test_as_pairs_make_an_identity():
    assert parse_as(["user=alice", "groups=interns", "groups=engineers", "run=r1"]) == {
        "user": "alice", "groups": ["interns", "engineers"], "run": "r1"}
    assert parse_as(["groups=a,b"]) == {"groups": ["a", "b"]}
    assert parse_as(["x=1", "x=2"]) == {"x": ["1", "2"]}
    assert parse_as(["email=a=b@example.com"]) == {"email": "a=b@example.com"}
    for bad in (["alice"], ["=x"]):
        with pytest.raises(ValueError):
            parse_as(bad)


# ---- unit: against Redis ---------------------------------------------------------------------

async def test_simulate_predicts_admit_and_writes_nothing(config, rds):
    """The README walkthrough on DB 7: each simulation equals the admission that follows it, and
    leaves every key (and the key count) exactly as it was: no lease, no counter, no script."""
    req = {"max_tokens": 200, "input_bytes": 80}
    # Live counters to read: one settled request, and one still in flight (a live lease).
    await admit(config, rds, TRIAL, "gpt-4o", max_tokens=200, input_bytes=80, settle_nusd=100_000)
    held, _ = await admit(config, rds, TRIAL, "gpt-4o-mini", max_tokens=10, input_bytes=80)
    seen = []
    for _ in range(6):
        before = await snapshot(rds)
        report = await sim(config, rds, TRIAL, "gpt-4o", **req)
        again = await sim(config, rds, TRIAL, "gpt-4o", **req)
        assert await snapshot(rds) == before
        assert not [k for k in before[1] if b"dry-run" in k]
        assert stable(again) == stable(report)

        rows = {r["budget"]: r for r in report["budgets"]}
        assert set(rows) == {"trial-frontier", "demo-team-daily"}
        frontier = rows["trial-frontier"]
        assert frontier["counter"] == {"user": "trial"} and frontier["limit_nusd"] == 2_500_000
        assert frontier["limit_from"] == "default" and frontier["source"].endswith("budgets.yaml:39")
        assert frontier["spend_known"] and frontier["this_request_nusd"] == report["worst_case_nusd"]
        assert rows["demo-team-daily"]["mode"] == "shadow"
        # The amounts the decision used are the counters' own.
        key = frontier["key"].encode()
        assert frontier["spent_nusd"] == int(await rds.hget(key, "spent") or 0)
        assert frontier["reserved_nusd"] == int(await rds.hget(key, "reserved") or 0)

        adm, _ = await admit(config, rds, TRIAL, "gpt-4o", max_tokens=200, input_bytes=80, settle_nusd=400_000)
        d = report["decision"]
        assert (d["decision"], d["model_served"] or adm.model) == (adm.decision, adm.model)
        assert d["budgets"] == adm.budgets
        if adm.decision == "blocked":
            assert d["status"] == 429 and d["code"] == "budget_exceeded" and d["budget"]["name"] == "trial-frontier"
            assert frontier["outcome"] == "block (no fallback fits)"
            assert report["fallbacks"] and not report["fallbacks"][0]["fits"]
        else:
            assert d["status"] == 200
            assert d["tightest"] == (adm.tightest.name if adm.tightest else None)
            if adm.decision == "downgraded":
                assert frontier["outcome"] == "downgrade to gpt-4o-mini" and frontier["over"]
                assert [f["model"] for f in report["fallbacks"]] == ["gpt-4o-mini"]
                assert report["fallbacks"][0]["fits"]
                trial_small = next(r for r in report["fallbacks"][0]["budgets"] if r["budget"] == "trial-small-models")
                assert trial_small["reserved_nusd"] > 0 and trial_small["outcome"] in ("allow", "warn")
            else:
                assert frontier["outcome"] in ("allow", "warn (>= 50%)")
        seen.append(adm.decision)
    assert seen[0] == "allowed" and "downgraded" in seen and seen[-1] == "blocked", seen
    assert held.counters  # the in-flight lease was there all along


async def test_tiers_and_overrides_name_the_limit_that_applies(config, rds):
    senior = {**IC, "user": "senior@example.com", "email": "senior@example.com",
              "groups": ["engineers", "senior-engineers"]}
    alice = {**senior, "user": "alice@example.com", "email": "alice@example.com"}
    want = {"ic": (IC, "500", "default"), "senior": (senior, "2000", "tier 0"),
            "alice": (alice, "3000", "override 0")}
    for who, (attrs, limit, source) in want.items():
        report = await sim(config, rds, attrs, "gpt-4o-mini", input_bytes=100)
        (row,) = report["budgets"]
        assert (row["budget"], row["limit_usd"], row["limit_from"], row["base_limit_usd"]) == (
            "engineer-monthly", limit, source, "500"), who
        assert row["counter"] == {"user": attrs["user"]} and row["spent_nusd"] == 0 and row["outcome"] == "allow"
        if source != "default":
            assert row["limit_source"].endswith("budgets.yaml:" + ("18" if source == "tier 0" else "21")), row
        assert report["decision"]["decision"] == "allowed" and report["decision"]["status"] == 200
        assert report["decision"]["headers"]["x-tollgate-budget-limit-usd"] == f"{limit}.00"


async def test_refusals_before_budgets(config, rds):
    report = await sim(config, rds, INTERN, "gpt-4o", max_tokens=50, input_bytes=100)
    d, acc = report["decision"], report["access"]
    assert (d["decision"], d["status"], d["code"]) == ("refused", 403, "model_not_allowed")
    assert not acc["model_allowed"] and acc["allowed_models"] == d["allowed_models"]
    assert set(d["allowed_models"]) == {"gpt-4.1-nano", "gpt-4o-mini"}
    (rule,) = acc["rules"]
    assert rule["where"] == {"groups": "interns"} and rule["effect"] == "does not list the model"
    assert rule["source"].endswith("test-access.yaml:5"), rule
    assert report["budgets"] == [] and report["worst_case_usd"] is None
    ok = await sim(config, rds, INTERN, "gpt-4o-mini", max_tokens=50, input_bytes=100)
    assert ok["access"]["model_allowed"] and ok["decision"]["status"] == 200
    assert ok["access"]["rules"][0]["effect"] == "allows the model"

    assert (await sim(config, rds, IC, "no-such-model", input_bytes=10))["decision"]["code"] == "model_not_found"
    big = await sim(config, rds, IC, "gpt-4o", input_bytes=config.gateway.max_request_bytes + 1)
    assert (big["decision"]["status"], big["decision"]["code"]) == (413, "request_too_large")
    with pytest.raises(ValueError):
        await sim(config, rds, IC, "gpt-4o", path="/v1/nope", input_bytes=10)
    with pytest.raises(ValueError):
        await sim(config, rds, IC, "gpt-4o", max_tokens=0, input_bytes=10)


async def test_clamp_and_shadow(config, rds):
    attrs = bot("clamp")
    report = await sim(config, rds, attrs, "gpt-4o", input_bytes=120)  # no max_tokens: 16,384 assumed
    d = report["decision"]
    adm, _ = await admit(config, rds, attrs, "gpt-4o", max_tokens=None, input_bytes=120)
    assert d["decision"] == adm.decision == "clamped" and d["max_output_tokens"] == adm.max_output_tokens < 100
    assert d["max_output_tokens_clamped"] and report["budgets"][0]["outcome"] == f"clamp to {adm.max_output_tokens} output tokens"

    shadow = await sim(config, rds, bot("shadow"), "gpt-4o-mini", input_bytes=50)
    assert shadow["decision"]["decision"] == "allowed" and shadow["decision"]["shadow_blocked"] == ["shadow-cap"]
    assert shadow["budgets"][0]["outcome"] == "allow (shadow: would block)"


async def test_redis_unreachable_reports_the_policy_side(config):
    dead = aredis.Redis.from_url(f"redis://127.0.0.1:{free_port()}/0", socket_connect_timeout=1)
    try:
        report = await sim(config, dead, TRIAL, "gpt-4o", max_tokens=200, input_bytes=80)
        assert report["spend"].startswith("unknown: Redis unreachable")
        assert {r["budget"] for r in report["budgets"]} == {"trial-frontier", "demo-team-daily"}
        assert all(not r["spend_known"] and r["spent_nusd"] is None for r in report["budgets"])
        assert report["budgets"][0]["limit_usd"] and report["worst_case_nusd"] > 0
        d = report["decision"]
        assert d["decision"] == "unknown" and d["status"] is None
        assert d["if_store_down"]["status"] == 503 and d["if_store_down"]["code"] == "budget_store_unavailable"
        fail_open = await sim(config, dead, bot("fail-open"), "gpt-4o", max_tokens=20, input_bytes=80)
        assert fail_open["decision"]["if_store_down"]["status"] == 200
        # No budget applies: Redis is not needed, the answer is known.
        ml = await sim(config, dead, {**IC, "groups": ["engineers"], "team": "ml"}, "gpt-4o", input_bytes=80)
        assert ml["spend"] == "not needed" and ml["decision"]["decision"] == "allowed" and ml["budgets"] == []
    finally:
        await dead.aclose()


# ---- unit: the command ------------------------------------------------------------------------

def test_cli_json_table_and_exit_codes(pdir, redis_url):
    import redis

    db_url = redis_url.rsplit("/", 1)[0] + "/8"
    redis.Redis.from_url(db_url).flushdb()
    dead = f"redis://127.0.0.1:{free_port()}/0"
    base = ["simulate", "--policies", str(pdir), "--as", "user=trial", "--as", "groups=trial", "--as",
            "team=demo-team", "--model", "gpt-4o", "--max-tokens", "200", "--input-bytes", "80"]
    r = cli(*base, "--redis-url", dead, "--format", "json")
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert rep["decision"]["decision"] == "unknown" and rep["spend"].startswith("unknown")
    assert "budget store unavailable" not in r.stderr  # said in the report, not logged
    r = cli(*base, "--redis-url", dead)
    assert r.returncode == 0 and "trial-frontier" in r.stdout and "unknown" in r.stdout
    assert "budgets.yaml:39" in r.stdout and "decision: unknown" in r.stdout

    r = cli(*base, "--redis-url", db_url)
    assert r.returncode == 0, r.stderr
    assert "decision: allowed -> 200" in r.stdout and "worst case: $0.0022" in r.stdout
    r = cli("simulate", "--policies", str(pdir), "--as", "groups=interns", "--model", "gpt-4o", "--redis-url", dead)
    assert r.returncode == 0 and "403 model_not_allowed" in r.stdout and "NOT allowed" in r.stdout
    assert "(assumed; give --input-bytes)" in r.stdout

    assert cli("simulate", "--policies", str(pdir), "--as", "alice", "--model", "gpt-4o").returncode == 2
    assert cli("simulate", "--policies", str(pdir), "--model", "gpt-4o", "--path", "/v2/x").returncode == 2
    assert cli("simulate", "--policies", str(pdir)).returncode == 2  # --model is required
    assert cli("simulate", "--policies", str(pdir), "--model", "m", "--input-bytes", "1",
               "--input-tokens", "1").returncode == 2
    (pdir / "gateway.yaml").write_text("gateway:\n  max_request_bytes: lots\n")
    bad = cli("simulate", "--policies", str(pdir), "--model", "gpt-4o")
    assert bad.returncode == 1 and "gateway.yaml:2: gateway.max_request_bytes" in bad.stderr


def test_check_prints_what_the_policies_define(pdir):
    r = cli("check", str(pdir))
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert out.splitlines()[0].startswith(f"{pdir}: OK (")
    assert "providers (6):" in out and re.search(r"fake: http://127\.0\.0\.1:\d+/v1 \[openai,anthropic\]; key from env "
                                                 r"TOLLGATE_FAKE_KEY: (present|MISSING)", out)
    assert "routes (1, first match wins):\n  * -> fake" in out
    assert re.search(r"priced models in force today \(\d+: \d+ exact, \d+ globs\)", out) and "gpt-4o-mini" in out
    assert re.search(r"budgets \(\d+\):", out)
    assert re.search(r"  engineer-monthly: groups=ics\|senior-engineers; per user; calendar month \(UTC\); limit \$500 "
                     r"\(1 tier, 1 override\); block; warn at 80%  \[.*budgets\.yaml:11\]", out), out
    assert "downgrade-to-mini: models gpt-4o; suite=downgrade; per run" in out
    assert "downgrade to gpt-4.1-nano, gpt-4o-mini" in out
    assert "access rules (2):\n  where groups=interns: allow gpt-4o-mini, gpt-4.1-nano" in out
    assert "jwt issuers (1):\n    test-idp: https://idp.tollgate.test" in out
    assert re.search(r"api keys: \d+\n  service tokens: 1\n  anonymous: off", out)
    assert "admin rules (1, any match grants):\n  where groups=platform-admins" in out
    assert re.search(r"warnings: (none|\d+ stale prices)", out)
    if "stale prices" in out:
        assert "warning:" in r.stderr
    # a bad directory still exits 1 with file:line, and prints no summary
    (pdir / "gateway.yaml").write_text("gateway:\n  max_request_bytes: lots\n")
    bad = cli("check", str(pdir))
    assert bad.returncode == 1 and "providers (" not in bad.stdout


# ---- end to end: simulate, then the live gateway ------------------------------------------------

@pytest.fixture(scope="module")
def live_config(policy_dir: Path) -> Config:
    return load_config(policy_dir)


def predict(stack, config: Config, attrs: dict, body: dict, path: str = "/v1/chat/completions") -> tuple[bytes, dict]:
    raw = json.dumps(body).encode()

    async def go() -> dict[str, Any]:
        client = aredis.Redis.from_url(stack.redis_url, socket_timeout=2, socket_connect_timeout=2)
        try:
            keys_before = {}
            report = await simulate(config, client, attrs=attrs, model=body["model"], path=path,
                                    max_tokens=body.get("max_tokens"), input_bytes=len(raw))
            # Writing nothing: every counter it read is byte for byte what it was.
            for row in [*report["budgets"], *(r for f in report["fallbacks"] for r in f["budgets"])]:
                keys_before[row["key"]] = await client.dump(row["key"])
            again = await simulate(config, client, attrs=attrs, model=body["model"], path=path,
                                   max_tokens=body.get("max_tokens"), input_bytes=len(raw))
            assert stable(again) == stable(report)
            for key, dumped in keys_before.items():
                assert await client.dump(key) == dumped
                assert not await client.zscore(key + ":leases", "dry-run")
            return report
        finally:
            await client.aclose()

    return raw, asyncio.run(go())


def send(stack, key: str, raw: bytes, path: str = "/v1/chat/completions", attrs: dict | None = None) -> httpx.Response:
    headers = {"authorization": f"Bearer {key}", "content-type": "application/json"}
    if path == "/v1/messages":
        headers["anthropic-version"] = "2023-06-01"
    if attrs and "suite" in attrs:
        headers["x-tollgate-metadata"] = json.dumps({"suite": attrs["suite"], "run": attrs["run"]})
    return httpx.post(f"{stack.base_url}{path}", content=raw, headers=headers, timeout=30)


def agree(report: dict, r: httpx.Response, attribution: JsonLog | None = None) -> str:
    """The gateway answered what `simulate` said; returns the decision."""
    d = report["decision"]
    assert r.status_code == d["status"], (r.status_code, r.text, d)
    if d["status"] == 200:
        assert r.headers["x-tollgate-decision"] == d["decision"]
        assert r.headers["x-tollgate-model-served"] == d["model_served"] == r.json()["model"]
        for k, v in d["headers"].items():
            assert r.headers.get(k) == v, (k, r.headers.get(k), v)
        if d["max_output_tokens_clamped"]:
            assert r.headers["x-tollgate-max-tokens-clamped"] == str(d["max_output_tokens"])
        if attribution is not None:
            rec = attribution.get(r.headers["x-tollgate-request-id"])
            assert (rec["decision"], rec["model_served"], rec["budgets"]) == (
                d["decision"], d["model_served"], d["budgets"])
    else:
        err = r.json()["error"]
        assert err["code"] == d["code"], (err, d)
        if d["decision"] == "blocked":
            assert err["budget"]["name"] == d["budget"]["name"]
            for k in ("limit_usd", "spent_usd", "reserved_usd", "window", "counter", "mode"):
                assert err["budget"][k] == d["budget"][k], k
            # identical but for a rolling window's "ages out in N s", counted a moment apart
            strip = re.compile(r"ages out in \d+ s")
            assert strip.sub("", err["message"]) == strip.sub("", d["message"])
            assert r.headers["x-tollgate-budget-name"] == d["headers"]["x-tollgate-budget-name"]
    return d["decision"]


def test_e2e_allowed_and_model_not_allowed_as_the_command_says(stack, policy_dir, attribution):
    """Through the command itself (`python -m extproc.cli simulate --format json`), then the gateway."""
    body = {"model": "gpt-4o-mini", "max_tokens": 30, "messages": [{"role": "user", "content": "hi"}]}
    raw = json.dumps(body).encode()
    ident = ["--as", "user=ic@example.com", "--as", "email=ic@example.com", "--as", "groups=ics", "--as",
             "groups=engineers", "--as", "team=web", "--as", "source=api_key:ic"]
    r = cli("simulate", "--policies", str(policy_dir), *ident, "--model", "gpt-4o-mini", "--max-tokens", "30",
            "--input-bytes", str(len(raw)), "--format", "json", "--redis-url", stack.redis_url)
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["decision"]["decision"] == "allowed" and report["budgets"][0]["budget"] == "engineer-monthly"
    live = send(stack, "key-ic", raw)
    assert agree(report, live, attribution) == "allowed"
    assert live.headers["x-tollgate-budget-name"] == report["decision"]["tightest"] == "engineer-monthly"

    body = {"model": "gpt-4o", "max_tokens": 30, "messages": [{"role": "user", "content": "hi"}]}
    raw = json.dumps(body).encode()
    r = cli("simulate", "--policies", str(policy_dir), "--as", "user=intern@example.com", "--as", "groups=interns",
            "--as", "team=web", "--model", "gpt-4o", "--max-tokens", "30", "--input-bytes", str(len(raw)),
            "--format", "json", "--redis-url", stack.redis_url)
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    live = send(stack, "key-intern", raw)
    assert agree(report, live) == "refused" and live.status_code == 403
    assert live.json()["error"]["allowed_models"] == report["decision"]["allowed_models"]
    assert report["access"]["rules"][0]["source"].endswith("test-access.yaml:5")


def test_e2e_budget_blocks_as_simulated(stack, live_config, attribution):
    # Calendar week, Anthropic shape: blocked at once, the message word for word.
    attrs = bot("anthropic-block")
    body = {"model": "claude-haiku-4-5", "max_tokens": 30, "messages": [{"role": "user", "content": "hi"}]}
    raw, report = predict(stack, live_config, attrs, body, "/v1/messages")
    assert report["request"]["path"] == "/v1/messages" and report["decision"]["decision"] == "blocked"
    live = send(stack, "key-budget", raw, "/v1/messages", attrs)
    assert agree(report, live) == "blocked"
    assert live.json()["error"]["message"] == report["decision"]["message"]

    # Rolling window, real spend first: each answer predicted, until the block.
    attrs = bot("rolling")
    body = {"model": "gpt-4o", "max_tokens": 20, "messages": [{"role": "user", "content": "hi"}]}
    seen = []
    for _ in range(30):
        raw, report = predict(stack, live_config, attrs, body)
        seen.append(agree(report, send(stack, "key-budget", raw, attrs=attrs), attribution))
        if seen[-1] == "blocked":
            break
    assert seen[0] == "allowed" and seen[-1] == "blocked", seen
    assert report["budgets"][0]["budget"] == "rolling-cap" and report["budgets"][0]["spent_nusd"] > 0
    assert report["budgets"][0]["outcome"] == "block"


def test_e2e_downgrade_and_clamp_as_simulated(stack, live_config, attribution):
    attrs = bot("downgrade")
    seen = []
    for i in range(8):
        body = {"model": "gpt-4o", "max_tokens": 250, "messages": [{"role": "user", "content": "a longer prompt " * i}]}
        raw, report = predict(stack, live_config, attrs, body)
        seen.append(agree(report, send(stack, "key-budget", raw, attrs=attrs), attribution))
        if seen[-1] == "downgraded":
            break
    assert seen[0] == "allowed" and seen[-1] == "downgraded", seen
    assert report["decision"]["model_served"] == "gpt-4.1-nano"
    assert report["budgets"][0]["outcome"] == "downgrade to gpt-4.1-nano"
    assert report["fallbacks"] == [{"model": "gpt-4.1-nano", "provider": "fake", "fits": True, "budgets": [],
                                    "worst_case_usd": report["fallbacks"][0]["worst_case_usd"],
                                    "worst_case_nusd": report["fallbacks"][0]["worst_case_nusd"]}]

    attrs = bot("clamp")
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hello"}]}
    raw, report = predict(stack, live_config, attrs, body)
    assert report["decision"]["decision"] == "clamped"
    assert agree(report, send(stack, "key-budget", raw, attrs=attrs), attribution) == "clamped"


async def test_a_full_rate_limit_window_is_predicted_and_left_alone(config: Config, rds: aredis.Redis):
    """tests/policies/test-ratelimits.yaml: 3 requests per 4 s per run. After three real admits the
    simulation predicts the gateway's rate-limit 429, shows the window, and writes nothing."""
    attrs = bot("rl-requests")
    api = api_for_path("/v1/chat/completions")
    assert api is not None
    cand = decide.check(config, api, "gpt-4o-mini", 8, attrs, "/v1/chat/completions")
    engine = BudgetEngine(list(config.doc.budgets), rds, rate_limits=list(config.doc.rate_limits))
    r = await sim(config, rds, attrs, "gpt-4o-mini", max_tokens=8, input_bytes=100)
    assert r["decision"]["decision"] == "allowed" and [x["used"] for x in r["rate_limits"]] == [0]
    for _ in range(3):
        adm = await engine.admit(request_id=uuid.uuid4().hex, attrs=attrs, model="gpt-4o-mini", provider=cand.provider,
                                 input_tokens=100, max_output_tokens=8, cost_fn=cand.cost_fn,
                                 provider_of=cand.provider_of, lease_seconds=60)
        assert adm.admitted and await engine.settle(adm, 1) == "settled"
    before = await snapshot(rds)
    r = await sim(config, rds, attrs, "gpt-4o-mini", max_tokens=8, input_bytes=100)
    assert await snapshot(rds) == before
    d = r["decision"]
    assert (d["decision"], d["status"], d["code"], d["rate_limit"]) == ("blocked", 429, "rate_limit_exceeded",
                                                                        "rl-requests")
    [row] = r["rate_limits"]
    assert (row["unit"], row["used"], row["limit"], row["this_request"], row["over"]) == ("requests", 3, 3, 1, True)
    assert row["source"] and row["source"].endswith("test-ratelimits.yaml:4")
    text = render_text(r)
    assert "rate limit rl-requests" in text and "3 of 3 requests used" in text and "rate_limit_exceeded" in text
