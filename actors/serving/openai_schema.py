"""The OpenAI request and response shapes the server speaks: pydantic models and dict builders.

Requests are parsed strictly (a string is not a number, unknown fields are refused, as OpenAI
does), so a client bug comes back as a 400 naming the field instead of a silently different
generation. Fields that clients often send with a neutral value (penalties 0, logprobs off) are
accepted with that value and refused otherwise. Errors use OpenAI's body:
{"error": {"message", "type", "param", "code"}}.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

MAX_STOP = 4

NEUTRAL = {
    "presence_penalty": (0, 0.0),
    "frequency_penalty": (0, 0.0),
    "logprobs": (False, 0),
    "top_logprobs": (0,),
    "echo": (False,),
    "logit_bias": ({},),
    "best_of": (1,),
    "suffix": ("",),
    "user": None,  # any string: it only identifies the caller
}
"""Fields this server does not implement, with the values that mean "off" (None is always off)."""


class OpenAIError(Exception):
    """A request that fails with an HTTP status and OpenAI's error body."""

    def __init__(
        self, status: int, message: str, param: str | None = None,
        type: str = "invalid_request_error", code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class StreamOptions(_Strict):
    include_usage: bool = False


class _GenerationFields(_Strict):
    model: str = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, ge=0, le=1)
    n: int = Field(1, ge=1)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    seed: int | None = Field(None, ge=0, le=2**64 - 1)
    num_beams: int = Field(1, ge=1)
    """An extension: beam search with this many beams (n <= num_beams), deterministic."""

    @field_validator("stop")
    @classmethod
    def _stops(cls, value: str | list[str] | None) -> str | list[str] | None:
        items = [value] if isinstance(value, str) else value or []
        if len(items) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences")
        if any(not s for s in items):
            raise ValueError("stop sequences must not be empty")
        return value

    @property
    def stops(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())


class CompletionRequest(_GenerationFields):
    prompt: str | list[str]

    @field_validator("prompt")
    @classmethod
    def _not_empty(cls, value: str | list[str]) -> str | list[str]:
        items = [value] if isinstance(value, str) else value
        if not items or any(not p for p in items):
            raise ValueError("the prompt must not be empty")
        return value

    @property
    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def as_template_input(self) -> dict[str, str]:
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class ChatCompletionRequest(_GenerationFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    """The newer name of max_tokens in the chat API; either may be given."""


_UNION_TAGS = {"str", "int", "float", "bool"}


def _param(loc: tuple) -> str | None:
    """The request field an error is about: the top-level key, plus list positions below it."""
    if not loc:
        return None
    parts = [str(loc[0])]
    for item in loc[1:]:
        if isinstance(item, int):
            parts.append(f"[{item}]")
        elif item.isidentifier() and item not in _UNION_TAGS:  # pydantic names union members: 'str', 'list[str]'
            parts.append(f".{item}")
    return "".join(parts)


def _refuse_constant(name: str) -> None:
    raise ValueError(f"{name} is not a JSON number")


def parse_request(body: bytes, model: type[_GenerationFields]) -> _GenerationFields:
    """Malformed JSON, wrong types and bad values all raise OpenAIError(400) naming the field."""
    try:
        data = json.loads(body, parse_constant=_refuse_constant)
    except ValueError as e:  # bad UTF-8, bad JSON, NaN / Infinity
        raise OpenAIError(400, f"the request body is not valid JSON: {e}") from None
    except RecursionError:
        raise OpenAIError(400, "the request body is nested too deeply") from None
    if not isinstance(data, dict):
        raise OpenAIError(400, "the request body must be a JSON object")
    for key, neutral in NEUTRAL.items():
        value = data.pop(key, None)
        if neutral is not None and value is not None and value not in neutral:
            raise OpenAIError(400, f"{key}={value!r} is not supported by this server", param=key)
    try:
        return model.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        param = _param(first["loc"])
        where = f"{param}: " if param else ""
        raise OpenAIError(400, f"{where}{first['msg']}", param=param) from None


# --- responses ----------------------------------------------------------------------------


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def completion_choice(index: int, text: str, finish_reason: str | None) -> dict[str, Any]:
    return {"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason}


def chat_choice(index: int, text: str, finish_reason: str | None) -> dict[str, Any]:
    return {
        "index": index, "message": {"role": "assistant", "content": text},
        "logprobs": None, "finish_reason": finish_reason,
    }


def chat_delta_choice(index: int, delta: dict[str, str], finish_reason: str | None) -> dict[str, Any]:
    return {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}


def envelope(
    kind: Literal["completion", "chat"], chunk: bool, id: str, created: int, model: str,
    choices: list[dict[str, Any]], usage: dict[str, int] | None,
) -> dict[str, Any]:
    """The object around choices: text_completion, chat.completion or chat.completion.chunk."""
    if kind == "completion":
        obj = "text_completion"
    else:
        obj = "chat.completion.chunk" if chunk else "chat.completion"
    out: dict[str, Any] = {"id": id, "object": obj, "created": created, "model": model, "choices": choices}
    if usage is not None or not chunk:
        out["usage"] = usage
    return out


def models_list(model: str, created: int) -> dict[str, Any]:
    return {"object": "list", "data": [{"id": model, "object": "model", "created": created, "owned_by": "rayrlhf"}]}


def sse(event: dict[str, Any] | str) -> str:
    """One server-sent event: `data: <json>` (or the literal [DONE]) and a blank line."""
    return f"data: {event if isinstance(event, str) else json.dumps(event)}\n\n"
