"""Cost attribution end to end: records, `tollgate report`, `tollgate budgets`, /metrics agree.

A scripted mix of requests from several identities goes through Envoy on a stack of its own
(so nothing else adds to its Redis); then every view of the spend must give the same numbers,
to the micro-dollar, as the sum of the attribution records.
"""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
from collections import defaultdict

import anthropic
import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from extproc.stack import Stack
from tests.conftest import JsonLog, running_stack

MIX = [  # (api key, api, model, max tokens, times)
    ("demo", "openai", "gpt-4o", 50, 3),
    ("demo", "anthropic", "claude-haiku-4-5", 40, 2),
    ("key-ic", "openai", "gpt-4o-mini", 80, 4),
    ("key-senior", "openai", "gpt-4.1", 30, 2),
    ("key-alice", "anthropic", "claude-sonnet-4-6", 60, 2),
    ("key-ml", "openai", "gpt-5-mini", 100, 3),
    ("key-intern", "openai", "gpt-4o", 10, 1),  # refused (403): must not count
]


@pytest.fixture(scope="module")
def attr_stack(policy_dir, idp, tmp_path_factory):
    with running_stack(policy_dir, idp, tmp_path_factory.mktemp("attribution")) as s:
        for key, api, model, cap, times in MIX:
            for i in range(times):
                content = f"request {i} from {key} " * (i + 1)
                try:
                    if api == "openai":  # every other request streamed
                        resp = openai.OpenAI(base_url=f"{s.base_url}/v1", api_key=key, max_retries=0) \
                            .chat.completions.create(model=model, max_completion_tokens=cap, stream=i % 2 == 1,
                                                     messages=[{"role": "user", "content": content}])
                        if i % 2 == 1:
                            assert list(resp)
                    else:
                        anthropic.Anthropic(base_url=s.base_url, api_key=key, max_retries=0).messages.create(
                            model=model, max_tokens=cap, messages=[{"role": "user", "content": content}])
                except openai.PermissionDeniedError:
                    pass
        yield s


def records(s: Stack) -> list[dict]:
    return [r for r in JsonLog(s.attribution_log).records() if r.get("api")]


def cli(s: Stack, *args: str) -> str:
    r = subprocess.run([sys.executable, "-m", "extproc.cli", *args, "--redis-url", s.redis_url],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout


def sums(recs: list[dict], dim: str) -> dict[str, int]:
    out: dict[str, int] = defaultdict(int)
    for r in recs:
        if r["decision"] in ("allowed", "downgraded", "clamped"):
            out[r[dim] or ""] += r["cost_nusd"]
    return dict(out)


@pytest.mark.parametrize("dim", ["team", "user"])
def test_report_matches_records_in_every_format(attr_stack, dim):
    want = sums(records(attr_stack), dim)
    assert len(want) >= 3 and all(v > 0 for v in want.values())
    data = json.loads(cli(attr_stack, "report", "--by", dim, "--format", "json"))
    got = {row[dim]: row["cost_nusd"] for row in data["rows"]}
    assert got == want
    assert data["totals"]["cost_nusd"] == sum(want.values())
    assert data["totals"]["requests"] == sum(1 for r in records(attr_stack) if r["decision"] == "allowed")
    rows = list(csv.DictReader(io.StringIO(cli(attr_stack, "report", "--by", dim, "--format", "csv"))))
    assert {r[dim]: round(float(r["cost_usd"]), 6) for r in rows if r[dim] != "TOTAL"} == \
        {k: round(v / 1e9, 6) for k, v in want.items()}
    table = cli(attr_stack, "report", "--by", dim)
    for k, v in want.items():
        assert k in table and f"{v / 1e9:.6f}" in table


def test_report_by_model_and_filters(attr_stack):
    recs = records(attr_stack)
    data = json.loads(cli(attr_stack, "report", "--by", "model,provider", "--where", "team=web", "--format", "json"))
    want: dict = defaultdict(int)
    for r in recs:
        if r["decision"] == "allowed" and r["team"] == "web":
            want[(r["model_served"], r["provider"])] += r["cost_nusd"]
    assert {(x["model"], x["provider"]): x["cost_nusd"] for x in data["rows"]} == dict(want)
    tokens = sum(r["input_tokens"] for r in recs if r["decision"] == "allowed" and r["team"] == "web")
    assert data["totals"]["input_tokens"] == tokens


def test_bad_report_arguments_fail_clearly(attr_stack):
    r = subprocess.run([sys.executable, "-m", "extproc.cli", "report", "--by", "colour", "--redis-url",
                        attr_stack.redis_url], capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "unknown dimension" in r.stderr


def test_budgets_cli_lists_live_counters(attr_stack):
    rows = json.loads(cli(attr_stack, "budgets", "--where", "user=ic@example.com", "--format", "json"))["rows"]
    ic = next(r for r in rows if r["budget"] == "engineer-monthly")
    spent = sum(r["cost_nusd"] for r in records(attr_stack) if r["user"] == "ic@example.com") / 1e9
    assert ic["limit_usd"] == 500 and ic["spent_usd"] == pytest.approx(spent, abs=1e-9)
    assert ic["reserved_usd"] == 0 and ic["resets_at"]
    assert "engineer-monthly" in cli(attr_stack, "budgets")


def test_metrics_parse_and_match_the_report(attr_stack):
    text = httpx.get(f"http://127.0.0.1:{attr_stack.ports.metrics[0]}/metrics").text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    spend = families["tollgate_spend_usd"]
    by_team: dict[str, float] = defaultdict(float)
    for sample in spend.samples:
        assert "user" not in sample.labels  # no per-user labels by default
        by_team[sample.labels["team"]] += sample.value
    report = json.loads(cli(attr_stack, "report", "--by", "team", "--format", "json"))
    assert {k: round(v, 9) for k, v in by_team.items()} == {r["team"]: round(r["cost_usd"], 9) for r in report["rows"]}
    requests = families["tollgate_requests"]
    refused = sum(s.value for s in requests.samples if s.labels["decision"] == "refused")
    assert refused >= 1
    assert any(s.labels["phase"] == "request_body" for s in families["tollgate_extproc_phase_seconds"].samples)
