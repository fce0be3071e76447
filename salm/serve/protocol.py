"""Request and response bodies, mirroring the OpenAI API (completions and chat completions).

Fields saLM does not implement are accepted only at their no-op values (``n=1``, ``echo=false``, zero
penalties) so a client relying on them gets a 400 naming the field instead of a silently different answer.
Unknown fields are ignored, as most OpenAI-compatible servers do. saLM's own fields: ``routing``
(``argmax`` | ``mixture`` | ``threshold:<p>`` | ``member:<id>``), ``top_k`` and ``attribution`` (return, per
token, the member that emitted it and every member's routing probability).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from salm.generation import SEED_LIMIT

_NO_OPS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "n": (lambda v: v == 1, "only n=1 is supported; send one request per completion"),
    "presence_penalty": (lambda v: v == 0, "penalties are not supported; leave it at 0"),
    "frequency_penalty": (lambda v: v == 0, "penalties are not supported; leave it at 0"),
    "logit_bias": (lambda v: not v, "logit_bias is not supported"),
    "echo": (lambda v: not v, "echo is not supported"),
    "best_of": (lambda v: v in (None, 1), "only best_of=1 is supported"),
    "suffix": (lambda v: not v, "suffix (insertion) is not supported"),
}
"""OpenAI fields saLM accepts only at their no-op value: (is it the no-op?, the error naming what to do)."""

SEED_MIN, SEED_MAX = 0, SEED_LIMIT - 1
"""The seeds accepted: saLM's one seed range (:data:`salm.generation.SEED_LIMIT`). OpenAI sets no range; a
seed outside it is a 400 naming ``seed`` here, before the request reaches the engine."""


def _no_op_only(v: Any, info: ValidationInfo) -> Any:
    ok, message = _NO_OPS[info.field_name]
    if not ok(v):
        raise ValueError(message)
    return v


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=SEED_MIN, le=SEED_MAX)
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    routing: str = "argmax"
    attribution: bool = False

    @field_validator("n", "presence_penalty", "frequency_penalty", "logit_bias")
    @classmethod
    def _request_no_ops(cls, v: Any, info: ValidationInfo) -> Any:
        return _no_op_only(v, info)

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: str | list[str] | None) -> list[str]:
        stops = [v] if isinstance(v, str) else list(v or [])
        if len(stops) > 4:
            raise ValueError(f"at most 4 stop sequences, got {len(stops)}")
        if any(not s for s in stops):
            raise ValueError("stop sequences must be non-empty strings")
        return stops

    @property
    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


class CompletionRequest(_Request):
    prompt: str | list[str]
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=20)
    best_of: int | None = None
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v: str | list[str]) -> str:
        if isinstance(v, list):
            if len(v) != 1:
                raise ValueError(f"exactly one prompt per request is supported, got a list of {len(v)}")
            v = v[0]
        return v

    @field_validator("echo", "best_of", "suffix")
    @classmethod
    def _completion_no_ops(cls, v: Any, info: ValidationInfo) -> Any:
        return _no_op_only(v, info)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        """The message text; content parts other than text are an error."""
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        parts = []
        for part in self.content:
            if part.get("type") != "text":
                raise ValueError(f"content parts of type {part.get('type')!r} are not supported (text only)")
            parts.append(str(part.get("text", "")))
        return "".join(parts)


class ChatCompletionRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


def error_response(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict:
    return ErrorResponse(error=ErrorBody(message=message, type=type_, param=param, code=code)).model_dump()
