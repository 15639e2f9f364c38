"""extproc.runtime: a retired runtime closes once its last request ends; a reload's summary."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

from extproc.config import load_config
from extproc.metrics import Metrics
from extproc.runtime import Runtime, describe_changes

REPO = Path(__file__).resolve().parent.parent


def _dir(tmp_path: Path) -> Path:
    d = tmp_path / "p"
    shutil.copytree(REPO / "policies", d)
    return d


def test_a_retired_runtime_closes_after_its_last_request(tmp_path: Path) -> None:
    async def main() -> None:
        rt = Runtime.build(load_config(_dir(tmp_path)), redis=None, outbox=None, metrics=Metrics())
        closed: list[int] = []

        async def close() -> None:
            closed.append(1)

        rt.auth.close = close  # type: ignore[method-assign]
        a, b = rt.hold(), rt.hold()
        rt.retire()
        a.release()
        await asyncio.sleep(0)
        assert closed == [] and rt.holders == 1, "closed while a request still held it"
        b.release()
        await rt.closed()
        assert closed == [1]

    asyncio.run(main())


def test_the_digest_follows_the_bytes(tmp_path: Path) -> None:
    d = _dir(tmp_path)
    first = load_config(d).digest
    assert load_config(d).digest == first and len(first) == 64
    (d / "gateway.yaml").write_text((d / "gateway.yaml").read_text() + "\n# a comment\n")
    assert load_config(d).digest != first


def test_changes_name_budgets_and_credentials_never_secrets(tmp_path: Path) -> None:
    d = _dir(tmp_path)
    (d / "x.yaml").write_text(
        "budgets:\n  - {name: b1, limit_usd: 5, window: {calendar: day}}\n"
        "  - {name: b2, per: [user], limit_usd: 5, window: {calendar: day}}\n"
        "identity:\n  api_keys:\n    keys:\n"
        "      - {name: old-key, key_sha256: " + "a" * 64 + "}\n")
    old = load_config(d)
    (d / "x.yaml").write_text(
        "budgets:\n  - {name: b1, limit_usd: 7, window: {calendar: day}}\n"
        "  - {name: b3, limit_usd: 5, window: {calendar: day}}\n"
        "identity:\n  api_keys:\n    keys:\n"
        "      - {name: new-key, key_sha256: " + "b" * 64 + "}\n")
    changes = describe_changes(old, load_config(d))
    assert "budget b3 added" in changes
    assert any(c.startswith("budget b2 removed") for c in changes)
    assert "budget b1: limit changed (spend kept)" in changes
    assert "api key new-key added" in changes and "api key old-key revoked" in changes
    assert not any("a" * 16 in c or "b" * 16 in c for c in changes)


def test_an_unchanged_identity_section_keeps_its_sources(tmp_path: Path) -> None:
    """Their JWKS and verified tokens carry over a budget edit; the old runtime no longer closes
    them. An identity edit builds new ones."""
    async def main() -> None:
        d = _dir(tmp_path)
        old = Runtime.build(load_config(d), redis=None, outbox=None, metrics=Metrics())
        (d / "x.yaml").write_text("budgets:\n  - {name: b9, limit_usd: 5, window: {calendar: day}}\n")
        new = old.succeeded_by(load_config(d), redis=None, outbox=None, metrics=Metrics())
        assert new.auth is old.auth and not old.owns_auth and new.owns_auth
        closed: list[int] = []

        async def close() -> None:
            closed.append(1)

        new.auth.close = close  # type: ignore[method-assign]
        old.retire()
        await old.closed()
        assert closed == [], "the old runtime closed identity sources its successor uses"
        (d / "y.yaml").write_text("identity:\n  api_keys:\n    keys:\n      - {name: k9, key_sha256: " + "c" * 64 + "}\n")
        newer = new.succeeded_by(load_config(d), redis=None, outbox=None, metrics=Metrics())
        assert newer.auth is not new.auth and new.owns_auth
        new.retire()
        await new.closed()
        assert closed == [1]

    asyncio.run(main())


def test_closed_waits_for_the_last_request_of_a_retired_runtime(tmp_path: Path) -> None:
    """What the xDS narrowing after a reload waits on: retired while a request still holds it,
    `closed()` returns only after that request has ended."""
    async def main() -> None:
        rt = Runtime.build(load_config(_dir(tmp_path)), redis=None, outbox=None, metrics=Metrics())
        held = rt.hold()
        rt.retire()
        waiter = asyncio.ensure_future(rt.closed())
        await asyncio.sleep(0.05)
        assert not waiter.done(), "closed() returned while a request still held the runtime"
        held.release()
        await asyncio.wait_for(waiter, 5)

    asyncio.run(main())
