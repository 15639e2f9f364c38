"""OpenAI wire formats: chat completions, responses, embeddings.

Also what every OpenAI-compatible provider speaks (Gemini's OpenAI endpoint, Workers AI, vLLM,
Ollama), so these parsers serve them too.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import orjson

from ..pricing import STANDARD_TIER, ImageGenUsage, Usage
from .base import Api, StreamState, as_int, count_delta, json_object, openai_usage

if TYPE_CHECKING:
    from ..config import BoundsSection as Bounds


def _tier(v: Any) -> str | None:
    """An OpenAI `service_tier` as the price table names rate tiers: `default` is the row's own
    rates; `fast` is `priority` (OpenAI renamed it: a response says `priority` for either);
    `auto` and anything unknown say nothing."""
    if not isinstance(v, str) or v == "auto" or not v:
        return None
    return _TIER_NAMES.get(v, v)


_TIER_NAMES = {"default": STANDARD_TIER, "fast": "priority"}


def _requested_tier(body: dict[str, Any], bounds: "Bounds") -> str:
    """The tier the request will be billed at: its own `service_tier`, else (unset or `auto`) the
    project's default, which the policy states (`gateway.bounds.default_service_tier`)."""
    return _tier(body.get("service_tier")) or (_tier(bounds.default_service_tier) or STANDARD_TIER)


class ChatCompletions(Api):
    name = "openai.chat"
    cap_fields = ("max_completion_tokens", "max_tokens")
    choices_field = "n"

    def server_tools(self, body: dict[str, Any], default_calls: int) -> dict[str, int]:
        """The search models' `web_search_options` searches the web on the provider's side."""
        return {"web_search": default_calls} if body.get("web_search_options") is not None else {}

    def rate_modifiers(self, body: dict[str, Any], bounds: "Bounds") -> tuple[str | None, str | None]:
        return _requested_tier(body, bounds), None

    def prepare_stream(self, body: dict[str, Any]) -> bool:
        """Ask for the final usage chunk: without it a streamed response cannot be priced."""
        opts = body.get("stream_options")
        if isinstance(opts, dict) and opts.get("include_usage") is True:
            return False
        body["stream_options"] = {**(opts if isinstance(opts, dict) else {}), "include_usage": True}
        return True

    def usage_from_json(self, obj: dict[str, Any]) -> Usage | None:
        """The usage, at the rate tier the response says served it (`service_tier`)."""
        usage = openai_usage(obj.get("usage"), "prompt_tokens", "completion_tokens")
        if usage is not None:
            usage.tier = _tier(obj.get("service_tier"))
        return usage

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
        if isinstance(obj.get("service_tier"), str):
            state.extra["service_tier"] = obj["service_tier"]
        usage = self.usage_from_json(obj)
        if usage is not None:
            usage.tier = usage.tier or _tier(state.extra.get("service_tier"))
            state.usage, state.usage_final = usage, True


# Responses output items that carry a per-call fee, by the tool kind the price table names.
_TOOL_ITEMS = {"web_search_call": "web_search", "file_search_call": "file_search",
               "code_interpreter_call": "code_interpreter", "image_generation_call": "image_generation"}


def _tool_kind(tool: dict[str, Any]) -> str | None:
    tool_type = str(tool.get("type") or "")
    for prefix, kind in (("web_search", "web_search"), ("file_search", "file_search"),
                         ("code_interpreter", "code_interpreter"), ("image_generation", "image_generation")):
        if tool_type.startswith(prefix):
            return kind
    if tool_type == "shell":  # hosted (a container); a `local` environment runs on the client, free
        env = tool.get("environment")
        return "shell" if isinstance(env, dict) and env.get("type") in ("container_auto", "container_reference") else None
    return None


DEFAULT_IMAGE_MODEL = "gpt-image-2.6-sunburst"
"""The image generation tool's model when the request names none (openai SDK, tool.ImageGeneration)."""

# When a response carries image_generation_call items but no `tool_usage.image_gen` (the API may
# omit it), each image is charged the output tokens gpt-image-1 bills for its quality and size
# (OpenAI's image generation guide, "Cost and latency"); unknown ones at the largest listed.
_IMAGE_OUTPUT_TOKENS = {("low", "1024x1024"): 272, ("low", "1024x1536"): 408, ("low", "1536x1024"): 400,
                        ("medium", "1024x1024"): 1056, ("medium", "1024x1536"): 1584, ("medium", "1536x1024"): 1568,
                        ("high", "1024x1024"): 4160, ("high", "1024x1536"): 6240, ("high", "1536x1024"): 6208}
_IMAGE_OUTPUT_TOKENS_MAX = max(_IMAGE_OUTPUT_TOKENS.values())


def _image_model(obj: dict[str, Any]) -> str:
    """The image model the response's (or request's) image_generation tool names."""
    for t in obj.get("tools") or ():
        if isinstance(t, dict) and t.get("type") == "image_generation" and isinstance(t.get("model"), str) and t["model"]:
            return t["model"]
    return DEFAULT_IMAGE_MODEL


