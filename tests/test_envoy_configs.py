"""Every Envoy config we ship passes `envoy --mode validate`, the paste-in snippet included, and
the provider clusters and routes Envoy reads as file-based xDS are built from typed messages."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml

from extproc.config import Config, load_config
from extproc.envoy_config import (
    CDS_FILE,
    RDS_FILE,
    EnvoyPorts,
    cluster_name,
    inline_xds,
    provider_clusters,
    render,
    route_configuration,
    write,
    write_xds,
)
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


# ---- the provider clusters and routes: typed, written as file-based xDS ------------------------

def with_providers(config: Config, **changes: str | None) -> Config:
    """`config` with providers added, re-pointed (name=url) or removed (name=None)."""
    providers = dict(config.providers)
    for name, url in changes.items():
        if url is None:
            providers.pop(name)
        else:
            base = providers.get(name) or providers["fake"]
            providers[name] = base.model_copy(update={"url": url})
    return dataclasses.replace(config, doc=config.doc.model_copy(update={"providers": providers}))


def test_xds_bootstrap_reads_providers_from_the_xds_dir_and_validates(tmp_path):
    config = load_config(REPO / "policies")
    xds = tmp_path / "xds"
    out = write(config, EnvoyPorts(extproc=[50051], xds_dir=str(xds)), tmp_path / "envoy.yaml")
    boot = yaml.safe_load(out.read_text())
    # What never changes stays static; the providers are dynamic.
    assert {c["name"] for c in boot["static_resources"]["clusters"]} == {"tollgate_extproc", "tollgate_admin"}
    assert boot["dynamic_resources"]["cds_config"]["path_config_source"] == {
        "path": f"{xds}/{CDS_FILE}", "watched_directory": {"path": str(xds)}}
    hcm = boot["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    assert "route_config" not in hcm
    assert hcm["rds"]["route_config_name"] == "providers"
    assert hcm["rds"]["config_source"]["path_config_source"] == {
        "path": f"{xds}/{RDS_FILE}", "watched_directory": {"path": str(xds)}}
    assert boot["node"]["id"] and boot["node"]["cluster"]  # a file-based xDS source needs both
    # `envoy --mode validate` does not read xDS files: validate what they hold, inlined.
    inlined = inline_xds(boot)
    assert {cluster_name(n) for n in config.providers} <= {c["name"] for c in inlined["static_resources"]["clusters"]}
    path = tmp_path / "inlined.yaml"
    path.write_text(yaml.safe_dump(inlined))
    validate(path)


def test_xds_files_are_discovery_responses():
    config = load_config(REPO / "policies")
    from extproc.envoy_config import xds_documents

    docs = {name: json.loads(text) for name, text in xds_documents(config).items()}
    assert set(docs) == {CDS_FILE, RDS_FILE}
    cds, rds = docs[CDS_FILE], docs[RDS_FILE]
    assert cds["type_url"] == "type.googleapis.com/envoy.config.cluster.v3.Cluster"
    assert [r["@type"] for r in cds["resources"]] == [cds["type_url"]] * len(config.providers)
    assert [r["name"] for r in cds["resources"]] == [cluster_name(n) for n in config.providers]
    assert rds["type_url"] == "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
    assert [r["name"] for r in rds["resources"]] == ["providers"]
    assert cds["version_info"] and rds["version_info"]


def test_provider_clusters_keep_their_semantics():
    from envoy_data_plane.envoy.config.cluster.v3 import Cluster, ClusterDiscoveryType
    from envoy_data_plane.envoy.extensions.transport_sockets.tls.v3 import UpstreamTlsContext
    from envoy_data_plane.envoy.extensions.upstreams.http.v3 import HttpProtocolOptions

    config = load_config(REPO / "policies")
    clusters = {c.name: c for c in provider_clusters(config)}
    assert all(isinstance(c, Cluster) for c in clusters.values())
    fake, openai = clusters[cluster_name("fake")], clusters[cluster_name("openai")]
    assert fake.type == ClusterDiscoveryType.STATIC and fake.transport_socket is None
    addr = fake.load_assignment.endpoints[0].lb_endpoints[0].endpoint.address.socket_address
    assert (addr.address, addr.port_value) == ("127.0.0.1", config.providers["fake"].port)
    assert openai.type == ClusterDiscoveryType.STRICT_DNS
    assert openai.connect_timeout.total_seconds() == config.providers["openai"].connect_timeout_seconds
    limit = config.gateway.limits.max_concurrent_requests
    t = openai.circuit_breakers.thresholds[0]
    assert (t.max_connections, t.max_pending_requests, t.max_requests) == (limit, limit, limit)
    tls = openai.transport_socket.typed_config.unpack()
    assert isinstance(tls, UpstreamTlsContext) and tls.sni == "api.openai.com"
    assert tls.common_tls_context.alpn_protocols == ["h2", "http/1.1"]
    san = tls.common_tls_context.validation_context.match_typed_subject_alt_names[0]
    assert san.matcher.exact == "api.openai.com"
    http = openai.typed_extension_protocol_options["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"].unpack()
    assert isinstance(http, HttpProtocolOptions) and http.auto_config is not None


def test_provider_routes_keep_their_semantics():
    from envoy_data_plane.envoy.config.route.v3 import RouteConfiguration

    config = load_config(REPO / "policies")
    rc = route_configuration(config)
    assert isinstance(rc, RouteConfiguration) and rc.name == "providers"
    routes = rc.virtual_hosts[0].routes
    assert [r.name for r in routes] == [*config.providers, "not_routed"]
    openai = routes[list(config.providers).index("openai")]
    assert openai.match.prefix == "/v1/"
    assert (openai.match.headers[0].name, openai.match.headers[0].string_match.exact) == ("x-tollgate-upstream", "openai")
    assert openai.request_headers_to_remove == ["x-tollgate-upstream"]
    assert openai.route.cluster == cluster_name("openai")
    assert openai.route.prefix_rewrite == "/v1/"
    assert openai.route.host_rewrite_literal == "api.openai.com"
    assert openai.route.timeout.total_seconds() == config.gateway.request_timeout_seconds
    last = routes[-1]
    assert last.match.prefix == "/" and last.direct_response.status == 502
    assert json.loads(last.direct_response.body.inline_string)["error"]["code"] == "not_routed"


def test_a_wrong_field_fails_when_built_not_when_envoy_loads_it():
    from pydantic import ValidationError

    from envoy_data_plane.envoy.config.cluster.v3 import Cluster
    from envoy_data_plane.envoy.config.core.v3 import SocketAddress
    from envoy_data_plane.envoy.config.route.v3 import RouteAction

    with pytest.raises(ValidationError, match="conect_timeout"):
        Cluster(name="x", conect_timeout=None)  # a misspelt field
    with pytest.raises(ValidationError, match="port_value"):
        SocketAddress(address="127.0.0.1", port_value="eighty")  # a wrong type
    with pytest.raises(ValidationError, match="port_value"):
        SocketAddress(address="127.0.0.1", port_value=2**32)  # out of range for a uint32
    with pytest.raises(ValidationError):
        RouteAction(cluster=5)


def test_write_xds_is_atomic_idempotent_and_versioned(tmp_path, monkeypatch):
    config = load_config(REPO / "policies")
    xds = tmp_path / "xds"
    moves: list[str] = []
    real_replace = os.replace

    def replace(src, dst):
        moves.append(Path(dst).name)
        assert Path(src).parent == Path(dst).parent  # written beside it, then moved: never half a file
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    assert write_xds(config, xds) is True
    assert moves == [CDS_FILE, RDS_FILE]  # a new route's cluster exists before the route does
    before = {f: (xds / f).read_text() for f in (CDS_FILE, RDS_FILE)}
    inodes = {f: (xds / f).stat().st_ino for f in (CDS_FILE, RDS_FILE)}
    assert write_xds(load_config(REPO / "policies"), xds) is False  # the same providers: nothing written
    assert moves == [CDS_FILE, RDS_FILE]
    assert {f: (xds / f).stat().st_ino for f in (CDS_FILE, RDS_FILE)} == inodes
    assert sorted(p.name for p in xds.iterdir()) == [CDS_FILE, RDS_FILE]  # no temporary file left

    # A provider added: both files change, with new versions derived from their content.
    bigger = with_providers(config, fake2="http://127.0.0.1:9/v1")
    assert write_xds(bigger, xds) is True
    after = {f: json.loads((xds / f).read_text()) for f in (CDS_FILE, RDS_FILE)}
    for f in (CDS_FILE, RDS_FILE):
        assert after[f]["version_info"] != json.loads(before[f])["version_info"]
    assert cluster_name("fake2") in [r["name"] for r in after[CDS_FILE]["resources"]]
    # Back to the first providers: byte for byte the first files, versions included.
    assert write_xds(config, xds) is True
    assert {f: (xds / f).read_text() for f in (CDS_FILE, RDS_FILE)} == before
