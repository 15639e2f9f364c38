"""The policy directory, loaded and validated once into an immutable `Config`.

Every `*.yaml` file under the directory contributes top-level sections, merged in file-name
order: mappings merge, lists join (one file of budgets per team reads well), and a value set in
two files is an error. Problems are reported all at once with file and line (`tollgate check`).
"""

from __future__ import annotations

import fnmatch
import functools
import hashlib
import os
from dataclasses import dataclass
from datetime import date
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .access import AccessRule
from .alerts import AlertList, alert_problems
from .budgets import BudgetList, RateLimitList
from .cache.policy import CacheList  # response cache (extproc/cache/)
from .identity import IdentityConfig
from .policy_yaml import PolicyError, SourceMap, load_yaml
from .pricing import ModelPrice, PriceTable

Wire = Literal["openai", "anthropic"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PricesSection(_Strict):
    models: dict[str, ModelPrice | list[ModelPrice]] = Field(
        description="model name or glob -> its rates, or a list of dated rates (effective / until)")
    default: ModelPrice | None = Field(default=None, description="price for models not listed; none = refuse them")
    tools: dict[str, Decimal] = Field(
        default_factory=dict, description="USD per call of a server-side tool: web_search, web_fetch, file_search, "
                                          "code_interpreter, image_generation")

    @field_validator("models")
    @classmethod
    def _dated(cls, v: dict[str, ModelPrice | list[ModelPrice]]) -> dict[str, ModelPrice | list[ModelPrice]]:
        for name, rates in v.items():
            if not isinstance(rates, list):
                continue
            if not rates:
                raise ValueError(f"{name}: an empty list of rates")
            spans = sorted((r.effective or date.min, r.until or date.max) for r in rates)
            if any(a[1] >= b[0] for a, b in zip(spans, spans[1:])):
                raise ValueError(f"{name}: dated rates overlap; give each an `effective` / `until` that do not")
            if any(r.until is not None and r.effective is not None and r.until < r.effective for r in rates):
                raise ValueError(f"{name}: `until` before `effective`")
        return v

    @field_validator("tools")
    @classmethod
    def _tool_kinds(cls, v: dict[str, Decimal]) -> dict[str, Decimal]:
        from .pricing import TOOL_KINDS

        unknown = sorted(set(v) - set(TOOL_KINDS))
        if unknown:
            raise ValueError(f"unknown tool(s) {unknown}; use {', '.join(TOOL_KINDS)}")
        if any(p < 0 for p in v.values()):
            raise ValueError("tool prices cannot be negative")
        return v


class KeySource(_Strict):
    """Where the gateway reads a provider key. Exactly one of env / file."""

    env: str | None = None
    file: str | None = None

    @model_validator(mode="after")
    def _one(self) -> "KeySource":
        if (self.env is None) == (self.file is None):
            raise ValueError("give exactly one of `env` or `file`")
        return self

    def read(self) -> str | None:
        if self.env is not None:
            return os.environ.get(self.env) or None
        try:
            return Path(self.file).read_text().strip() or None  # type: ignore[arg-type]
        except OSError:
            return None


class Provider(_Strict):
    """An upstream: where it is, which wire formats it speaks, whose key it gets."""

    url: str = Field(description="base URL up to and including the API version, e.g. https://api.openai.com/v1")
    wires: list[Wire] = ["openai"]
    key: KeySource | None = Field(default=None, description="the gateway-held key sent upstream")
    key_missing: Literal["error", "refuse"] = Field(
        default="error", description="when `key` reads nothing (unset env var, unreadable file): `error` fails "
                                     "`tollgate check` and start-up; `refuse` starts, and requests routed here "
                                     "get a 503")
    pass_client_key: bool = Field(
        default=False, description="without a gateway key, forward the client's own provider key (authorization / "
                                   "x-api-key), never a Tollgate credential; off = the provider gets no key")
    connect_timeout_seconds: float = 5.0

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        u = urlsplit(v)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise ValueError("must be an http:// or https:// URL with a host")
        return v.rstrip("/")

    @property
    def host(self) -> str:
        return urlsplit(self.url).hostname or ""

    @property
    def port(self) -> int:
        u = urlsplit(self.url)
        return u.port or (443 if u.scheme == "https" else 80)

    @property
    def tls(self) -> bool:
        return urlsplit(self.url).scheme == "https"

    @property
    def base_path(self) -> str:
        return urlsplit(self.url).path

    @property
    def authority(self) -> str:
        default = 443 if self.tls else 80
        return self.host if self.port == default else f"{self.host}:{self.port}"


class Route(_Strict):
    """Send models matching these globs to `provider` (first matching route wins)."""

    models: list[str] = ["*"]
    provider: str


if TYPE_CHECKING:
    from .usage import StreamBound


class BoundsSection(_Strict):
    """Allowances the worst case assumes for what a request body cannot show (docs/pricing.md)."""

    server_tool_calls: int = Field(
        default=10, ge=0, description="calls a server tool (web search, file search, ...) may make when the "
                                      "request sets no max_uses / max_tool_calls")
    server_tool_input_tokens: int = Field(
        default=20_000, ge=0, description="input tokens each server tool call may add (its results are billed as input)")
    document_input_tokens: int = Field(
        default=100_000, ge=0, description="input tokens a document or file given by URL or file id may bill")
    stateful_input_tokens: int = Field(
        default=400_000, ge=0, description="input tokens the stored context of previous_response_id / conversation "
                                           "may bill (Responses API)")
    image_output_tokens: int = Field(
        default=16_384, ge=0, description="image output tokens each call of an image generation tool may bill, at "
                                          "the image model's rates (the body does not say how large the image is)")
    default_service_tier: str = Field(
        default="standard", min_length=1,
        description="the OpenAI rate tier a request that sets no service_tier (or `auto`) is billed at: your "
                    "project's setting (`standard`, `flex` or `priority`)")
    default_inference_geo: str = Field(
        default="global", min_length=1,
        description="where an Anthropic request that sets no inference_geo runs: your workspace's default")
    unpriced_tier_multiplier: Decimal = Field(
        default=Decimal(2), ge=1, description="a request for a rate tier (service_tier, speed) the price table has no "
                                              "rates for is bounded at the standard rates times this")
    unbounded: Literal["allow", "refuse"] = Field(
        default="allow", description="a request whose worst case rests on an allowance above (no upper bound in the "
                                     "body): `allow` admits it with the stated allowance, `refuse` answers 400 "
                                     "(docs/pricing.md lists every case)")


class LimitsSection(_Strict):
    """What one client may hold (docs/operations.md, "Limits"): rendered into Envoy's listener and
    clusters, and the per-identity cap the ext_proc enforces when a request's headers arrive."""

    concurrent_requests_per_identity: int = Field(
        default=256, ge=0, description="requests one identity may have in flight on one ext_proc process, "
                                      "streams included; the next is answered 429 with Retry-After (0: no cap)")
    max_concurrent_requests: int = Field(
        default=4096, gt=0, description="Envoy's circuit breakers on the ext_proc and provider clusters: "
                                        "requests in flight through the gateway as a whole")
    request_headers_timeout_seconds: float = Field(
        default=10, gt=0, description="a client must send its request headers within this")
    request_receive_timeout_seconds: float = Field(
        default=60, gt=0, description="a client must send its whole request (headers and body) within this")


class GatewaySection(_Strict):
    max_request_bytes: int = Field(default=4 * 1024 * 1024, gt=0)
    bounds: BoundsSection = BoundsSection()
    limits: LimitsSection = LimitsSection()
    request_timeout_seconds: float = Field(default=600, gt=0, description="longest an LLM request may run")
    lease_grace_seconds: float = Field(
        default=60, gt=0, description="a reservation's lease outlives the request timeout by this much; a lease "
                                      "whose gateway died expires into a charge after request_timeout + this")
    attribution_stream_max_bytes: int = Field(
        default=256 * 1024 * 1024, gt=0,
        description="bytes of attribution records the Redis stream keeps (approximately; oldest trimmed first)")
    attribution_stream_max_age_seconds: int = Field(
        default=3 * 86400, ge=0, description="records older than this leave the Redis stream (0: no age bound)")
    redis_max_connections: int = Field(
        default=512, gt=0, description="pooled Redis connections per ext_proc process for everything but the budget "
                                       "scripts (cache, alerts, admin reads); the scripts share one pipelined "
                                       "connection (docs/operations.md, 'Redis connections')")
    redis_pool_timeout_seconds: float = Field(
        default=1.0, gt=0, le=2.5,
        description="longest a pooled Redis call waits for a connection (inside Envoy's 3 s message timeout)")
    trusted_metadata_sources: list[str] = Field(
        default_factory=list,
        description="identity sources (globs on `source`, e.g. 'service_token', 'jwt:*') whose "
                    "x-tollgate-metadata header is honoured as custom attributes")


class AdminRule(_Strict):
    """Who may use the admin API beyond their own budget status and dry runs: any matching rule grants it."""

    where: dict[str, str | list[str]] = Field(description="identity attribute globs, e.g. {groups: platform-admins}")


class PolicyDoc(_Strict):
    prices: PricesSection
    providers: dict[str, Provider]
    routes: list[Route]
    gateway: GatewaySection = GatewaySection()
    budgets: BudgetList = []
    rate_limits: RateLimitList = []
    access: list[AccessRule] = []
    identity: IdentityConfig = IdentityConfig()
    admin: list[AdminRule] = Field(default_factory=list, description="admin API rules (where-rules; any match grants)")
    alerts: AlertList = Field(default_factory=list, description="webhooks told about budget events (docs/alerts.md)")
    cache: CacheList = Field(default_factory=list, description="response cache rules, first match wins (docs/cache.md)")

    @field_validator("providers")
    @classmethod
    def _names(cls, v: dict[str, Provider]) -> dict[str, Provider]:
        for name in v:
            if not name.replace("-", "").replace("_", "").isalnum():
                raise ValueError(f"provider name {name!r}: letters, digits, '-' and '_' only")
        return v


@dataclass(frozen=True)
class Config:
    """Everything the hot path reads, built once per load; replaced whole, never mutated."""

    doc: PolicyDoc
    prices: PriceTable
    source: Path
    digest: str = ""  # sha256 of the policy files (names and bytes) this was loaded from

    @property
    def providers(self) -> dict[str, Provider]:
        return self.doc.providers

    @property
    def gateway(self) -> GatewaySection:
        return self.doc.gateway

    @functools.cached_property
    def stream_bound(self) -> "StreamBound":
        """Read on every settle: built once per loaded config."""
        from .usage import StreamBound

        g = self.doc.gateway
        return StreamBound(g.attribution_stream_max_bytes, g.attribution_stream_max_age_seconds)

    @functools.cached_property
    def _routes(self) -> dict[tuple[str, str], str | None]:
        return {}

    def route(self, model: str, wire: str) -> str | None:
        """The provider that serves `model` for this wire format, or None: the globs are matched
        once per model name and wire (names come from clients: at most 4,096 are remembered)."""
        cache = self._routes
        key = (model, wire)
        try:
            return cache[key]
        except KeyError:
            pass
        found = None
        for r in self.doc.routes:
            if any(fnmatch.fnmatchcase(model, g) for g in r.models) and wire in self.doc.providers[r.provider].wires:
                found = r.provider
                break
        if len(cache) < 4096:
            cache[key] = found
        return found


def load_config(directory: str | os.PathLike[str]) -> Config:
    """Load and validate every `*.yaml` under `directory`; raise PolicyError listing all problems."""
    root = Path(directory)
    if not root.is_dir():
        raise PolicyError([f"{root}: policy directory not found"])
    merged: dict[str, Any] = {}
    smap = SourceMap(place=str(root))
    problems: list[str] = []
    files = policy_files(root)
    if not files:
        raise PolicyError([f"{root}: no *.yaml policy files"])
    digest = hashlib.sha256()
    for path in files:
        display = str(path)
        try:
            raw = path.read_bytes()  # read once: what is hashed is what is loaded
        except OSError as e:
            problems.append(f"{display}: cannot read: {e.strerror}")
            continue
        digest.update(f"{path.relative_to(root)}\0".encode() + raw + b"\0")
        try:
            data, fmap = load_yaml(path, display, raw)
        except PolicyError as e:
            problems.extend(e.problems)
            continue
        if data is None:
            continue
        if not isinstance(data, dict):
            problems.append(f"{display}:1: a policy file must be a mapping of sections")
            continue
        problems.extend(_merge(merged, data, (), fmap, smap))
        smap.merge(fmap)
    if problems:
        raise PolicyError(problems)
    try:
        doc = PolicyDoc.model_validate(merged)
    except ValidationError as e:
        raise PolicyError(smap.errors(e)) from None
    problems = _cross_check(doc, smap)
    if problems:
        raise PolicyError(problems)
    prices = PriceTable(doc.prices.models, doc.prices.default, doc.prices.tools)
    return Config(doc=doc, prices=prices, source=root, digest=digest.hexdigest())


def policy_files(root: Path) -> list[Path]:
    """The files a policy directory is made of, in load order."""
    return sorted(p for p in root.rglob("*.yaml") if p.is_file())


def _merge(dst: dict[str, Any], src: dict[str, Any], loc: tuple, fmap: SourceMap, smap: SourceMap) -> list[str]:
    """Fold one file into the merged document: mappings merge, lists join, a value set twice is an error.

    So a section can be split across files (one file of budgets per team, service tokens apart
    from API keys), while two files disagreeing about one setting is reported, not resolved.
    """
    problems = []
    for key, value in src.items():
        here = loc + (key,)
        if key not in dst:
            dst[key] = value
        elif isinstance(dst[key], dict) and isinstance(value, dict):
            problems.extend(_merge(dst[key], value, here, fmap, smap))
        elif isinstance(dst[key], list) and isinstance(value, list):
            fmap.shift(here, len(dst[key]))
            dst[key] = dst[key] + value
        else:
            first = smap.lookup(here)
            problems.append(fmap.describe(here, f"already set at {first[0]}:{first[1]}" if first else "set twice"))
    return problems


def _cross_check(doc: PolicyDoc, smap: SourceMap) -> list[str]:
    """Checks that span sections: routes name real providers; every provider's key reads something."""
    problems = []
    for i, r in enumerate(doc.routes):
        if r.provider not in doc.providers:
            problems.append(smap.describe(("routes", i, "provider"), f"unknown provider {r.provider!r}"))
    for name, p in doc.providers.items():
        if p.key is not None and p.key_missing == "error" and p.key.read() is None:
            where = f"env {p.key.env} is unset or empty" if p.key.env else f"file {p.key.file} is unreadable or empty"
            problems.append(smap.describe(("providers", name, "key"), f"provider {name!r} has no key: {where} (set "
                                          "it, or `key_missing: refuse` to start without this provider)"))
    problems.extend(alert_problems(list(doc.alerts), list(doc.budgets), smap))
    return problems
