"""Admin reads appear in the admin access log (`<state dir>/admin-access.jsonl`), through the real
stack: JSON over HTTP on Envoy's admin listener, transcoded to the ext_proc's admin gRPC server.

Identities (tests/policies/test-admin.yaml, policies/identity.yaml): `key-admin` is an admin
(group platform-admins), `key-ic` is not. Each call carries a unique user-agent, which Envoy
passes through untouched, so its line is found whatever else the session's stack served.
"""

from __future__ import annotations

import datetime as dt
import json
import time
import uuid
from pathlib import Path
from typing import Any

import httpx

from extproc.admin.access_log import FILE_NAME
from extproc.stack import Stack

ADMIN, IC = "key-admin", "key-ic"


def access_log_path(stack: Stack) -> Path:
    assert stack.admin_access_log.name == FILE_NAME
    return stack.admin_access_log


def call(stack: Stack, method: str, path: str, key: str | None, body: dict | None = None,
         params: Any = None) -> tuple[httpx.Response, str]:
    """The response, and the user-agent that marks the call's line in the access log."""
    ua = f"tollgate-test/{uuid.uuid4().hex}"
    headers = {"user-agent": ua}
    if key:
        headers["authorization"] = f"Bearer {key}"
    r = httpx.request(method, f"{stack.admin_api_url}{path}", headers=headers, json=body, params=params, timeout=10)
    return r, ua


def logged(stack: Stack, ua: str, timeout: float = 5.0) -> dict[str, Any]:
    """The one access log line of the call marked `ua`."""
    path = access_log_path(stack)
    deadline = time.monotonic() + timeout
    while True:
        found = []
        if path.exists():
            found = [rec for line in path.read_text().splitlines() if (rec := json.loads(line))["user_agent"] == ua]
        if found or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert len(found) == 1, (ua, found, path)
    rec = found[0]
    # the fields every line has
    assert rec["request_id"], rec  # Envoy's x-request-id (generated: a client's moves to its own header)
    assert rec["peer"].startswith("ipv4:127.0.0.1:"), rec  # Envoy, on loopback
    assert dt.datetime.fromisoformat(rec["ts"]).tzinfo is not None and rec["duration_ms"] >= 0
    return rec


def test_admin_reading_another_identitys_budgets(stack):
    r, ua = call(stack, "GET", "/admin/v1/budgets", ADMIN, params={"identity.user": "trial"})
    assert r.status_code == 200, r.text
    rec = logged(stack, ua)
    assert (rec["method"], rec["outcome"], rec["message"]) == ("GetBudgetStatus", "ok", None)
    caller = rec["caller"]
    assert (caller["user"], caller["email"], caller["source"], caller["admin"]) == (
        "admin@example.com", "admin@example.com", "api_key:admin", True)
    assert "platform-admins" in caller["groups"] and caller["team"] == "platform"
    assert rec["subject"] == {"user": "trial"} and rec["subject_is_caller"] is False
    assert rec["read"] == {"identity": {"user": "trial"}}
    assert {"trial-frontier", "trial-small-models"} <= set(rec["returned"]["budgets"])
    assert "key-admin" not in json.dumps(rec)  # never the credential

    # the same through POST, groups and all; and a dry run on that identity's behalf
    r, ua = call(stack, "POST", "/admin/v1/budgets", ADMIN,
                 {"identity": {"user": "bob@example.com", "groups": ["senior-engineers"]}})
    assert r.status_code == 200, r.text
    rec = logged(stack, ua)
    assert rec["subject"] == {"user": "bob@example.com", "groups": ["senior-engineers"]}
    assert rec["caller"]["user"] == "admin@example.com" and rec["outcome"] == "ok"
    r, ua = call(stack, "POST", "/admin/v1/dry-run", ADMIN,
                 {"identity": {"user": "trial"}, "model": "gpt-4o", "max_output_tokens": 200, "input_bytes": 80})
    assert r.status_code == 200, r.text
    rec = logged(stack, ua)
    assert (rec["method"], rec["outcome"], rec["subject"], rec["subject_is_caller"]) == (
        "DryRun", "ok", {"user": "trial"}, False)
    assert rec["read"]["model"] == "gpt-4o" and rec["read"]["max_output_tokens"] == 200
    assert rec["read"]["path"] == "/v1/chat/completions" and rec["read"]["identity"] == {"user": "trial"}
    assert rec["returned"]["decision"] == r.json()["decision"]


def test_non_admin_reading_their_own(stack):
    r, ua = call(stack, "GET", "/admin/v1/budgets", IC)
    assert r.status_code == 200, r.text
    rec = logged(stack, ua)
    assert (rec["method"], rec["outcome"]) == ("GetBudgetStatus", "ok")
    assert rec["caller"]["user"] == "ic@example.com" and rec["caller"]["admin"] is False
    assert rec["caller"]["source"] == "api_key:ic"
    assert rec["subject"]["user"] == "ic@example.com" and rec["subject_is_caller"] is True
    assert rec["read"] == {"identity": None} and "engineer-monthly" in rec["returned"]["budgets"]
    # naming itself is reading its own
    r, ua = call(stack, "POST", "/admin/v1/dry-run", IC, {"identity": {"user": "ic@example.com"}, "model": "gpt-4o",
                                                          "input_bytes": 100})
    assert r.status_code == 200, r.text
    rec = logged(stack, ua)
    assert rec["outcome"] == "ok" and rec["subject"]["user"] == "ic@example.com" and rec["subject_is_caller"] is True


