"""Wire formats Tollgate understands, looked up by request path."""

from __future__ import annotations

from .anthropic import Messages
from .base import Api, ParsedRequest, StreamState
from .openai import ChatCompletions, Embeddings, Responses
from .sse import SSEParser

# Path (without query string) -> the API it speaks. Anything else is refused with a 404.
APIS: dict[str, Api] = {
    "/v1/chat/completions": ChatCompletions(),
    "/v1/responses": Responses(),
    "/v1/embeddings": Embeddings(),
    "/v1/messages": Messages(),
}


def api_for_path(path: str) -> Api | None:
    return APIS.get(path.split("?", 1)[0])


__all__ = ["APIS", "Api", "ParsedRequest", "SSEParser", "StreamState", "api_for_path"]
