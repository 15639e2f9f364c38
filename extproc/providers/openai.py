"""OpenAI wire formats: chat completions, responses, embeddings.

Also what every OpenAI-compatible provider speaks (Gemini's OpenAI endpoint, Workers AI, vLLM,
Ollama), so these parsers serve them too.
"""

from __future__ import annotations

from typing import Any

import orjson

from ..pricing import Usage
from .base import Api, StreamState, as_int, count_delta, json_object, openai_usage


class ChatCompletions(Api):
    name = "openai.chat"
    cap_fields = ("max_completion_tokens", "max_tokens")
    choices_field = "n"

    def server_tools(self, body: dict[str, Any], default_calls: int) -> dict[str, int]:
        """The search models' `web_search_options` searches the web on the provider's side."""
        return {"web_search": default_calls} if body.get("web_search_options") is not None else {}

    def prepare_stream(self, body: dict[str, Any]) -> bool:
        """Ask for the final usage chunk: without it a streamed response cannot be priced."""
        opts = body.get("stream_options")
        if isinstance(opts, dict) and opts.get("include_usage") is True:
            return False
        body["stream_options"] = {**(opts if isinstance(opts, dict) else {}), "include_usage": True}
        return True

    def usage_from_json(self, obj: dict[str, Any]) -> Usage | None:
        return openai_usage(obj.get("usage"), "prompt_tokens", "completion_tokens")

    def on_event(self, state: StreamState, event: str, data: bytes) -> None:
        if data == b"[DONE]":
            state.done = True
            return
        obj = json_object(data)
        if obj is None:
            return
        if not state.served_model and isinstance(obj.get("model"), str):
            state.served_model = obj["model"] or None  # Azure's first chunk says "": keep looking
        if "error" in obj:
            state.error = obj["error"] if isinstance(obj["error"], dict) else {"message": str(obj["error"])}
        for choice in obj.get("choices") or ():
            delta = choice.get("delta") if isinstance(choice, dict) else None
            if isinstance(delta, dict) and (delta.get("content") or delta.get("tool_calls") or delta.get("refusal")):
                count_delta(state, _delta_text(delta))
        usage = self.usage_from_json(obj)
        if usage is not None:
            state.usage, state.usage_final = usage, True


# Responses output items that carry a per-call fee, by the tool kind the price table names.
_TOOL_ITEMS = {"web_search_call": "web_search", "file_search_call": "file_search",
               "code_interpreter_call": "code_interpreter", "image_generation_call": "image_generation"}


def _tool_kind(tool_type: str) -> str | None:
    for prefix, kind in (("web_search", "web_search"), ("file_search", "file_search"),
                         ("code_interpreter", "code_interpreter"), ("image_generation", "image_generation")):
        if tool_type.startswith(prefix):
            return kind
    return None


class Responses(Api):
    name = "openai.responses"
    cap_fields = ("max_output_tokens",)

    def server_tools(self, body: dict[str, Any], default_calls: int) -> dict[str, int]:
        """Built-in tools (web_search*, file_search, code_interpreter, image_generation); the
        request's `max_tool_calls` caps all built-in calls together."""
        kinds = {kind for t in body.get("tools") or () if isinstance(t, dict)
                 and (kind := _tool_kind(str(t.get("type") or ""))) is not None}
        limit = body.get("max_tool_calls")
        calls = limit if isinstance(limit, int) and not isinstance(limit, bool) and limit >= 0 else default_calls
        return {k: calls for k in sorted(kinds)}

    def stateful(self, body: dict[str, Any]) -> bool:
        return bool(body.get("previous_response_id") or body.get("conversation"))

    def usage_from_json(self, obj: dict[str, Any]) -> Usage | None:
        """A response object's usage, plus its server tool calls (one fee per output item)."""
        usage = openai_usage(obj.get("usage"), "input_tokens", "output_tokens")
        if usage is None:
            return None
        containers: set[str] = set()
        for item in obj.get("output") or ():
            kind = _TOOL_ITEMS.get(item.get("type")) if isinstance(item, dict) else None
            if kind == "code_interpreter":  # billed per container session, not per call
                cid = item.get("container_id")
                if isinstance(cid, str) and cid:
                    if cid in containers:
                        continue
                    containers.add(cid)
            if kind is not None:
                usage.tool_calls[kind] = usage.tool_calls.get(kind, 0) + 1
        # `tool_usage.web_search.num_requests` counts the billable searches (page visits and
        # discounted searches excluded); the call items count every action.
        tool_usage = obj.get("tool_usage")
        web = tool_usage.get("web_search") if isinstance(tool_usage, dict) else None
        if isinstance(web, dict) and isinstance(web.get("num_requests"), int):
            usage.tool_calls["web_search"] = as_int(web["num_requests"])
            if not usage.tool_calls["web_search"]:
                del usage.tool_calls["web_search"]
        return usage

    def on_event(self, state: StreamState, event: str, data: bytes) -> None:
        obj = json_object(data)
        if obj is None:
            return
        kind = obj.get("type") or event
        if kind == "response.output_text.delta" or kind.endswith(".delta"):
            count_delta(state, obj.get("delta"))
            return
        resp = obj.get("response")
        if isinstance(resp, dict):
            if isinstance(resp.get("model"), str) and resp["model"]:
                state.served_model = resp["model"]
            if kind in ("response.completed", "response.incomplete", "response.failed"):
                state.done = True
                usage = self.usage_from_json(resp)
                if usage is None and kind == "response.failed" and "usage" in resp:
                    usage = Usage()  # failed with `usage: null`: the provider bills nothing
                if usage is not None:
                    state.usage, state.usage_final = usage, True
                if kind == "response.failed" and isinstance(resp.get("error"), dict):
                    state.error = resp["error"]
        if kind == "error":
            state.error = obj


    def stream_error_event(self, err: dict[str, Any]) -> bytes:
        # Responses streams end with typed events and no [DONE]: an `error` event (its own shape:
        # type/code/message at the top), with the `error` object OpenAI's SDK raises APIError on.
        body = {"type": "error", "code": err.get("code"), "message": err.get("message"), "param": None,
                "error": {"param": None, **err}}
        return b"event: error\ndata: " + orjson.dumps(body) + b"\n\n"


def _delta_text(delta: dict[str, Any]) -> str:
    """The text a chat delta adds: content, refusal, and tool-call names and arguments."""
    parts = [delta.get("content"), delta.get("refusal")]
    for call in delta.get("tool_calls") or ():
        fn = call.get("function") if isinstance(call, dict) else None
        if isinstance(fn, dict):
            parts += [fn.get("name"), fn.get("arguments")]
    return "".join(p for p in parts if isinstance(p, str))


class Embeddings(Api):
    name = "openai.embeddings"
    has_output = False

    def usage_from_json(self, obj: dict[str, Any]) -> Usage | None:
        u = obj.get("usage")
        if not isinstance(u, dict):
            return None
        return Usage(input_tokens=as_int(u.get("prompt_tokens")))

    def on_event(self, state: StreamState, event: str, data: bytes) -> None:
        return None