def test_refused_reads_of_someone_elses(stack):
    r, ua = call(stack, "POST", "/admin/v1/budgets", IC, {"identity": {"user": "alice@example.com"}})
    assert r.status_code == 403, r.text
    rec = logged(stack, ua)
    assert (rec["method"], rec["outcome"]) == ("GetBudgetStatus", "PERMISSION_DENIED")
    assert rec["caller"]["user"] == "ic@example.com" and rec["caller"]["admin"] is False
    assert rec["subject"] == {"user": "alice@example.com"} and rec["subject_is_caller"] is False  # what it asked for
    assert "admin policy rule" in rec["message"] and rec["returned"] is None

    # usage reports are admin-only: a non-admin's attempt is logged with its filters
    r, ua = call(stack, "GET", "/admin/v1/usage", IC, params={"group_by": "user"})
    assert r.status_code == 403, r.text
    rec = logged(stack, ua)
    assert (rec["method"], rec["outcome"], rec["caller"]["user"]) == ("GetUsage", "PERMISSION_DENIED", "ic@example.com")
    assert rec["read"]["group_by"] == ["user"] and rec["subject"] is None

    # no credential: logged without a caller
    r, ua = call(stack, "GET", "/admin/v1/budgets", None, params={"identity.user": "trial"})
    assert r.status_code == 401, r.text
    rec = logged(stack, ua)
    assert (rec["outcome"], rec["caller"], rec["subject"]) == ("UNAUTHENTICATED", None, None)
    assert rec["read"] == {"identity": {"user": "trial"}} and "missing" in rec["message"]


def test_usage_reports_log_their_filters(stack):
    today = dt.datetime.now(dt.timezone.utc).date()
    start = today - dt.timedelta(days=6)
    r, ua = call(stack, "GET", "/admin/v1/usage", ADMIN,
                 params=[("group_by", "team"), ("group_by", "model"), ("from", str(start)), ("to", str(today))])
    assert r.status_code == 200, r.text
    rec = logged(stack, ua)
    assert (rec["method"], rec["outcome"], rec["caller"]["user"], rec["caller"]["admin"]) == (
        "GetUsage", "ok", "admin@example.com", True)
    assert rec["read"] == {"group_by": ["team", "model"], "from": str(start), "to": str(today), "where": {}}
    assert rec["returned"] == {"rows": len(r.json()["rows"]), "from": str(start), "to": str(today)}
    assert rec["subject"] is None

    r, ua = call(stack, "POST", "/admin/v1/usage", ADMIN, {"group_by": ["user"], "where": {"team": "web"}})
    assert r.status_code == 200, r.text
    rec = logged(stack, ua)
    assert rec["read"] == {"group_by": ["user"], "from": None, "to": None, "where": {"team": "web"}}
    assert rec["returned"]["from"] == rec["returned"]["to"] == str(today)  # the defaults, as answered

    r, ua = call(stack, "GET", "/admin/v1/usage", ADMIN, params={"from": "yesterday"})
    assert r.status_code == 400, r.text
    rec = logged(stack, ua)
    assert (rec["outcome"], rec["read"]["from"]) == ("INVALID_ARGUMENT", "yesterday")
    assert "YYYY-MM-DD" in rec["message"]


def test_envoys_admin_access_log_joins_the_ext_procs_on_request_id(stack: Stack) -> None:
    """Envoy's own line for the call carries the request id it generated (never the client's,
    which moves to client_request_id), the same id the ext_proc's admin access log records."""
    ua = f"tollgate-test/{uuid.uuid4().hex}"
    forged = f"forged-{uuid.uuid4().hex}"
    r = httpx.get(f"{stack.admin_api_url}/admin/v1/budgets", timeout=10,
                  headers={"user-agent": ua, "authorization": "Bearer key-ic", "x-request-id": forged})
    assert r.status_code == 200, r.text
    rec = logged(stack, ua)
    deadline = time.monotonic() + 5
    while True:
        lines = [json.loads(x) for x in stack.envoy_admin_access_log.read_text().splitlines()
                 if x.startswith("{")] if stack.envoy_admin_access_log.exists() else []
        mine = [x for x in lines if x["user_agent"] == ua]
        if mine or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    (line,) = mine
    assert line["status"] == 200 and line["grpc_method"].startswith("/tollgate.admin.v1.Admin/"), line
    assert line["request_id"] == rec["request_id"] != forged and line["client_request_id"] == forged, (line, rec)
