"""The OpenAI request and response shapes the server speaks: pydantic models and dict builders.

Requests are parsed strictly (a string is not a number, unknown fields are refused, as OpenAI
does), so a client bug comes back as a 400 naming the field instead of a silently different
generation. Fields that clients often send with a neutral value (penalties 0, echo off) are
accepted with that value and refused otherwise. Tools follow OpenAI's function tools; the gateway's
extensions (token ids, log-probs, episodes) are described in docs/serving_gateway.md. Errors use OpenAI's body:
{"error": {"message", "type", "param", "code"}}.
"""

from __future__ import annotations

import json
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from rayrlhf.actors.generation.tool_calls import format_tool_call

MAX_STOP = 4

NEUTRAL = {
    "presence_penalty": (0, 0.0),
    "frequency_penalty": (0, 0.0),
    "echo": (False,),
    "logit_bias": ({},),
    "best_of": (1,),
    "suffix": ("",),
    "user": None,  # any string: it only identifies the caller
    "parallel_tool_calls": (True,),  # every call the reply makes is returned
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


def _only_zero(value: int | None) -> int | None:
    if value not in (None, 0):
        raise ValueError("only 0 is supported: each sampled token's own log-prob, no alternatives to it")
    return value


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
    return_token_ids: bool = False
    """An extension (vLLM's name): the prompt's and each choice's token ids in the response."""

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
    prompt: str | list[str] | list[int] | list[list[int]]
    """Text, texts, or (as OpenAI allows) token ids: one list of ids, or a list of such lists."""
    logprobs: int | None = None
    """0: each sampled token's log-prob (the legacy API's top-k alternatives are not supported)."""

    _zero_logprobs = field_validator("logprobs")(lambda cls, value: _only_zero(value))

    @field_validator("prompt")
    @classmethod
    def _not_empty(cls, value: Any) -> Any:
        items = [value] if isinstance(value, str) or (value and isinstance(value[0], int)) else value
        if not items or any(not p for p in items):
            raise ValueError("the prompt must not be empty")
        return value

    @property
    def prompts(self) -> list[str] | list[list[int]]:
        """One entry per prompt: a text or a list of token ids."""
        prompt = self.prompt
        return [prompt] if isinstance(prompt, str) or isinstance(prompt[0], int) else list(prompt)


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class FunctionDefinition(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    """A JSON schema of the arguments; shown to the model as it is."""
    strict: bool | None = None


class Tool(_Strict):
    type: Literal["function"]
    function: FunctionDefinition


class FunctionCall(_Strict):
    name: str = Field(min_length=1)
    arguments: str
    """JSON text of an object, as OpenAI sends it."""

    @field_validator("arguments")
    @classmethod
    def _json_object(cls, value: str) -> str:
        try:
            parsed = json.loads(value)
        except ValueError:
            raise ValueError("arguments must be JSON text of an object") from None
        if not isinstance(parsed, dict):
            raise ValueError("arguments must be JSON text of an object")
        return value


class AssistantToolCall(_Strict):
    id: str
    type: Literal["function"]
    function: FunctionCall


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None
    """Null (or left out) only in an assistant message that makes tool calls."""
    name: str | None = None
    tool_calls: list[AssistantToolCall] | None = None
    """Assistant messages only: the calls it made (a history replayed by the client)."""
    tool_call_id: str | None = None
    """Tool messages only (required there): the call this is the result of."""

    @model_validator(mode="before")
    @classmethod
    def _calls_need_no_content(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("tool_calls") and "content" not in data:
            return {**data, "content": None}
        return data

    @model_validator(mode="after")
    def _tool_fields(self) -> ChatMessage:
        if self.tool_calls is not None and self.role != "assistant":
            raise ValueError("tool_calls is only for assistant messages")
        if (self.tool_call_id is not None) != (self.role == "tool"):
            raise ValueError("a tool message needs tool_call_id, and only a tool message has one")
        if self.content is None and not self.tool_calls:
            raise ValueError("content is required (it may be null only in an assistant message with tool_calls)")
        return self

    def as_template_input(self, native_tools: bool = False) -> dict[str, Any]:
        """The message for the chat template: tool calls as the template's own `tool_calls` field when it
        supports tools, else written into the content in the <tool_call> convention."""
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content or [])
        message: dict[str, Any] = {"role": "system" if self.role == "developer" else self.role, "content": text}
        calls = self.tool_calls or []
        if native_tools and calls:
            message["tool_calls"] = [
                {"id": c.id, "type": "function", "function": {"name": c.function.name,
                                                               "arguments": json.loads(c.function.arguments)}}
                for c in calls
            ]
        elif calls:
            written = "".join(format_tool_call(c.function.name, json.loads(c.function.arguments)) for c in calls)
            message["content"] = f"{text}\n{written}" if text else written
        if native_tools and self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        return message


class ChatCompletionRequest(_GenerationFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    """The newer name of max_tokens in the chat API; either may be given."""
    tools: list[Tool] | None = None
    tool_choice: str | dict[str, Any] | None = None
    """"auto" (the default with tools) or "none" (tools shown, no calls parsed)."""
    logprobs: bool = False
    top_logprobs: int | None = None
    """Only 0: alternatives to the sampled token are not returned."""

    _zero_top_logprobs = field_validator("top_logprobs")(lambda cls, value: _only_zero(value))

    @field_validator("tool_choice")
    @classmethod
    def _supported_choice(cls, value: str | dict[str, Any] | None) -> str | dict[str, Any] | None:
        if value not in (None, "auto", "none"):
            raise ValueError('only "auto" and "none" are supported ("required" and naming a function are not)')
        return value

    @property
    def parses_tool_calls(self) -> bool:
        return bool(self.tools) and self.tool_choice != "none"


class EpisodePost(_Strict):
    """POST /v1/episodes (an extension): the caller's reward for one episode, made of these requests in order."""

    requests: list[str] = Field(min_length=1)
    reward: float


Body = TypeVar("Body", bound=_Strict)

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


def parse_request(body: bytes, model: type[Body]) -> Body:
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


def chat_choice(index: int, text: str | None, finish_reason: str | None) -> dict[str, Any]:
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
