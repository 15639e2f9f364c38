"""The `alerts:` section: validated with file:line errors by load_config and `tollgate check`."""

from __future__ import annotations

import subprocess
import sys


from extproc.config import load_config
from extproc.runtime import describe_changes

GOOD = """\
alerts:
  - name: finance
    url: https://hooks.example.com/services/T0/B0/secret
    budgets: [engineer-monthly, "trial-*"]
    events: [threshold, exhausted, forecast]
  - name: ci-runaway
    url: http://127.0.0.1:9/hook
    where: {user: "ci-*"}
    events: [spike]
    spike: {factor: 8, baseline: 7d, min_usd: 5}
"""


from tests.test_config import problems  # noqa: E402  (shared with the config tests; `pdir`: tests/conftest.py)


def line_of(text: str, needle: str) -> int:
    return next(i for i, line in enumerate(text.splitlines(), 1) if needle in line)


def test_a_good_section_loads(pdir):
    (pdir / "alerts.yaml").write_text(GOOD)
    a, b = load_config(pdir).doc.alerts
    assert a.events == ["threshold", "exhausted", "forecast"] and a.watches("trial-frontier")
    assert not a.watches("demo-team-daily") and a.host == "https://hooks.example.com"
    assert b.events == ["spike"] and b.spike.baseline_hours == 168 and b.watches("anything")
    assert b.in_scope({"user": "ci-nightly"}) and not b.in_scope({"user": "alice"}) and not b.in_scope({})
    assert b.retries == 5 and b.timeout_seconds == 5


def test_bad_url_event_and_spike_name_their_lines(pdir):
    text = """\
alerts:
  - name: a
    url: ftp://example.com/x
    events: [threshold, exhaustion]
  - name: b
    url: ""
    spike: {factor: 1, baseline: 90m}
"""
    f = pdir / "alerts.yaml"
    f.write_text(text)
    ps = problems(pdir)
    assert f"{f}:{line_of(text, 'ftp://')}: alerts[0].url: must be an http:// or https:// URL" in "\n".join(ps)
    assert any(p.startswith(f"{f}:{line_of(text, 'exhaustion')}: alerts[0].events[1]: Input should be 'threshold'")
               for p in ps), ps
    empty = line_of(text, 'url: ""')
    assert any(p.startswith(f"{f}:{empty}: alerts[1].url:") for p in ps), ps
    assert any(p.startswith(f"{f}:{line_of(text, 'factor')}: alerts[1].spike.factor:") for p in ps), ps
    assert any("alerts[1].spike.baseline: baseline '90m' must be whole hours" in p for p in ps), ps


def test_unknown_budgets_and_useless_where_are_errors(pdir):
    text = """\
alerts:
  - name: a
    url: https://example.com/hook
    budgets: [engineer-monthly, enginer-monthly, "nobody-*"]
    where: {team: ml}
"""
    f = pdir / "alerts.yaml"
    f.write_text(text)
    ps = problems(pdir)
    assert f"{f}:{line_of(text, 'budgets:')}: alerts[0].budgets[1]: unknown budget 'enginer-monthly'" in ps, ps
    assert f"{f}:{line_of(text, 'budgets:')}: alerts[0].budgets[2]: glob matches no budget 'nobody-*'" in ps, ps
    # engineer-monthly is per user: a team filter would never match one of its counters
    assert any(p.startswith(f"{f}:{line_of(text, 'where:')}: alerts[0].where.team: no watched budget has 'team'")
               for p in ps), ps


def test_names_are_unique_across_files(pdir):
    (pdir / "alerts-a.yaml").write_text("alerts:\n  - {name: dup, url: 'https://a.example/x'}\n")
    (pdir / "alerts-b.yaml").write_text("alerts:\n  - {name: dup, url: 'https://b.example/x'}\n")
    [p] = problems(pdir)
    assert "alert name 'dup' is used twice" in p


def test_the_url_may_come_from_the_environment(pdir, monkeypatch):
    (pdir / "alerts.yaml").write_text("alerts:\n  - {name: slack, url: '${TEST_SLACK_URL}'}\n")
    monkeypatch.setenv("TEST_SLACK_URL", "https://hooks.slack.com/services/T/B/X")
    assert load_config(pdir).doc.alerts[0].url == "https://hooks.slack.com/services/T/B/X"
    monkeypatch.delenv("TEST_SLACK_URL")
    [p] = problems(pdir)
    assert "alerts[0].url: must be an http:// or https:// URL" in p and "unset ${VAR}" in p


def test_reload_log_names_alert_changes(pdir):
    before = load_config(pdir)
    (pdir / "alerts.yaml").write_text(GOOD)
    after = load_config(pdir)
    assert "alert finance added" in describe_changes(before, after)
    (pdir / "alerts.yaml").write_text(GOOD.replace("min_usd: 5", "min_usd: 6"))
    assert "alert ci-runaway changed" in describe_changes(after, load_config(pdir))


def test_tollgate_check_reports_alert_errors(pdir):
    (pdir / "alerts.yaml").write_text("alerts:\n  - name: a\n    url: https://example.com/x\n    budgets: [nope]\n")
    r = subprocess.run([sys.executable, "-m", "extproc.cli", "check", str(pdir)], capture_output=True, text=True)
    assert r.returncode == 1
    assert f"{pdir / 'alerts.yaml'}:4: alerts[0].budgets[0]: unknown budget 'nope'" in r.stderr
