"""Policy loading: errors name file, line and field; `tollgate check` exits non-zero."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from extproc.config import load_config
from extproc.policy_yaml import PolicyError
from tests.conftest import REPO


def problems(pdir: Path) -> list[str]:
    with pytest.raises(PolicyError) as e:
        load_config(pdir)
    return e.value.problems


def test_shipped_policies_load():
    c = load_config(REPO / "policies")
    assert c.prices.lookup("gpt-4o") is not None and "fake" in c.providers


def test_bad_value_names_file_line_and_field(pdir):
    (pdir / "gateway.yaml").write_text("gateway:\n  max_request_bytes: -3\n  request_timeout_seconds: 10\n")
    [p] = problems(pdir)
    assert p.startswith(f"{pdir / 'gateway.yaml'}:2: gateway.max_request_bytes:")


def test_unknown_key_and_unknown_provider(pdir):
    text = (pdir / "providers.yaml").read_text().replace("    provider: fake", "    provider: nowhere")
    (pdir / "providers.yaml").write_text(text.replace("    wires: [openai, anthropic]", "    wirez: [openai]"))
    ps = problems(pdir)
    assert any("providers.fake.wirez" in p and ":6:" not in p and "Extra inputs" in p for p in ps), ps


def test_route_to_unknown_provider(pdir):
    text = (pdir / "providers.yaml").read_text().replace("    provider: fake", "    provider: nowhere")
    (pdir / "providers.yaml").write_text(text)
    [p] = problems(pdir)
    lineno = next(i for i, line in enumerate(text.splitlines(), 1) if "provider: nowhere" in line)
    assert p == f"{pdir / 'providers.yaml'}:{lineno}: routes[0].provider: unknown provider 'nowhere'"


def test_yaml_syntax_error_and_duplicate_section(pdir):
    (pdir / "broken.yaml").write_text("gateway:\n  a: [1, 2\n")
    (pdir / "dup.yaml").write_text("gateway:\n  max_request_bytes: 5\n")
    ps = problems(pdir)
    assert any("broken.yaml:" in p and "YAML syntax error" in p for p in ps)
    assert any("gateway.max_request_bytes: already set at" in p and "dup.yaml" in p and "gateway.yaml" in p
               for p in ps), ps


def test_sections_split_across_files_merge_and_keep_lines(pdir):
    (pdir / "zz-more-prices.yaml").write_text("prices:\n  models:\n    my-model: {input: 1, output: 2}\n")
    (pdir / "zz-keys.yaml").write_text(
        "identity:\n  api_keys:\n    keys:\n      - name: extra\n        key_sha256: nothex\n")
    ps = problems(pdir)
    # The second file's key is item [1] of the joined list, reported at its own file and line.
    shipped = len(yaml.safe_load((pdir / "identity.yaml").read_text())["identity"]["api_keys"]["keys"])
    assert len(ps) == 1 and f"zz-keys.yaml:5: identity.api_keys.keys[{shipped}].key_sha256: key_sha256 must be" in ps[0], ps
    (pdir / "zz-keys.yaml").unlink()
    c = load_config(pdir)
    assert c.prices.lookup("my-model") is not None and c.prices.lookup("gpt-4o") is not None


def test_env_references_expand(pdir, monkeypatch):
    monkeypatch.setenv("TOLLGATE_FAKE_PORT", "1234")
    assert load_config(pdir).providers["fake"].port == 1234


def test_tollgate_check_exit_codes(pdir):
    ok = subprocess.run([sys.executable, "-m", "extproc.cli", "check", str(pdir)], capture_output=True, text=True)
    assert ok.returncode == 0 and "OK" in ok.stdout
    (pdir / "gateway.yaml").write_text("gateway:\n  max_request_bytes: lots\n")
    bad = subprocess.run([sys.executable, "-m", "extproc.cli", "check", str(pdir)], capture_output=True, text=True)
    assert bad.returncode == 1 and "gateway.yaml:2: gateway.max_request_bytes" in bad.stderr


def test_a_provider_key_that_reads_nothing_fails_the_check(tmp_path, monkeypatch):  # type: ignore[no-untyped-def]
    import subprocess
    import sys

    import pytest

    from extproc.config import load_config
    from extproc.policy_yaml import PolicyError

    for f in ("prices.yaml", "gateway.yaml", "providers.yaml"):
        shutil.copy(f"policies/{f}", tmp_path / f)
    (tmp_path / "zz-strict.yaml").write_text(
        "providers:\n  strict:\n    url: https://api.example.com/v1\n    key: {env: TOLLGATE_TEST_STRICT_KEY}\n")
    monkeypatch.delenv("TOLLGATE_TEST_STRICT_KEY", raising=False)
    with pytest.raises(PolicyError) as e:
        load_config(tmp_path)
    (problem,) = e.value.problems
    assert "zz-strict.yaml:4" in problem and "TOLLGATE_TEST_STRICT_KEY is unset" in problem, problem
    check = subprocess.run([sys.executable, "-m", "extproc.cli", "check", str(tmp_path)], capture_output=True, text=True)
    assert check.returncode == 1 and "TOLLGATE_TEST_STRICT_KEY" in check.stderr
    monkeypatch.setenv("TOLLGATE_TEST_STRICT_KEY", "sk-x")
    assert load_config(tmp_path).providers["strict"].key is not None
