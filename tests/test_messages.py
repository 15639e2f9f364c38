"""The ext_proc answers extproc/messages.py writes in place: every phase answer names its phase and
carries its CommonResponse even when only metadata changes (Envoy reads an answer without it as
the wrong phase and fails the request), values go in `raw_value`, and metadata lands under `tollgate`."""

from __future__ import annotations

from envoy.config.core.v3.base_pb2 import HeaderValueOption
from envoy.extensions.filters.http.ext_proc.v3.processing_mode_pb2 import ProcessingMode

from extproc import messages as msg

META = {"provider": "fake", "cost_usd": 0.25, "input_tokens": 9, "complete": True, "client_request_id": None,
        "groups": ["a", "b"]}


def _meta(pr) -> dict:
    return {k: v for k, v in pr.dynamic_metadata.fields["tollgate"].struct_value.items()}


def test_unchanged_answers_are_the_shared_continues() -> None:
    assert msg.request_headers() is msg.request_headers([])
    assert msg.request_body() is msg.request_body(None, [], None)
    assert msg.response_headers() is msg.response_headers({}, [])
    assert msg.response_body() is msg.response_body({})
    for pr, phase in ((msg.request_headers(), "request_headers"), (msg.request_body(), "request_body"),
                      (msg.response_headers(), "response_headers"), (msg.response_body(), "response_body")):
        assert pr.WhichOneof("response") == phase
        assert getattr(pr, phase).HasField("response")


def test_metadata_only_answers_still_carry_their_phase_response() -> None:
    for pr, phase in ((msg.request_body(meta=META), "request_body"), (msg.response_body(meta=META), "response_body")):
        assert pr.WhichOneof("response") == phase
        assert getattr(pr, phase).HasField("response")
        assert _meta(pr) == {"provider": "fake", "cost_usd": 0.25, "input_tokens": 9.0, "complete": True,
                             "groups": ["a", "b"]}  # None is left out


def test_request_body_answer_parts() -> None:
    pr = msg.request_body({"x-tollgate-upstream": "fake", "content-length": "2"}, ["x-api-key"], b"{}",
                          clear_route_cache=True, meta={"decision": "allowed"})
    c = pr.request_body.response
    assert c.clear_route_cache and c.body_mutation.body == b"{}"
    sets = [(h.header.key, h.header.raw_value, h.header.value, h.append_action) for h in c.header_mutation.set_headers]
    assert sets == [("x-tollgate-upstream", b"fake", "", HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD),
                    ("content-length", b"2", "", HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD)]
    assert list(c.header_mutation.remove_headers) == ["x-api-key"]
    assert _meta(pr) == {"decision": "allowed"}


def test_response_answers() -> None:
    pr = msg.response_headers({"x-tollgate-request-id": "r1"}, ["x-tollgate-gateway-error"], msg.STREAMED_RESPONSE)
    assert pr.mode_override.response_body_mode == ProcessingMode.STREAMED
    assert [h.header.key for h in pr.response_headers.response.header_mutation.set_headers] == ["x-tollgate-request-id"]
    assert list(pr.response_headers.response.header_mutation.remove_headers) == ["x-tollgate-gateway-error"]
    only_mode = msg.response_headers(mode=msg.STREAMED_RESPONSE)
    assert only_mode.response_headers.HasField("response") and only_mode.HasField("mode_override")
    cut = msg.response_body(clear_body=True)
    assert cut.response_body.response.body_mutation.clear_body
    tail = msg.response_body(body=b"data: x\n\n", meta={"status": 200})
    assert tail.response_body.response.body_mutation.body == b"data: x\n\n" and _meta(tail) == {"status": 200.0}


def test_templates_copy_and_never_share_an_answer() -> None:
    built = []

    def build() -> "msg.ProcessingResponse":
        built.append(1)
        return msg.request_body({"x-tollgate-upstream": "fake"}, ["x-api-key"], clear_route_cache=True,
                                meta={"user": "u1"})

    t = msg.Templates(max_entries=2)
    owner = object()
    a = t.get(("k",), owner, build)
    msg.set_meta_strings(a, {"request_id": "r1", "client_request_id": None})
    msg.add_headers(a.request_body.response.header_mutation, {"x-extra": "1"})
    b = t.get(("k",), owner, build)
    assert len(built) == 1  # built once, copied twice
    assert _meta(a) == {"user": "u1", "request_id": "r1"} and _meta(b) == {"user": "u1"}
    assert [h.header.key for h in b.request_body.response.header_mutation.set_headers] == ["x-tollgate-upstream"]
    assert b == build() and b.request_body.response.clear_route_cache
    # An entry is only ever given to the owner it was built for (a key holding a recycled id is rebuilt).
    t.get(("k",), object(), build)
    assert len(built) == 3
    for i in range(3):  # past max_entries: starts over instead of growing
        t.get((i,), owner, build)
    assert len(t._entries) <= 2


def test_record_ts_is_isoformat_in_milliseconds() -> None:
    import re
    from datetime import datetime, timezone

    from extproc.lifecycle.record import now_ts

    before = datetime.now(timezone.utc).isoformat(timespec="milliseconds")
    ts = now_ts()
    after = datetime.now(timezone.utc).isoformat(timespec="milliseconds")
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00", ts)
    assert before <= ts <= after
