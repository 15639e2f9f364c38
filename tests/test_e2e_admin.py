"""The admin API through the real stack: JSON over HTTP on Envoy's admin listener, transcoded to gRPC.

A stack of its own (own Redis), so the `trial` key starts with untouched budgets and usage holds
only this module's requests. Identities: `key-admin` (group platform-admins, which the shipped
`admin:` rule makes an admin; tests/policies/test-admin.yaml), `key-ic` (not an admin), `trial`.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from extproc.stack import Stack
from tests.conftest import running_stack
from tests.e2e_idp import TestIdP

ADMIN, IC, TRIAL = "key-admin", "key-ic", "trial"


@pytest.fixture(scope="module")
def admin_stack(policy_dir: Path, idp: TestIdP, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with running_stack(policy_dir, idp, tmp_path_factory.mktemp("admin-stack")) as s:
        yield s


def call(stack: Stack, method: str, path: str, key: str | None, body: dict | None = None,
         params: Any = None) -> httpx.Response:
    headers = {"authorization": f"Bearer {key}"} if key else {}
    return httpx.request(method, f"{stack.admin_api_url}{path}", headers=headers, json=body, params=params,
                         timeout=10)


def ok(r: httpx.Response) -> dict:
    assert r.status_code == 200, (r.status_code, r.text)
    assert r.headers["content-type"].startswith("application/json")
    return r.json()


def chat(stack: Stack, key: str, model: str = "gpt-4o", max_tokens: int = 200) -> tuple[bytes, httpx.Response]:
    body = json.dumps({"model": model, "max_tokens": max_tokens,
                       "messages": [{"role": "user", "content": "hi"}]}).encode()
    r = httpx.post(f"{stack.base_url}/v1/chat/completions", content=body, timeout=10,
                   headers={"authorization": f"Bearer {key}", "content-type": "application/json"})
    return body, r


def counters(status: dict) -> dict[str, tuple]:
    return {b["name"]: (b["counter"], b["spent_nusd"], b["reserved_nusd"], b["limit_nusd"]) for b in status["budgets"]}


# ---- authentication and the admin rule -------------------------------------------------------

def test_no_or_bad_credential_is_401_json(admin_stack):
    for key in (None, "not-a-key"):
        r = call(admin_stack, "GET", "/admin/v1/budgets", key)
        assert r.status_code == 401, r.text
        err = r.json()
        assert err["code"] == 16 and ("missing" in err["message"] or "unknown_key" in err["message"])
    r = call(admin_stack, "GET", "/admin/v1/usage", None)
    assert r.status_code == 401


def test_non_admin_sees_own_status_only(admin_stack):
    mine = ok(call(admin_stack, "GET", "/admin/v1/budgets", IC))
    assert mine["identity"]["user"] == "ic@example.com" and "ics" in mine["identity"]["groups"]
    monthly = next(b for b in mine["budgets"] if b["name"] == "engineer-monthly")
    assert monthly["counter"] == {"user": "ic@example.com"} and monthly["limit_usd"] == "500"
    assert monthly["mode"] == "enforce" and monthly["resets_at"].endswith("Z")
    # naming itself is fine; naming someone else, or asking for usage, is not
    assert ok(call(admin_stack, "POST", "/admin/v1/budgets", IC, {"identity": {"user": "ic@example.com"}}))["budgets"]
    for r in (call(admin_stack, "POST", "/admin/v1/budgets", IC, {"identity": {"user": "alice@example.com"}}),
              call(admin_stack, "GET", "/admin/v1/budgets", IC, params={"identity.user": "trial"}),
              call(admin_stack, "POST", "/admin/v1/dry-run", IC,
                   {"identity": {"user": "trial"}, "model": "gpt-4o", "input_bytes": 100}),
              call(admin_stack, "GET", "/admin/v1/usage", IC)):
        assert r.status_code == 403, r.text
        assert r.json()["code"] == 7 and "admin" in r.json()["message"]


def test_admin_reads_any_identity(admin_stack):
    st = ok(call(admin_stack, "GET", "/admin/v1/budgets", ADMIN, params={"identity.user": "trial"}))
    names = {b["name"]: b for b in st["budgets"]}
    assert {"trial-frontier", "trial-small-models"} <= set(names)
    assert names["trial-frontier"]["counter"] == {"user": "trial"}
    assert names["trial-frontier"]["limit_usd"] == "0.0025" and names["trial-frontier"]["limit_nusd"] == "2500000"
    # the same through POST, with groups: the tier for senior engineers applies
    st = ok(call(admin_stack, "POST", "/admin/v1/budgets", ADMIN,
                 {"identity": {"user": "bob@example.com", "groups": ["senior-engineers"]}}))
    monthly = next(b for b in st["budgets"] if b["name"] == "engineer-monthly")
    assert monthly["limit_usd"] == "2000" and monthly["counter"] == {"user": "bob@example.com"}


def test_errors_are_json(admin_stack):
    r = call(admin_stack, "GET", "/admin/v1/usage", ADMIN, params={"group_by": "colour"})
    assert r.status_code == 400 and r.json()["code"] == 3 and "group_by" in r.json()["message"]
    r = call(admin_stack, "GET", "/admin/v1/usage", ADMIN, params={"from": "yesterday"})
    assert r.status_code == 400 and "YYYY-MM-DD" in r.json()["message"]
    r = call(admin_stack, "POST", "/admin/v1/dry-run", ADMIN, {"model": "gpt-4o"})
    assert r.status_code == 400 and "input_bytes" in r.json()["message"]
    r = call(admin_stack, "GET", "/admin/v1/nope", ADMIN)
    assert r.status_code == 404 and r.headers["content-type"].startswith("application/json"), r.text


# ---- dry runs ---------------------------------------------------------------------------------

def test_dry_run_predicts_the_trial_walkthrough_and_spends_nothing(admin_stack):
    """The README walkthrough: allowed, allowed, downgraded, downgraded, blocked; each predicted."""
    seen = []
    for _ in range(5):
        body = json.dumps({"model": "gpt-4o", "max_tokens": 200,
                           "messages": [{"role": "user", "content": "hi"}]}).encode()
        req = {"model": "gpt-4o", "max_output_tokens": 200, "input_bytes": len(body)}
        before = counters(ok(call(admin_stack, "GET", "/admin/v1/budgets", TRIAL)))
        d = ok(call(admin_stack, "POST", "/admin/v1/dry-run", TRIAL, req))
        again = ok(call(admin_stack, "POST", "/admin/v1/dry-run", TRIAL, req))
        after = counters(ok(call(admin_stack, "GET", "/admin/v1/budgets", TRIAL)))
        assert after == before and again["decision"] == d["decision"]  # a dry run changes no counter
        # an admin asking about `trial` gets the same answer
        as_admin = ok(call(admin_stack, "POST", "/admin/v1/dry-run", ADMIN, {**req, "identity": {"user": "trial"}}))
        assert (as_admin["decision"], as_admin["model_served"]) == (d["decision"], d["model_served"])

        _, r = chat(admin_stack, TRIAL)
        if d["decision"] == "blocked":
            assert r.status_code == 429, r.text
            err = r.json()["error"]
            assert d["blocking_budget"]["name"] == err["budget"]["name"] == "trial-frontier"
            assert d["refusal"]["http_status"] == 429 and d["refusal"]["code"] == "budget_exceeded"
            assert d["refusal"]["message"] == err["message"]
            assert d["blocking_budget"]["spent_usd"] == f'{err["budget"]["spent_usd"]:.9f}'.rstrip("0").rstrip(".")
        else:
            assert r.status_code == 200, r.text
            assert r.headers["x-tollgate-decision"] == d["decision"]
            assert r.headers["x-tollgate-model-served"] == d["model_served"] == r.json()["model"]
            assert d["budgets"] and d["worst_case_cost_nusd"] != "0"
            if d.get("tightest_budget"):
                assert r.headers["x-tollgate-budget-name"] == d["tightest_budget"]["name"]
        seen.append(d["decision"])
    assert seen == ["allowed", "allowed", "downgraded", "downgraded", "blocked"]


def test_dry_run_refusals(admin_stack):
    d = ok(call(admin_stack, "POST", "/admin/v1/dry-run", ADMIN,
                {"identity": {"user": "intern@example.com", "groups": ["interns"]}, "model": "gpt-4o",
                 "input_bytes": 100}))
    assert d["decision"] == "refused" and d["refusal"]["code"] == "model_not_allowed"
    assert d["refusal"]["http_status"] == 403 and "gpt-4o-mini" in d["refusal"]["allowed_models"]
    _, r = chat(admin_stack, "key-intern")
    assert r.status_code == 403 and r.json()["error"]["code"] == "model_not_allowed"
    d = ok(call(admin_stack, "POST", "/admin/v1/dry-run", ADMIN, {"model": "no-such-model", "input_tokens": 10}))
    assert d["decision"] == "refused" and d["refusal"]["code"] == "model_not_found"
    d = ok(call(admin_stack, "POST", "/admin/v1/dry-run", IC,
                {"model": "claude-sonnet-4-6", "path": "/v1/messages", "max_output_tokens": 100, "input_bytes": 300,
                 "stream": True}))
    assert d["decision"] == "allowed" and d["model_served"] == "claude-sonnet-4-6" and d["max_output_tokens"] == 100
    assert "engineer-monthly" in d["budgets"] and d["stream"] is True


# ---- usage ------------------------------------------------------------------------------------

def rows(report: dict) -> dict[tuple, tuple]:
    def nums(r: dict) -> tuple:
        return (int(r["requests"]), int(r["input_tokens"]), int(r["output_tokens"]), int(r["cached_input_tokens"]),
                int(r["cache_write_tokens"]), int(r["cost_nusd"]))
    return {tuple(sorted(r["key"].items())): nums(r) for r in report["rows"]} | {("TOTAL",): nums(report["totals"])}


def direct(report: Any) -> dict[tuple, tuple]:
    def nums(r: Any) -> tuple:
        return (r.requests, r.input_tokens, r.output_tokens, r.cached_input_tokens, r.cache_write_tokens, r.cost_nusd)
    return {tuple(sorted(r.key.items())): nums(r) for r in report.rows} | {("TOTAL",): nums(report.totals)}


def test_usage_equals_query_usage(admin_stack):
    import asyncio

    import redis.asyncio as aioredis

    from extproc import usage

    for key, model in ((IC, "gpt-4o"), (IC, "gpt-4o-mini"), ("key-ml", "gpt-4o"), ("demo", "claude-sonnet-4-6")):
        _, r = chat(admin_stack, key, model=model, max_tokens=50)
        assert r.status_code == 200, r.text
    today = dt.datetime.now(dt.timezone.utc).date()
    start, end = today - dt.timedelta(days=1), today

    async def query(**kw: Any) -> Any:
        client = aioredis.Redis.from_url(admin_stack.redis_url)
        try:
            return await usage.query_usage(client, start=start, end=end, **kw)
        finally:
            await client.aclose()

    cases = [
        (["team"], None), (["user", "model"], None), ([], None), (["provider"], {"team": "web"}),
        (["group", "service_token", "app"], None),
    ]
    for group_by, where in cases:
        if where:
            got = ok(call(admin_stack, "POST", "/admin/v1/usage", ADMIN,
                          {"group_by": group_by, "from": str(start), "to": str(end), "where": where}))
        else:
            got = ok(call(admin_stack, "GET", "/admin/v1/usage", ADMIN,
                          params=[("group_by", g) for g in group_by] + [("from", str(start)), ("to", str(end))]))
        want = asyncio.run(query(group_by=group_by, where=where))
        assert rows(got) == direct(want), (group_by, where)
        assert (got["from"], got["to"], got["group_by"]) == (str(start), str(end), group_by)
    by_team = rows(ok(call(admin_stack, "GET", "/admin/v1/usage", ADMIN,
                           params={"group_by": "team", "from": str(start), "to": str(end)})))
    assert by_team[(("team", "web"),)][0] >= 2 and by_team[("TOTAL",)][0] >= 4


def test_dry_run_predicts_a_rate_limit_refusal(admin_stack):
    """policies/budgets.yaml gives the `rate-demo` key 3 requests a minute: the fourth is refused
    with the same 429 the dry run predicted, and the dry run itself counts nothing."""
    req = {"model": "gpt-4o-mini", "max_output_tokens": 50, "input_bytes": 80}
    for _ in range(3):
        d = ok(call(admin_stack, "POST", "/admin/v1/dry-run", "rate-demo", req))
        assert d["decision"] == "allowed", d
        _, r = chat(admin_stack, "rate-demo", model="gpt-4o-mini", max_tokens=50)
        assert r.status_code == 200, r.text
    d = ok(call(admin_stack, "POST", "/admin/v1/dry-run", "rate-demo", req))
    assert d["decision"] == "blocked" and d["refusal"]["code"] == "rate_limit_exceeded", d
    _, r = chat(admin_stack, "rate-demo", model="gpt-4o-mini", max_tokens=50)
    assert r.status_code == 429 and r.json()["error"]["code"] == "rate_limit_exceeded", r.text
    assert d["refusal"]["message"].split(" Try again")[0] == r.json()["error"]["message"].split(" Try again")[0]
