"""Envoy's configuration: the static bootstrap from `envoy/tollgate.yaml`, and the provider
clusters and routes as file-based xDS that Envoy watches.

Two parts, split by what changes:

* `render()` fills the template's placeholders (ports, log paths, limits): everything that only
  changes with a restart. The template stays readable and commented.
* `write_xds()` builds what depends on `providers.yaml` -- one cluster per provider (CDS) and the
  `providers` route configuration, one route per provider ahead of a catch-all 502 (RDS) -- with
  the typed classes of `envoy-data-plane` (a wrong field or type raises here, when it is built,
  not when Envoy loads it), and writes them as DiscoveryResponse documents into an xDS directory:

      <xds_dir>/cds.json   {"version_info": ..., "type_url": ".../envoy.config.cluster.v3.Cluster",
                            "resources": [{"@type": ..., "name": "provider_<name>", ...}, ...]}
      <xds_dir>/rds.json   {"version_info": ..., "type_url": ".../RouteConfiguration",
                            "resources": [{"@type": ..., "name": "providers", ...}]}

  Each is written to a temporary file in the same directory and moved into place (`os.replace`);
  the bootstrap's `path_config_source` watches the directory for moves, so Envoy applies the new
  file without a restart. `version_info` is a digest of the resources, so the same providers give
  byte-identical files, and writing them again is a no-op.

  How fast Envoy picks a rewrite up and what happens to requests in flight: see `write_xds()`.

`envoy-data-plane` (betterproto2 dataclasses, about 1.4 s to import) is only imported by the
functions that build resources, never by the ext_proc's hot path, which keeps using the
upb-backed `xds-protos` stubs.

Without an xDS directory (`EnvoyPorts.xds_dir = None`) `render()` inlines the same typed
resources into `static_resources`: a self-contained bootstrap, for pasting into another Envoy,
that needs a restart for any provider change.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import string
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .config import Config, Provider

REPO_ENVOY_DIR = Path(__file__).resolve().parent.parent / "envoy"
TEMPLATE = REPO_ENVOY_DIR / "tollgate.yaml"
CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"
ROUTE_CONFIG = "providers"  # the LLM listener's route configuration (RDS resource name)
CDS_FILE = "cds.json"
RDS_FILE = "rds.json"
NOT_ROUTED_BODY = ('{"error":{"message":"gateway: request was not routed","type":"api_error","param":null,'
                   '"code":"not_routed"}}')


@dataclass
class EnvoyPorts:
    listen: int = 8080
    admin: int = 9901
    extproc: list[int] = field(default_factory=lambda: [50051])
    listen_address: str = "127.0.0.1"
    access_log: str = "/dev/stdout"
    admin_access_log: str = "/dev/stdout"  # Envoy's access log of the admin API listener
    buffer_limit_bytes: int = 32 * 1024 * 1024
    admin_api: int = 8081  # Envoy's admin API listener (JSON over HTTP)
    admin_api_address: str = "127.0.0.1"
    extproc_admin: list[int] = field(default_factory=lambda: [50052])  # the ext_proc admin gRPC port(s)
    admin_descriptor: str | None = None  # the admin API's descriptor set; None = build/locate it
    # Where Envoy watches cds.json / rds.json (absolute; `write_xds` fills it). None = inline the
    # provider clusters and routes into static_resources (changing them then needs a restart).
    xds_dir: str | None = None


def render(config: Config, ports: EnvoyPorts, template: Path = TEMPLATE) -> dict[str, Any]:
    """The static bootstrap. With `ports.xds_dir` it reads the provider clusters and routes from
    that directory (call `write_xds` first: Envoy reads the files when it starts); without, they
    are inlined."""
    descriptor = ports.admin_descriptor
    if descriptor is None:
        from .admin.build import ensure_generated

        descriptor = str(ensure_generated())
    xds_dir = ports.xds_dir or "/unused"  # the no-xDS bootstrap drops what refers to it, below
    text = string.Template(template.read_text()).substitute(
        ADMIN_PORT=ports.admin,
        ADMIN_API_PORT=ports.admin_api,
        ADMIN_API_ADDRESS=ports.admin_api_address,
        ADMIN_DESCRIPTOR=descriptor,
        LISTEN_PORT=ports.listen,
        LISTEN_ADDRESS=ports.listen_address,
        ACCESS_LOG_PATH=ports.access_log,
        ADMIN_ACCESS_LOG_PATH=ports.admin_access_log,
        BUFFER_LIMIT_BYTES=max(ports.buffer_limit_bytes, config.gateway.max_request_bytes * 2),
        REQUEST_HEADERS_TIMEOUT=_seconds(config.gateway.limits.request_headers_timeout_seconds),
        REQUEST_RECEIVE_TIMEOUT=_seconds(config.gateway.limits.request_receive_timeout_seconds),
        XDS_DIR=xds_dir,
        CDS_PATH=f"{xds_dir}/{CDS_FILE}",
        RDS_PATH=f"{xds_dir}/{RDS_FILE}",
        ROUTE_CONFIG=ROUTE_CONFIG,
    )
    boot = yaml.safe_load(text)
    res = boot["static_resources"]
    extproc = next(c for c in res["clusters"] if c["name"] == "tollgate_extproc")
    extproc["load_assignment"]["endpoints"][0]["lb_endpoints"] = [_endpoint("127.0.0.1", p) for p in ports.extproc]
    admin = next(c for c in res["clusters"] if c["name"] == "tollgate_admin")
    admin["load_assignment"]["endpoints"][0]["lb_endpoints"] = [_endpoint("127.0.0.1", p) for p in ports.extproc_admin]
    extproc["circuit_breakers"] = _plain(_circuit_breakers(config.gateway.limits.max_concurrent_requests))
    if ports.xds_dir is None:
        hcm = res["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
        del hcm["rds"]
        del boot["dynamic_resources"]
        hcm["route_config"] = _plain(route_configuration(config))
        res["clusters"] += [_plain(c) for c in provider_clusters(config)]
    return boot


def _circuit_breakers(limit: int) -> Any:
    """Envoy's defaults (1,024 connections, pending and concurrent requests per cluster) would fail
    every client with a 500 or 503 once 1,024 requests are in flight, however they are spread; the
    policy's gateway.limits.max_concurrent_requests says how many the gateway serves, and the
    per-identity cap keeps one client from taking them all. For the ext_proc cluster and every
    provider cluster."""
    import_types()
    from envoy_data_plane.envoy.config.cluster.v3 import CircuitBreakers, CircuitBreakersThresholds
    from envoy_data_plane.envoy.config.core.v3 import RoutingPriority

    return CircuitBreakers(thresholds=[CircuitBreakersThresholds(
        priority=RoutingPriority.DEFAULT, max_connections=limit, max_pending_requests=limit,
        max_requests=limit, max_retries=3)])


def write(config: Config, ports: EnvoyPorts, out: Path) -> Path:
    """The bootstrap at `out`; with `ports.xds_dir`, the xDS files there too (Envoy needs both)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    if ports.xds_dir is not None:
        write_xds(config, Path(ports.xds_dir))
    out.write_text(yaml.safe_dump(render(config, ports), sort_keys=False))
    return out


