"""A lease's meta from its template (extproc/usage.py `LeaseMetaTemplate`, record.py `lease_meta_of`)
is byte for byte what encoding the lease's whole record gives (`lease_meta(lease_record(...))`),
whatever differs between the requests that share a template, and whatever the identity holds; and
the rollup keys that lease metas and settles keep per day are only ever a UTC day's."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest

from extproc.config import load_config
from extproc.identity.model import Identity
from extproc.lifecycle import record as rec
from extproc.lifecycle.context import RequestContext
from extproc.providers import api_for_path
from extproc.usage import lease_meta

REPO = Path(__file__).resolve().parent.parent
_TS = itertools.cycle(["2026-12-03T10:00:00.123+00:00", "2026-12-03T23:59:59.999+00:00",
                       "2026-12-04T00:00:00.000+00:00"])


@pytest.fixture
def fixed_ts(monkeypatch: pytest.MonkeyPatch) -> None:
    """Both ways read the clock once per lease: a fixed `ts` gives both the same."""
    monkeypatch.setattr(rec, "now_ts", lambda ts=next(_TS): ts)


def _ctx(config, identity, *, path="/v1/chat/completions", model="gpt-4o-mini", metadata=None,
         envoy_id="e-1", client_id="", cache="off"):
    ctx = RequestContext(config)
    ctx.identity, ctx.path, ctx.envoy_request_id, ctx.client_request_id = identity, path, envoy_id, client_id
    ctx.metadata = metadata or {}
    ctx.cache = cache
    ctx.api = api_for_path(path)
    assert ctx.api is not None
    ctx.req = ctx.api.parse(json.dumps({"model": model, "max_tokens": 16,
                                        "messages": [{"role": "user", "content": "hi"}]}).encode(),
                            config.gateway.bounds)
    return ctx


IDENTITIES = [
    Identity(user="ana", email="ana@example.com", groups=("eng", "ml"), team="platform", source="api_key:ana"),
    Identity(user="bot \u00e9\u6f22", groups=(), team=None, app="ci", service_token="ci-runner", source="service_token"),
    # values that look like JSON or like the template's markers must stay values
    Identity(user='q"uote\\\u001ftollgate-varying-x:ts', team="\u001f", source="jwt:idp"),
]


@pytest.mark.parametrize("identity", IDENTITIES, ids=["api_key", "service_token", "awkward"])
def test_template_equals_the_whole_record_encoded(fixed_ts, identity, monkeypatch):
    config = load_config(REPO / "policies")
    varied = [
        {},
        {"metadata": {"job": "nightly", "tags": ["a", "b"]}, "envoy_id": "e-2", "client_id": "client-9"},
        {"metadata": {"k": "v\u00fc\""}, "envoy_id": "", "client_id": ""},
        {"cache": "miss"},
        {"model": "gpt-4o"},
    ]
    for i, kw in enumerate(varied * 2):  # the second round is served from the templates
        ctx = _ctx(config, identity, **kw)
        for model, provider, budgets, reserved in (("gpt-4o-mini", "openai", ["team-monthly", "user-daily"], 123_456),
                                                   ("gpt-4o-mini", "openai", ["team-monthly", "user-daily"], 7),
                                                   ("claude-haiku", "anthropic", [], 10**15 + 1)):
            whole = lease_meta(rec.lease_record(ctx, model=model, provider=provider, budgets=budgets,
                                                reserved_nusd=reserved), bound=config.stream_bound)
            assert rec.lease_meta_of(ctx, model=model, provider=provider, budgets=budgets,
                                     reserved_nusd=reserved) == whole, (i, kw, model)
        monkeypatch.setattr(rec, "now_ts", lambda ts=next(_TS): ts)  # another day, another usage key


def test_a_policy_reload_gets_its_own_template(fixed_ts):
    """Another config object (a reload) is another template, even for the same identity and model."""
    a, b = load_config(REPO / "policies"), load_config(REPO / "policies")
    ident = IDENTITIES[0]
    for config in (a, b, a):
        ctx = _ctx(config, ident)
        kw = {"model": "gpt-4o-mini", "provider": "openai", "budgets": ["x"], "reserved_nusd": 5}
        whole = lease_meta(rec.lease_record(ctx, **kw), bound=config.stream_bound)
        assert rec.lease_meta_of(ctx, **kw) == whole
    assert sum(1 for k in rec._LEASE_TEMPLATES if k[1] in (id(a), id(b))) == 2


def test_the_day_keys_kept_per_day_never_serve_another_offsets_day():
    """Both keep a day's keys by the ts's first ten characters, which is the day only for a UTC
    time: a record stamped 23:00 at -05:00 belongs to the next UTC day, cached day or not."""
    from extproc.usage import LeaseMetaTemplate, usage_write

    base = {"ts": "2026-12-03T10:00:00.000+00:00", "user": "u", "model_served": "m", "input_tokens": 1}
    late = {**base, "ts": "2026-12-03T23:00:00.000-05:00"}
    for _ in range(2):  # the second round reads what the first one kept
        assert usage_write(base).usage_key == "tollgate:usage:2026-12-03"
        assert usage_write(late).usage_key == "tollgate:usage:2026-12-04"
    t = LeaseMetaTemplate(base, ("ts",))
    for _ in range(2):
        assert t.render({"ts": base["ts"]}).startswith(b"tollgate:usage:2026-12-03\n")
        assert t.render({"ts": late["ts"]}).startswith(b"tollgate:usage:2026-12-04\n")
        assert t.render({"ts": late["ts"]}) == lease_meta(late)
