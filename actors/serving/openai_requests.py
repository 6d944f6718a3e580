"""From an OpenAI request body to a GenerationRequest, and from generator Updates to the response.

Everything between HTTP and the model that needs no server: parsing and limits (token counts
need the tokenizer, so they are checked here rather than in the schema), the served model's
name, and turning per-step Updates into one response or into stream chunks. The Ray Serve
deployment (jobs/serve.py) only moves bytes and Updates between this and the scheduler, and
calls `parse` from worker threads of its own: tokenising a long prompt takes seconds.
"""

from __future__ import annotations

import copy
import threading
import time
import uuid
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from rayrlhf.actors.generation.requests import GenerationRequest, SamplingParams, Update
from rayrlhf.actors.serving import openai_schema as oa
from rayrlhf.actors.serving.text_generator import TextGenerator

Kind = Literal["completion", "chat"]


@dataclass(frozen=True)
class Limits:
    default_max_tokens: int
    """max_tokens when the request gives none."""
    max_tokens: int
    max_prompt_tokens: int | None
    """None: the model's context length minus max_tokens."""
    max_rows: int
    """Sequences one request may ask for (prompts x n): the server's max_batch_size (rows in flight)."""
    request_timeout_s: float


@dataclass
class Job:
    """One request in flight: what was asked, and the text gathered so far per choice."""

    kind: Kind
    id: str
    created: int
    model: str
    stream: bool
    include_usage: bool
    timeout_s: float
    generation: GenerationRequest
    texts: dict[int, str] = field(default_factory=dict)
    finish: dict[int, str] = field(default_factory=dict)
    usage: dict[str, int] | None = None
    batch: tuple[int, int] = (0, 0)
    """The most (requests, sequences) that shared a decode step with it so far."""

    def add(self, update: Update) -> None:
        """Take one step's Update; a timed-out choice fails the request with 504."""
        self.batch = max(self.batch, (update.batch_requests, update.batch_rows))
        for c in update.choices:
            self.texts[c.index] = self.texts.get(c.index, "") + c.text
            if c.finish_reason in ("timeout", "cancelled"):
                raise oa.OpenAIError(
                    504, f"generation did not finish within request_timeout_s={self.timeout_s:g}",
                    type="timeout", code="timeout",
                )
            if c.finish_reason:
                self.finish[c.index] = c.finish_reason
        self.usage = oa.usage(update.prompt_tokens, update.completion_tokens)

    def response(self) -> dict[str, Any]:
        choice = oa.completion_choice if self.kind == "completion" else oa.chat_choice
        choices = [choice(i, self.texts.get(i, ""), self.finish.get(i)) for i in range(self.generation.rows)]
        return oa.envelope(self.kind, False, self.id, self.created, self.model, choices, self.usage)

    def chunks(self, update: Update) -> list[dict[str, Any]]:
        """The stream events of one step (chat: the first event of each choice carries the role)."""
        seen = set(self.texts)
        self.add(update)
        events = []
        for c in update.choices:
            if self.kind == "completion":
                choice = oa.completion_choice(c.index, c.text, c.finish_reason)
            else:
                delta = {"role": "assistant", "content": c.text} if c.index not in seen else {"content": c.text}
                choice = oa.chat_delta_choice(c.index, delta, c.finish_reason)
            events.append(oa.envelope(self.kind, True, self.id, self.created, self.model, [choice], None))
        if update.done and self.include_usage:
            events.append(oa.envelope(self.kind, True, self.id, self.created, self.model, [], self.usage))
        return events


def own_tokenizer(generator: TextGenerator) -> TextGenerator:
    """The generator's encode_text / encode_chat on a copy of its tokenizer, under a lock of its own:
    encoding a long prompt must not hold the lock the decode thread takes to turn tokens into text."""
    encoder = copy.copy(generator)
    encoder.tokenizer = copy.deepcopy(generator.tokenizer)
    encoder._tokenizer_lock = threading.Lock()
    return encoder