def _seconds(s: float) -> str:
    """A duration for Envoy (whose "0s" would mean no timeout at all; the policy allows none)."""
    return f"{s:.3f}s"


def cluster_name(provider: str) -> str:
    return f"provider_{provider}"


def _endpoint(host: str, port: int) -> dict[str, Any]:
    return {"endpoint": {"address": {"socket_address": {"address": host, "port_value": port}}}}


# ---- the dynamic part: provider clusters (CDS) and routes (RDS), typed ---------------------------

@functools.cache
def import_types() -> None:
    """Import the envoy-data-plane modules used here, once, when a resource is first built (so
    importing this module stays cheap), and quietly: its generated classes use a pydantic
    validator form that pydantic 2.12 deprecates, warning once per class."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import envoy_data_plane.envoy.config.cluster.v3  # noqa: F401
        import envoy_data_plane.envoy.config.core.v3  # noqa: F401
        import envoy_data_plane.envoy.config.endpoint.v3  # noqa: F401
        import envoy_data_plane.envoy.config.route.v3  # noqa: F401
        import envoy_data_plane.envoy.extensions.transport_sockets.tls.v3  # noqa: F401
        import envoy_data_plane.envoy.extensions.upstreams.http.v3  # noqa: F401
        import envoy_data_plane.envoy.service.discovery.v3  # noqa: F401
        import envoy_data_plane.envoy.type.matcher.v3  # noqa: F401
        import envoy_data_plane.google.protobuf  # noqa: F401


def provider_clusters(config: Config) -> list[Any]:
    """One `envoy.config.cluster.v3.Cluster` per provider, in policy order."""
    import_types()
    limit = config.gateway.limits.max_concurrent_requests
    return [_cluster(name, p, limit) for name, p in config.providers.items()]


def route_configuration(config: Config) -> Any:
    """The LLM listener's `providers` RouteConfiguration: one route per provider, then the 502."""
    import_types()
    from envoy_data_plane.envoy.config.core.v3 import DataSource, HeaderValue, HeaderValueOption
    from envoy_data_plane.envoy.config.route.v3 import (
        DirectResponseAction, Route, RouteConfiguration, RouteMatch, VirtualHost)

    timeout = _duration(config.gateway.request_timeout_seconds)
    routes = [_route(name, p, timeout) for name, p in config.providers.items()]
    # Without the ext_proc's header nothing may pass: the ext_proc answers every request it does
    # not route, so reaching this is a gateway bug (or a provider just removed), said as JSON.
    routes.append(Route(
        name="not_routed",
        match=RouteMatch(prefix="/"),
        direct_response=DirectResponseAction(status=502, body=DataSource(inline_string=NOT_ROUTED_BODY)),
        response_headers_to_add=[HeaderValueOption(header=HeaderValue(key="content-type", value="application/json"))],
    ))
    return RouteConfiguration(name=ROUTE_CONFIG, virtual_hosts=[VirtualHost(name="llm", domains=["*"], routes=routes)])


