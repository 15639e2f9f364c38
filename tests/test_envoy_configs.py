"""Every Envoy config we ship passes `envoy --mode validate`, the paste-in snippet included."""

from __future__ import annotations

import subprocess
from pathlib import Path

import yaml

from extproc.config import load_config
from extproc.envoy_config import EnvoyPorts, cluster_name, render
from extproc.stack import envoy_binary
from tests.conftest import REPO


def validate(path: Path) -> None:
    r = subprocess.run([envoy_binary(), "--mode", "validate", "-c", str(path), "--disable-hot-restart",
                        "--log-level", "error"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "OK" in r.stdout + r.stderr


def test_envoy_binary_is_found_despite_package_clash():
    out = subprocess.run([envoy_binary(), "--version"], capture_output=True, text=True, timeout=30).stdout
    assert "1.40." in out


def test_rendered_bootstrap_validates(tmp_path):
    config = load_config(REPO / "policies")
    boot = render(config, EnvoyPorts(extproc=[50051, 50052]))
    clusters = {c["name"] for c in boot["static_resources"]["clusters"]}
    assert {"tollgate_extproc", "tollgate_admin", cluster_name("openai"), cluster_name("anthropic"),
            cluster_name("fake")} <= clusters
    assert [lst["name"] for lst in boot["static_resources"]["listeners"]] == ["llm", "admin_api"]
    openai = next(c for c in boot["static_resources"]["clusters"] if c["name"] == cluster_name("openai"))
    assert openai["transport_socket"]["typed_config"]["sni"] == "api.openai.com"
    path = tmp_path / "envoy.yaml"
    path.write_text(yaml.safe_dump(boot))
    validate(path)


def test_snippet_merged_into_minimal_bootstrap_validates(tmp_path):
    snippet = yaml.safe_load((REPO / "envoy" / "extproc-snippet.yaml").read_text())
    boot = {
        "static_resources": {
            "listeners": [{
                "name": "existing",
                "address": {"socket_address": {"address": "127.0.0.1", "port_value": 10000}},
                "filter_chains": [{"filters": [{
                    "name": "envoy.filters.network.http_connection_manager",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                        "stat_prefix": "existing",
                        "route_config": {"virtual_hosts": [{"name": "all", "domains": ["*"], "routes": [
                            {"match": {"prefix": "/"}, "route": {"cluster": "tollgate_extproc"}}]}]},
                        "http_filters": snippet["http_filters"] + [{
                            "name": "envoy.filters.http.router",
                            "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}],
                    },
                }]}],
            }],
            "clusters": snippet["clusters"],
        }
    }
    path = tmp_path / "merged.yaml"
    path.write_text(yaml.safe_dump(boot))
    validate(path)


def test_every_yaml_in_envoy_dir_is_covered():
    # A new config file in envoy/ needs a validation test here.
    assert {p.name for p in (REPO / "envoy").glob("*.yaml")} == {"tollgate.yaml", "extproc-snippet.yaml"}
