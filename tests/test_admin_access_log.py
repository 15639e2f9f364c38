"""The admin API's access log, in process: a real Gateway (shipped policies, no Redis) and the
Admin servicer on a gRPC server of its own, called with the generated stub.

Identities (policies/identity.yaml): `demo` is an admin (group platform-admins), `trial` is not.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from extproc.admin import service as admin_service
from extproc.admin.access_log import FILE_NAME, AdminAccessLog, AdminAccessRecord
from extproc.admin.service import pb, pb_grpc
from extproc.app import Gateway, build_gateway
from extproc.config import load_config

REPO = Path(__file__).resolve().parent.parent


def lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


class Admin:
    def __init__(self, gw: Gateway, access_log: AdminAccessLog | None = None) -> None:
        self.gw, self.access_log = gw, access_log

    async def __aenter__(self) -> "Admin":
        self.server = grpc.aio.server()
        admin_service.add_to_server(self.gw, self.server, self.access_log)
        port = self.server.add_insecure_port("127.0.0.1:0")
        await self.server.start()
        self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        self.stub = pb_grpc.AdminStub(self.channel)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.channel.close()
        await self.server.stop(grace=None)

    async def call(self, method: str, request: Any, key: str | None, request_id: str | None = None) -> str:
        """The call's outcome as the access log names it ("ok" or the status code's name)."""
        md = [("authorization", f"Bearer {key}")] if key else []
        if request_id:
            md.append(("x-request-id", request_id))
        try:
            await getattr(self.stub, method)(request, metadata=md, timeout=5)
        except grpc.aio.AioRpcError as e:
            return e.code().name
        return "ok"


@pytest.fixture
async def gw(tmp_path: Path) -> AsyncIterator[Gateway]:
    g = await build_gateway(load_config(REPO / "policies"), redis_url=None, state_dir=tmp_path / "state")
    try:
        yield g
    finally:
        await g.auth.close()


async def test_every_call_granted_or_refused_is_one_line(gw: Gateway, tmp_path: Path) -> None:
    path = tmp_path / "state" / FILE_NAME
    async with Admin(gw) as admin:
        trial = pb.Identity(user="trial")
        calls = [
            ("GetBudgetStatus", pb.GetBudgetStatusRequest(identity=trial), "demo", "ok"),
            ("GetBudgetStatus", pb.GetBudgetStatusRequest(identity=pb.Identity(user="demo")), "trial",
             "PERMISSION_DENIED"),
            ("GetBudgetStatus", pb.GetBudgetStatusRequest(), "trial", "ok"),
            ("GetBudgetStatus", pb.GetBudgetStatusRequest(), None, "UNAUTHENTICATED"),
            ("GetBudgetStatus", pb.GetBudgetStatusRequest(), "not-a-key", "UNAUTHENTICATED"),
            ("GetUsage", pb.GetUsageRequest(group_by=["team", "model"], to="2026-01-31", where={"team": "ml"},
                                            **{"from": "2026-01-01"}), "demo", "UNAVAILABLE"),  # no Redis
            ("GetUsage", pb.GetUsageRequest(group_by=["colour"]), "demo", "INVALID_ARGUMENT"),
            ("GetUsage", pb.GetUsageRequest(), "trial", "PERMISSION_DENIED"),
            ("DryRun", pb.DryRunRequest(identity=trial, model="gpt-4o", input_bytes=100), "demo", "ok"),
            ("DryRun", pb.DryRunRequest(model="gpt-4o", input_bytes=100, path="/v1/nope"), "trial",
             "INVALID_ARGUMENT"),
        ]
        for i, (method, request, key, want) in enumerate(calls):
            assert await admin.call(method, request, key, request_id=f"rid-{i}") == want, (method, key)
    recs = lines(path)
    assert [(r["method"], r["outcome"], r["request_id"]) for r in recs] == [
        (m, want, f"rid-{i}") for i, (m, _, _, want) in enumerate(calls)]
    for r in recs:
        assert set(r) == set(AdminAccessRecord.__dataclass_fields__), r
        assert r["ts"].endswith("+00:00") and r["duration_ms"] >= 0
        assert r["peer"] and r["peer"].startswith(("ipv4:127.0.0.1:", "ipv6:"))
        assert (r["message"] is None) == (r["outcome"] == "ok")
        assert not any(secret in json.dumps(r) for secret in ("Bearer demo", "Bearer trial", "not-a-key"))

    admin_reads_trial, refused, own, anon, bad_key, usage, bad_usage, ic_usage, dry, bad_dry = recs
    assert admin_reads_trial["caller"] == {
        "user": "demo", "email": "demo@example.com", "groups": ["ics", "platform-admins"], "team": "demo-team",
        "app": "readme", "service_token": None, "source": "api_key:demo", "admin": True, "attributes": {}}
    assert admin_reads_trial["subject"] == {"user": "trial"} and admin_reads_trial["subject_is_caller"] is False
    assert admin_reads_trial["read"] == {"identity": {"user": "trial"}}
    assert admin_reads_trial["returned"]["budgets"] == []  # no Redis: no budget engine

    assert refused["caller"]["user"] == "trial" and refused["caller"]["admin"] is False
    assert refused["caller"]["source"] == "api_key:trial"
    assert refused["subject"] == {"user": "demo"} and refused["subject_is_caller"] is False  # what it asked for
    assert "admin policy rule" in refused["message"] and refused["returned"] is None

    assert own["subject"]["user"] == "trial" and own["subject_is_caller"] is True and own["read"] == {"identity": None}
    for r in (anon, bad_key):
        assert r["caller"] is None and r["subject"] is None
    assert "missing" in anon["message"] and "unknown_key" in bad_key["message"]

    assert usage["caller"]["admin"] is True and usage["subject"] is None
    assert usage["read"] == {"group_by": ["team", "model"], "from": "2026-01-01", "to": "2026-01-31",
                             "where": {"team": "ml"}}
    assert bad_usage["read"]["group_by"] == ["colour"] and "group_by" in bad_usage["message"]
    assert ic_usage["caller"]["user"] == "trial" and ic_usage["read"]["from"] is None

    assert dry["subject"] == {"user": "trial"} and dry["read"]["model"] == "gpt-4o"
    assert dry["read"]["path"] == "/v1/chat/completions" and dry["returned"]["decision"]
    assert bad_dry["read"]["path"] == "/v1/nope" and bad_dry["subject_is_caller"] is True


async def test_a_write_that_fails_never_fails_the_call(gw: Gateway, tmp_path: Path,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    broken = AdminAccessLog(tmp_path)  # a directory: os.open fails with IsADirectoryError
    async with Admin(gw, broken) as admin:
        with caplog.at_level(logging.ERROR, logger="tollgate.admin.access"):
            assert await admin.call("GetBudgetStatus", pb.GetBudgetStatusRequest(), "demo") == "ok"
            assert await admin.call("GetUsage", pb.GetUsageRequest(), "trial") == "PERMISSION_DENIED"
    assert broken.failures == 2
    assert "GetBudgetStatus by demo" in caplog.text and "IsADirectoryError" in caplog.text


async def test_an_unexpected_error_is_logged_as_unknown(gw: Gateway, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    async def broken(headers: dict[str, str]) -> None:
        raise RuntimeError("identity provider exploded")

    monkeypatch.setattr(gw.auth, "authenticate", broken)
    async with Admin(gw) as admin:
        assert await admin.call("GetBudgetStatus", pb.GetBudgetStatusRequest(), "demo") == "UNKNOWN"
    (rec,) = lines(tmp_path / "state" / FILE_NAME)
    assert rec["outcome"] == "UNKNOWN" and rec["message"] == "RuntimeError: identity provider exploded"
    assert rec["caller"] is None


async def test_the_directory_is_created_and_lines_are_appended(gw: Gateway, tmp_path: Path) -> None:
    path = tmp_path / "new" / "dir" / FILE_NAME
    path_log = AdminAccessLog(path)
    async with Admin(gw, path_log) as admin:
        await admin.call("GetBudgetStatus", pb.GetBudgetStatusRequest(), "demo")
        path.rename(path.with_suffix(".old"))  # rotated away: the next line starts a new file
        await admin.call("GetBudgetStatus", pb.GetBudgetStatusRequest(), "trial")
    assert [r["caller"]["user"] for r in lines(path.with_suffix(".old"))] == ["demo"]
    assert [r["caller"]["user"] for r in lines(path)] == ["trial"]
    assert path_log.failures == 0


async def test_without_a_state_dir_records_go_to_the_logger(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    g = await build_gateway(load_config(REPO / "policies"), redis_url=None)
    assert g.state_dir is None
    try:
        async with Admin(g) as admin:
            with caplog.at_level(logging.INFO, logger="tollgate.admin.access"):
                assert await admin.call("GetBudgetStatus", pb.GetBudgetStatusRequest(), "demo") == "ok"
    finally:
        await g.auth.close()
    rec = json.loads(next(r.getMessage() for r in caplog.records if r.name == "tollgate.admin.access"))
    assert rec["method"] == "GetBudgetStatus" and rec["caller"]["user"] == "demo"


async def test_the_state_dir_comes_from_the_outbox_path(tmp_path: Path) -> None:
    """`serve` passes `<state dir>/outbox.sqlite`; the gateway takes its directory as the state dir."""
    g = await build_gateway(load_config(REPO / "policies"), redis_url=None, outbox_path=tmp_path / "outbox.sqlite")
    try:
        assert g.state_dir == tmp_path
    finally:
        await g.auth.close()