def _route(name: str, p: Provider, timeout: Any) -> Any:
    """Requests the ext_proc tagged for this provider; `/v1/...` becomes the provider's base path."""
    from envoy_data_plane.envoy.config.route.v3 import HeaderMatcher, Route, RouteAction, RouteMatch
    from envoy_data_plane.envoy.type.matcher.v3 import StringMatcher

    return Route(
        name=name,
        match=RouteMatch(prefix="/v1/", headers=[
            HeaderMatcher(name="x-tollgate-upstream", string_match=StringMatcher(exact=name))]),
        request_headers_to_remove=["x-tollgate-upstream"],
        route=RouteAction(
            cluster=cluster_name(name),
            prefix_rewrite=p.base_path + "/",
            host_rewrite_literal=p.authority,
            timeout=timeout,
        ),
    )


def _cluster(name: str, p: Provider, limit: int) -> Any:
    from envoy_data_plane.envoy.config.cluster.v3 import Cluster, ClusterDiscoveryType, ClusterDnsLookupFamily
    from envoy_data_plane.envoy.config.core.v3 import (
        Address, DataSource, Http1ProtocolOptions, Http2ProtocolOptions, SocketAddress, TransportSocket)
    from envoy_data_plane.envoy.config.endpoint.v3 import ClusterLoadAssignment, Endpoint, LbEndpoint, LocalityLbEndpoints
    from envoy_data_plane.envoy.extensions.transport_sockets.tls.v3 import (
        CertificateValidationContext, CommonTlsContext, SubjectAltNameMatcher, SubjectAltNameMatcherSanType,
        UpstreamTlsContext)
    from envoy_data_plane.envoy.extensions.upstreams.http.v3 import HttpProtocolOptions, HttpProtocolOptionsAutoHttpConfig
    from envoy_data_plane.envoy.type.matcher.v3 import StringMatcher
    from envoy_data_plane.google.protobuf import Any as PbAny

    endpoint = LbEndpoint(endpoint=Endpoint(address=Address(socket_address=SocketAddress(address=p.host,
                                                                                         port_value=p.port))))
    c = Cluster(
        name=cluster_name(name),
        type=ClusterDiscoveryType.STATIC if _is_ip(p.host) else ClusterDiscoveryType.STRICT_DNS,
        dns_lookup_family=ClusterDnsLookupFamily.V4_PREFERRED,
        connect_timeout=_duration(p.connect_timeout_seconds),
        load_assignment=ClusterLoadAssignment(cluster_name=cluster_name(name),
                                              endpoints=[LocalityLbEndpoints(lb_endpoints=[endpoint])]),
        circuit_breakers=_circuit_breakers(limit),
    )
    if p.tls:
        tls = UpstreamTlsContext(
            sni=p.host,  # providers sit behind shared front ends: SNI is required
            common_tls_context=CommonTlsContext(
                alpn_protocols=["h2", "http/1.1"],
                validation_context=CertificateValidationContext(
                    trusted_ca=DataSource(filename=CA_BUNDLE),
                    match_typed_subject_alt_names=[SubjectAltNameMatcher(
                        san_type=SubjectAltNameMatcherSanType.DNS, matcher=StringMatcher(exact=p.host))],
                ),
            ),
        )
        c.transport_socket = TransportSocket(name="envoy.transport_sockets.tls", typed_config=PbAny.pack(tls))
        # HTTP/2 when the provider's ALPN offers it, else HTTP/1.1.
        http = HttpProtocolOptions(auto_config=HttpProtocolOptionsAutoHttpConfig(
            http_protocol_options=Http1ProtocolOptions(), http2_protocol_options=Http2ProtocolOptions()))
        c.typed_extension_protocol_options = {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": PbAny.pack(http)}
    return c


def _duration(seconds: float) -> Any:
    import datetime

    return datetime.timedelta(seconds=seconds)


def _plain(message: Any) -> dict[str, Any]:
    """A typed message as Envoy's JSON/YAML mapping (field names as in the .proto, Any with @type)."""
    import betterproto2

    return message.to_dict(casing=betterproto2.Casing.SNAKE)


def xds_documents(config: Config) -> dict[str, str]:
    """File name -> the DiscoveryResponse JSON Envoy reads from it, for this policy's providers."""
    import_types()
    from envoy_data_plane.envoy.service.discovery.v3 import DiscoveryResponse
    from envoy_data_plane.google.protobuf import Any as PbAny

    out: dict[str, str] = {}
    for file, resources in ((CDS_FILE, provider_clusters(config)), (RDS_FILE, [route_configuration(config)])):
        packed = [PbAny.pack(r) for r in resources]
        digest = hashlib.sha256(b"".join(a.type_url.encode() + bytes(a) for a in packed)).hexdigest()
        doc = DiscoveryResponse(version_info=digest[:16], type_url=packed[0].type_url if packed else "",
                                resources=packed)
        out[file] = json.dumps(_plain(doc), indent=2) + "\n"
    return out


def write_xds(config: Config, xds_dir: Path) -> bool:
    """Write the provider clusters (cds.json) and routes (rds.json) Envoy watches; True if either
    file changed (the same providers write nothing).

    Each file is written beside its destination and moved into place, so Envoy never reads half
    a file; cds.json goes first, so a new route's cluster exists when the route arrives. An
    Envoy that rejects a file (its log says "Filesystem config update rejected: ...") keeps the
    previous configuration; but by default Envoy only warns about an unknown field or enum value
    in dynamic configuration and drops it (`--reject-unknown-dynamic-fields` makes it reject),
    which is why these resources are built typed. Safe to call from several processes or threads
    at once (each writes its own temporary file); the last move wins.

    Measured on the 2-core dev machine (Envoy 1.40 `--concurrency 2`, tests/test_e2e_xds.py and
    an admin-API poll every millisecond, 10 rewrites):
    * pickup: Envoy's /clusters shows the new cluster 1-4 ms after the move (median 1.6 ms), and
      /config_dump the new route configuration 3-6 ms after it (median 3.9 ms); the next request
      goes there. Building the documents is the slow part: about 0.1 s per call (betterproto2's
      to_dict), 1.1 s for the first call in a process (importing envoy-data-plane, +18 MB RSS).
      A call that finds nothing to change still builds them.
    * a changed provider (its cluster's address moved to another port, under load): requests in
      flight, streams included, finish on the old cluster with their whole body; new ones go to
      the new address; no request failed, Envoy's PID unchanged.
    * a removed provider: its cluster and route are gone within the same few ms; a request still
      tagged for it falls through to the catch-all JSON 502 (`not_routed`), while requests in
      flight on it (streams) finish normally.
    A new STRICT_DNS cluster is warmed by its first DNS answer before Envoy uses it, which can
    take longer than the figures above (they are for a STATIC, IP-addressed cluster).
    """
    xds_dir.mkdir(parents=True, exist_ok=True)
    changed = False
    for file, text in xds_documents(config).items():  # CDS_FILE before RDS_FILE
        dest = xds_dir / file
        try:
            if dest.read_text() == text:
                continue
        except OSError:
            pass
        fd, tmp = tempfile.mkstemp(dir=xds_dir, prefix=f".{file}.", suffix=".tmp")  # a move, not a write
        try:
            with os.fdopen(fd, "w") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o644)
            os.replace(tmp, dest)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        changed = True
    return changed


def inline_xds(boot: dict[str, Any]) -> dict[str, Any]:
    """A rendered bootstrap with the xDS files it points at read in: the provider clusters in
    static_resources and the routes as the LLM listener's route_config, as Envoy has them now.
    For tools that need one self-contained file (`envoy --mode validate` does not read xDS files;
    tests/bench.py's plain-Envoy baseline). Changes and returns `boot`."""
    hcm = boot["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    rds = hcm.pop("rds")
    cds = boot.pop("dynamic_resources")["cds_config"]

    def resources(source: dict[str, Any]) -> list[dict[str, Any]]:
        doc = json.loads(Path(source["path_config_source"]["path"]).read_text())
        return [{k: v for k, v in r.items() if k != "@type"} for r in doc["resources"]]

    hcm["route_config"] = next(r for r in resources(rds["config_source"]) if r["name"] == rds["route_config_name"])
    boot["static_resources"]["clusters"] += resources(cds)
    return boot


def _is_ip(host: str) -> bool:
    import ipaddress

    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False