class OpenAIEngine:
    """Turns request bodies into Jobs for one served model."""

    def __init__(self, generator: TextGenerator, model_name: str, limits: Limits) -> None:
        self.generator = generator
        self._encoders = threading.local()
        """Each parsing thread's own_tokenizer(generator): a Rust tokenizer is not for two threads."""
        self.model_name = model_name
        self.created = int(time.time())
        context = generator.context_length
        if limits.max_prompt_tokens is None:
            limits = replace(limits, max_prompt_tokens=context - limits.max_tokens)
        self.limits = limits
        if limits.max_prompt_tokens < 1 or limits.max_prompt_tokens + limits.max_tokens > context:
            raise ValueError(
                f"max_prompt_tokens ({limits.max_prompt_tokens}) + max_tokens ({limits.max_tokens}) exceed "
                f"the model's context length ({context})"
            )
        if limits.default_max_tokens > limits.max_tokens:
            raise ValueError(f"default_max_tokens ({limits.default_max_tokens}) > max_tokens ({limits.max_tokens})")

    def _encoder(self) -> TextGenerator:
        encoder = getattr(self._encoders, "encoder", None)
        if encoder is None:
            encoder = self._encoders.encoder = own_tokenizer(self.generator)
        return encoder

    def models(self) -> dict[str, Any]:
        return oa.models_list(self.model_name, self.created)

    def parse(self, kind: Kind, body: bytes) -> Job:
        """A validated Job, or OpenAIError (400 bad field, 404 unknown model). Any thread may call it."""
        schema = oa.CompletionRequest if kind == "completion" else oa.ChatCompletionRequest
        req = oa.parse_request(body, schema)
        if req.model != self.model_name:
            raise oa.OpenAIError(
                404, f"the model {req.model!r} does not exist; this server serves {self.model_name!r}",
                param="model", code="model_not_found",
            )
        limits = self.limits
        max_tokens = getattr(req, "max_completion_tokens", None) or req.max_tokens or limits.default_max_tokens
        if max_tokens > limits.max_tokens:
            param = "max_completion_tokens" if getattr(req, "max_completion_tokens", None) else "max_tokens"
            raise oa.OpenAIError(400, f"{param}={max_tokens} is above this server's limit of {limits.max_tokens}", param)
        param = "prompt" if kind == "completion" else "messages"
        encoder = self._encoder()
        try:
            if kind == "completion":
                prompts = [encoder.encode_text(p) for p in req.prompts]
            else:
                prompts = [encoder.encode_chat([m.as_template_input() for m in req.messages])]
        except ValueError as e:  # no chat template, or the template refused the messages
            raise oa.OpenAIError(400, f"{param}: {e}", param) from None
        except TypeError:  # the Rust tokenizer refuses some strings, e.g. an unpaired surrogate
            raise oa.OpenAIError(400, f"{param}: contains text that cannot be tokenised", param) from None
        for ids in prompts:
            if not ids:
                raise oa.OpenAIError(400, "the prompt is empty after tokenisation", param)
            if len(ids) > limits.max_prompt_tokens:
                raise oa.OpenAIError(
                    400, f"the prompt has {len(ids)} tokens, more than this server's limit of "
                    f"{limits.max_prompt_tokens}", param,
                )
        if len(prompts) * req.n > limits.max_rows:
            raise oa.OpenAIError(
                400, f"n={req.n} x {len(prompts)} prompt(s) asks for more sequences than this server's "
                f"batch limit of {limits.max_rows}", "n",
            )
        if req.num_beams > 1 and req.n > req.num_beams:
            raise oa.OpenAIError(400, f"n={req.n} is more than num_beams={req.num_beams}: n <= num_beams", "n")
        if len(prompts) * req.num_beams > limits.max_rows:
            raise oa.OpenAIError(
                400, f"num_beams={req.num_beams} x {len(prompts)} prompt(s) is more than this server's batch "
                f"limit of {limits.max_rows} sequences", "num_beams",
            )
        params = SamplingParams(max_tokens, req.temperature, req.top_p, req.stops, req.seed)
        generation = GenerationRequest(
            prompts, req.n, params, time.monotonic() + limits.request_timeout_s, num_beams=req.num_beams,
        )
        prefix = "cmpl" if kind == "completion" else "chatcmpl"
        return Job(
            kind=kind, id=f"{prefix}-{uuid.uuid4().hex}", created=int(time.time()), model=self.model_name,
            stream=req.stream, include_usage=bool(req.stream_options and req.stream_options.include_usage),
            timeout_s=limits.request_timeout_s, generation=generation,
        )
