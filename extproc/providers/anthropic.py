"""Anthropic's Messages API (`/v1/messages`), JSON and SSE."""

from __future__ import annotations

from typing import Any

import orjson

from ..pricing import Usage
from .base import Api, StreamState, as_int, count_delta, json_object


class Messages(Api):
    name = "anthropic.messages"
    shape = "anthropic"
    wire = "anthropic"
    cap_fields = ("max_tokens",)

    def stream_error_event(self, err: dict[str, Any]) -> bytes:
        # Anthropic's mid-stream error event; its SDK raises on `event: error`.
        body = {"type": "error", "error": {"type": err.get("type"), "message": err.get("message")}}
        return b"event: error\ndata: " + orjson.dumps(body) + b"\n\n"

    def usage_from_json(self, obj: dict[str, Any]) -> Usage | None:
        u = obj.get("usage")
        if not isinstance(u, dict):
            return None
        return Usage(
            input_tokens=as_int(u.get("input_tokens")),
            cached_input_tokens=as_int(u.get("cache_read_input_tokens")),
            cache_write_tokens=as_int(u.get("cache_creation_input_tokens")),
            output_tokens=as_int(u.get("output_tokens")),
        )

    def on_event(self, state: StreamState, event: str, data: bytes) -> None:
        obj = json_object(data)
        if obj is None:
            return
        kind = obj.get("type") or event
        if kind == "content_block_delta":
            d = obj.get("delta")
            if isinstance(d, dict):  # text_delta, input_json_delta, thinking_delta (signatures are not output)
                text = d.get("text", d.get("partial_json", d.get("thinking")))
                if d.get("type") != "signature_delta":
                    count_delta(state, text)
        elif kind == "message_start":
            msg = obj.get("message")
            if isinstance(msg, dict):
                if isinstance(msg.get("model"), str):
                    state.served_model = msg["model"]
                state.usage = self.usage_from_json(msg) or Usage()
        elif kind == "message_delta":
            # message_delta's usage is cumulative; newer API versions repeat the input counts too.
            u = obj.get("usage")
            if isinstance(u, dict):
                usage = state.usage or Usage()
                usage.output_tokens = max(usage.output_tokens, as_int(u.get("output_tokens")))
                usage.input_tokens = max(usage.input_tokens, as_int(u.get("input_tokens")))
                usage.cached_input_tokens = max(usage.cached_input_tokens, as_int(u.get("cache_read_input_tokens")))
                usage.cache_write_tokens = max(usage.cache_write_tokens, as_int(u.get("cache_creation_input_tokens")))
                state.usage, state.usage_final = usage, True
        elif kind == "message_stop":
            state.done = True
        elif kind == "error":
            state.error = obj.get("error") if isinstance(obj.get("error"), dict) else obj