def _image_gen(obj: dict[str, Any], items: list[dict[str, Any]]) -> ImageGenUsage | None:
    """`tool_usage.image_gen` as billed tokens (cached reads are inside the input counts, as
    everywhere in OpenAI's usage, and taken out); an omitted cache count is unknown, so billed as
    uncached; output without a breakdown is image output. Without `image_gen`, the images the
    response carries are charged by quality and size (_IMAGE_OUTPUT_TOKENS)."""
    tool_usage = obj.get("tool_usage")
    ig = tool_usage.get("image_gen") if isinstance(tool_usage, dict) else None
    model = _image_model(obj)
    if not isinstance(ig, dict):
        if not items:
            return None
        out = sum(_IMAGE_OUTPUT_TOKENS.get((str(i.get("quality")), str(i.get("size"))), _IMAGE_OUTPUT_TOKENS_MAX)
                  for i in items)
        return ImageGenUsage(model=model, image_output_tokens=out)
    total_in, total_out = as_int(ig.get("input_tokens")), as_int(ig.get("output_tokens"))
    if not (total_in or total_out):
        return None
    d_in = ig.get("input_tokens_details") if isinstance(ig.get("input_tokens_details"), dict) else {}
    image_in = min(as_int(d_in.get("image_tokens")), total_in)
    text_in = total_in - image_in  # what is not image input is text
    d_cached = ig.get("cached_tokens_details") if isinstance(ig.get("cached_tokens_details"), dict) else {}
    cached_image = min(as_int(d_cached.get("cached_image_tokens")), image_in)
    cached_text = min(as_int(d_cached.get("cached_text_tokens")), text_in)
    d_out = ig.get("output_tokens_details") if isinstance(ig.get("output_tokens_details"), dict) else {}
    text_out = min(as_int(d_out.get("text_tokens")), total_out)
    return ImageGenUsage(model=model, text_input_tokens=text_in - cached_text, image_input_tokens=image_in - cached_image,
                         cached_text_input_tokens=cached_text, cached_image_input_tokens=cached_image,
                         image_output_tokens=total_out - text_out, text_output_tokens=text_out)


class Responses(Api):
    name = "openai.responses"
    cap_fields = ("max_output_tokens",)

    def server_tools(self, body: dict[str, Any], default_calls: int) -> dict[str, int]:
        """Built-in tools (web_search*, file_search, code_interpreter, image_generation, a hosted
        shell); the request's `max_tool_calls` caps all built-in calls together."""
        kinds = {kind for t in body.get("tools") or () if isinstance(t, dict) and (kind := _tool_kind(t)) is not None}
        limit = self._max_tool_calls(body)
        calls = default_calls if limit is None else limit
        return {k: calls for k in sorted(kinds)}

    @staticmethod
    def _max_tool_calls(body: dict[str, Any]) -> int | None:
        limit = body.get("max_tool_calls")
        return limit if isinstance(limit, int) and not isinstance(limit, bool) and limit >= 0 else None

    def tool_calls_capped(self, body: dict[str, Any]) -> bool:
        return self._max_tool_calls(body) is not None

    def advisors(self, body: dict[str, Any], bounds: "Bounds") -> list[tuple[str, int, int | None]]:
        """An image generation tool runs its image model (`model`, else the API's default) once
        per image, up to `max_tool_calls` (else `server_tool_calls`) images of
        `image_output_tokens` each."""
        for t in body.get("tools") or ():
            if isinstance(t, dict) and t.get("type") == "image_generation":
                limit = self._max_tool_calls(body)
                return [(_image_model({"tools": [t]}), bounds.server_tool_calls if limit is None else limit,
                         bounds.image_output_tokens)]
        return []

    def rate_modifiers(self, body: dict[str, Any], bounds: "Bounds") -> tuple[str | None, str | None]:
        return _requested_tier(body, bounds), None

    def unbounded(self, body: dict[str, Any], bounds: "Bounds") -> list[str]:
        if any(isinstance(t, dict) and t.get("type") == "image_generation" for t in body.get("tools") or ()):
            return [f"image generation (gateway.bounds.image_output_tokens: {bounds.image_output_tokens} per image)"]
        return []

    def stateful(self, body: dict[str, Any]) -> bool:
        return bool(body.get("previous_response_id") or body.get("conversation"))

    def usage_from_json(self, obj: dict[str, Any]) -> Usage | None:
        """A response object's usage at the rate tier it says (`service_tier`), plus its server
        tool calls (one fee per output item; containers once per session, whichever tool used
        them), image generation tokens and SVG authoring (at the SVG model's rates)."""
        usage = openai_usage(obj.get("usage"), "input_tokens", "output_tokens")
        if usage is None:
            return None
        usage.tier = _tier(obj.get("service_tier"))
        containers: set[str] = set()
        images: list[dict[str, Any]] = []
        for item in obj.get("output") or ():
            if not isinstance(item, dict):
                continue
            kind = _TOOL_ITEMS.get(item.get("type"))
            if item.get("type") == "shell_call":  # a hosted shell runs in a container; a local one is free
                env = item.get("environment")
                cid = env.get("container_id") if isinstance(env, dict) and env.get("type") == "container_reference" else None
                kind = "shell" if isinstance(cid, str) and cid and cid not in containers else None
                if kind is not None:
                    containers.add(cid)
            if kind == "code_interpreter":  # billed per container session, not per call
                cid = item.get("container_id")
                if isinstance(cid, str) and cid:
                    if cid in containers:
                        continue
                    containers.add(cid)
            if kind == "image_generation":
                images.append(item)
                svg = item.get("svg_usage")
                if isinstance(svg, dict) and isinstance(svg.get("model"), str) and svg["model"]:
                    out = as_int(svg.get("output_tokens"))
                    usage.other_models.append((svg["model"], Usage(
                        input_tokens=as_int(svg.get("input_tokens")), output_tokens=out,
                        reasoning_tokens=min(as_int(svg.get("reasoning_tokens")), out), tier=STANDARD_TIER)))
            if kind is not None:
                usage.tool_calls[kind] = usage.tool_calls.get(kind, 0) + 1
        ig = _image_gen(obj, images)
        if ig is not None:
            usage.image_gen.append(ig)
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
