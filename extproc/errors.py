"""Errors a client sees, in the shape its SDK expects.

Every refusal Tollgate makes (bad body, unknown model, budget hit, missing identity, store down)
is a `GatewayError`; the processor turns it into an Envoy ImmediateResponse whose body is
OpenAI-shaped, or Anthropic-shaped when the request came in on `/v1/messages`.
"""

from __future__ import annotations

from typing import Any, Literal

import orjson

Shape = Literal["openai", "anthropic"]

class GatewayError(Exception):
    """A request Tollgate refuses, with everything needed to answer it."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
        extra: dict[str, Any] | None = None,
        openai_type: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.code = code
        self.param = param
        self.headers = headers or {}
        self.extra = extra or {}
        self.openai_type = openai_type  # where OpenAI's `type` differs from Anthropic's (rate limits: "requests")

    def body(self, shape: Shape) -> bytes:
        """The JSON body in the provider's error shape; `extra` fields sit beside `message`."""
        if shape == "anthropic":
            err: dict[str, Any] = {"type": self.type, "message": self.message}
            if self.code:
                err["code"] = self.code
            err.update(self.extra)
            return orjson.dumps({"type": "error", "error": err})
        err = {"message": self.message, "type": self.openai_type or self.type, "param": self.param, "code": self.code}
        err.update(self.extra)
        return orjson.dumps({"error": err})


def bad_request(message: str, *, code: str, param: str | None = None) -> GatewayError:
    return GatewayError(400, message, type="invalid_request_error", code=code, param=param)
