"""Render Envoy's bootstrap from `envoy/tollgate.yaml` and the policy's providers.

The template stays readable and commented; what depends on the policy (one cluster and one
route per provider) and on the ports of this run is filled in here.
"""

from __future__ import annotations

import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .config import Config, Provider

REPO_ENVOY_DIR = Path(__file__).resolve().parent.parent / "envoy"
TEMPLATE = REPO_ENVOY_DIR / "tollgate.yaml"
CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"


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


def render(config: Config, ports: EnvoyPorts, template: Path = TEMPLATE) -> dict[str, Any]:
    descriptor = ports.admin_descriptor
    if descriptor is None:
        from .admin.build import ensure_generated

        descriptor = str(ensure_generated())
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
    )
    boot = yaml.safe_load(text)
    res = boot["static_resources"]
    extproc = next(c for c in res["clusters"] if c["name"] == "tollgate_extproc")
    extproc["load_assignment"]["endpoints"][0]["lb_endpoints"] = [_endpoint("127.0.0.1", p) for p in ports.extproc]
    admin = next(c for c in res["clusters"] if c["name"] == "tollgate_admin")
    admin["load_assignment"]["endpoints"][0]["lb_endpoints"] = [_endpoint("127.0.0.1", p) for p in ports.extproc_admin]
    vhost = res["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]["route_config"]["virtual_hosts"][0]
    timeout = _seconds(config.gateway.request_timeout_seconds)
    routes = [_route(name, p, timeout) for name, p in config.providers.items()]
    vhost["routes"] = routes + vhost["routes"]
    breakers = _circuit_breakers(config.gateway.limits.max_concurrent_requests)
    extproc["circuit_breakers"] = breakers
    res["clusters"] += [{**_cluster(name, p), "circuit_breakers": breakers} for name, p in config.providers.items()]
    return boot


def _circuit_breakers(limit: int) -> dict[str, Any]:
    """Envoy's defaults (1,024 connections, pending and concurrent requests per cluster) would fail
    every client with a 500 or 503 once 1,024 requests are in flight, however they are spread; the
    policy's gateway.limits.max_concurrent_requests says how many the gateway serves, and the
    per-identity cap keeps one client from taking them all."""
    return {"thresholds": [{"priority": "DEFAULT", "max_connections": limit, "max_pending_requests": limit,
                            "max_requests": limit, "max_retries": 3}]}


def write(config: Config, ports: EnvoyPorts, out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(yaml.safe_dump(render(config, ports), sort_keys=False))
    return out


def _seconds(s: float) -> str:
    """A duration for Envoy (whose "0s" would mean no timeout at all; the policy allows none)."""
    return f"{s:.3f}s"


def cluster_name(provider: str) -> str:
    return f"provider_{provider}"


def _endpoint(host: str, port: int) -> dict[str, Any]:
    return {"endpoint": {"address": {"socket_address": {"address": host, "port_value": port}}}}


def _route(name: str, p: Provider, timeout: str) -> dict[str, Any]:
    """Requests the ext_proc tagged for this provider; `/v1/...` becomes the provider's base path."""
    return {
        "name": name,
        "match": {"prefix": "/v1/", "headers": [{"name": "x-tollgate-upstream", "string_match": {"exact": name}}]},
        "request_headers_to_remove": ["x-tollgate-upstream"],
        "route": {
            "cluster": cluster_name(name),
            "prefix_rewrite": p.base_path + "/",
            "host_rewrite_literal": p.authority,
            "timeout": timeout,
        },
    }


def _cluster(name: str, p: Provider) -> dict[str, Any]:
    c: dict[str, Any] = {
        "name": cluster_name(name),
        "type": "STRICT_DNS" if not _is_ip(p.host) else "STATIC",
        "dns_lookup_family": "V4_PREFERRED",
        "connect_timeout": f"{p.connect_timeout_seconds}s",
        "load_assignment": {"cluster_name": cluster_name(name), "endpoints": [{"lb_endpoints": [_endpoint(p.host, p.port)]}]},
    }
    if p.tls:
        c["transport_socket"] = {
            "name": "envoy.transport_sockets.tls",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
                "sni": p.host,  # providers sit behind shared front ends: SNI is required
                "common_tls_context": {
                    "alpn_protocols": ["h2", "http/1.1"],
                    "validation_context": {
                        "trusted_ca": {"filename": CA_BUNDLE},
                        "match_typed_subject_alt_names": [{"san_type": "DNS", "matcher": {"exact": p.host}}],
                    },
                },
            },
        }
        c["typed_extension_protocol_options"] = {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "auto_config": {"http_protocol_options": {}, "http2_protocol_options": {}},
            }
        }
    return c


def _is_ip(host: str) -> bool:
    import ipaddress

    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False
