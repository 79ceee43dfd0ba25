"""The OpenAI wire format `dopd serve` speaks: request bodies (pydantic), response bodies, the error JSON.

Why pydantic and our own parse step instead of FastAPI's body parameters: every bad request must come back as the
OpenAI error object `{"error": {"message", "type", "param", "code"}}` with a 4xx that names the problem (a client
library shows `message`), not as FastAPI's 422 validation list; and the body-size limit must be checked before the
body is parsed at all.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError


class ApiError(Exception):
    """A request the server refuses: the HTTP status and the OpenAI error fields."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Sampling(BaseModel):
    """Fields both endpoints share. Unknown fields are accepted and ignored, as OpenAI-compatible servers do."""

    model_config = ConfigDict(extra="allow")

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1, le=1)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    seed: int | None = None
    # dopd: false = this request's tokens are not learned from (`dopd serve --learn`); also header `X-Dopd-Learn: 0`
    dopd_learn: bool = True

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop)
        if len(stops) > 4:
            raise ApiError(400, f"at most 4 stop sequences are allowed (got {len(stops)})", param="stop")
        return [s for s in stops if s]

    def token_budget(self, default: int) -> int:
        return self.max_completion_tokens or self.max_tokens or default


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int]
    echo: bool = False

    def prompt_input(self) -> str | list[int]:
        p = self.prompt
        if isinstance(p, list) and p and isinstance(p[0], str):
            if len(p) != 1:
                raise ApiError(
                    400, "one prompt per request (a list of several prompts is not supported)", param="prompt"
                )
            return p[0]
        return p  # type: ignore[return-value]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:
            if part.get("type") != "text":
                raise ApiError(
                    400, f"only text content parts are supported (got '{part.get('type')}')", param="messages"
                )
            parts.append(str(part.get("text", "")))
        return "".join(parts)


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)


def parse(body: bytes, model: type[BaseModel]) -> Any:
    """Parse a request body, turning every failure into the OpenAI error of the first problem found."""
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from e
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object", code="invalid_json")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        param = ".".join(str(x) for x in err["loc"]) or None
        raise ApiError(400, f"invalid '{param}': {err['msg']}", param=param, code="invalid_value") from e


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int

    def dict(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        }


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def completion_body(rid: str, model: str, text: str, finish: str | None, usage: Usage | None, chat: bool,
                    chunk: bool = False) -> dict[str, Any]:  # fmt: skip
    """One response (or one streamed chunk) of /v1/completions or /v1/chat/completions."""
    if chat:
        obj = "chat.completion.chunk" if chunk else "chat.completion"
        key = "delta" if chunk else "message"
        choice = {"index": 0, key: {"role": "assistant", "content": text}, "finish_reason": finish}
        if not chunk:
            choice["logprobs"] = None
    else:
        obj = "text_completion"
        choice = {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
    out: dict[str, Any] = {"id": rid, "object": obj, "created": int(time.time()), "model": model, "choices": [choice]}
    if usage is not None:
        out["usage"] = usage.dict()
    return out


def usage_chunk(rid: str, model: str, usage: Usage, chat: bool) -> dict[str, Any]:
    """The last streamed chunk when `stream_options.include_usage`: no choices, the usage counts."""
    obj = "chat.completion.chunk" if chat else "text_completion"
    return {"id": rid, "object": obj, "created": int(time.time()), "model": model, "choices": [], "usage": usage.dict()}


def sse(data: dict[str, Any] | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"
