"""From an OpenAI request body to a GenerationRequest, and from generator Updates to the response.

Everything between HTTP and the model that needs no server: parsing and limits (token counts
need the tokenizer, so they are checked here rather than in the schema), the served model's
name, and turning per-step Updates into one response or into stream chunks. The Ray Serve
deployment (jobs/serve_server.py) only moves bytes and Updates between this and the scheduler, and
calls `parse` from worker threads of its own: tokenising a long prompt takes seconds.
"""

from __future__ import annotations

import copy
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from rayrlhf.actors.generation.requests import GenerationRequest, SamplingParams, Update
from rayrlhf.actors.generation.tool_calls import parse_tool_calls, with_tools
from rayrlhf.actors.serving import openai_schema as oa
from rayrlhf.actors.serving.feedback import Prompt, Served
from rayrlhf.actors.serving.openai_output import chat_logprobs, completion_logprobs, shown_end, tool_reply
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
    """One request in flight: what was asked, and the text (and tokens) gathered so far per choice."""

    kind: Kind
    id: str
    created: int
    model: str
    stream: bool
    include_usage: bool
    timeout_s: float
    generation: GenerationRequest
    logprobs: bool = False
    """Return per-token log-probs (the generation records them also for token ids alone)."""
    token_ids: bool = False
    """return_token_ids: the prompt's and each choice's token ids."""
    tools: bool = False
    """Read tool calls from the replies (tools given, tool_choice not "none")."""
    token_text: Callable[[int], str] = str
    """One token's text, for log-prob entries."""
    prompt_texts: list[Prompt] = field(default_factory=list)
    """Each prompt as feedback stores it (train-rm's `prompt`): the text (token ids decoded) or the chat messages."""
    texts: dict[int, str] = field(default_factory=dict)
    finish: dict[int, str] = field(default_factory=dict)
    ids: dict[int, list[int]] = field(default_factory=dict)
    token_logprobs: dict[int, list[float]] = field(default_factory=dict)
    shown: dict[int, int] = field(default_factory=dict)
    """Characters of each choice's text a stream has sent (less than gathered while a tool call may be open)."""
    usage: dict[str, int] | None = None
    batch: tuple[int, int] = (0, 0)
    """The most (requests, sequences) that shared a decode step with it so far."""

    def add(self, update: Update) -> None:
        """Take one step's Update; a timed-out choice fails the request with 504."""
        self.batch = max(self.batch, (update.batch_requests, update.batch_rows))
        for c in update.choices:
            self.texts[c.index] = self.texts.get(c.index, "") + c.text
            self.ids.setdefault(c.index, []).extend(c.token_ids)
            self.token_logprobs.setdefault(c.index, []).extend(c.logprobs)
            if c.finish_reason in ("timeout", "cancelled"):
                raise oa.OpenAIError(
                    504, f"generation did not finish within request_timeout_s={self.timeout_s:g}",
                    type="timeout", code="timeout",
                )
            if c.finish_reason:
                self.finish[c.index] = c.finish_reason
        self.usage = oa.usage(update.prompt_tokens, update.completion_tokens)

    def prompt_ids(self, index: int) -> list[int]:
        return self.generation.prompts[index // self.generation.n]

    def _call_prefix(self, index: int) -> str:
        return f"call_{self.id.rpartition('-')[2][:12]}_{index}"

    def _extras(self, choice: dict[str, Any], index: int, ids: list[int], logprobs: list[float], offset: int) -> None:
        """Log-probs and token ids (of the tokens given) into a choice, if the request asked."""
        if self.logprobs:
            if self.kind == "completion":
                choice["logprobs"] = completion_logprobs(ids, logprobs, self.token_text, offset)
            else:
                choice["logprobs"] = chat_logprobs(ids, logprobs, self.token_text)
        if self.token_ids:
            if self.kind == "completion":
                choice["prompt_token_ids"] = self.prompt_ids(index)
            choice["token_ids"] = ids

    def _envelope(self, chunk: bool, choices: list[dict[str, Any]], usage: dict[str, int] | None,
                  first: bool = False) -> dict[str, Any]:  # fmt: skip
        out = oa.envelope(self.kind, chunk, self.id, self.created, self.model, choices, usage)
        if self.token_ids and self.kind == "chat" and (first or not chunk):
            out["prompt_token_ids"] = self.generation.prompts[0]  # as vLLM: chat has one prompt
        return out

    def response(self) -> dict[str, Any]:
        choices = []
        for i in range(self.generation.rows):
            text, finish = self.texts.get(i, ""), self.finish.get(i)
            if self.kind == "completion":
                choice = oa.completion_choice(i, text, finish)
            else:
                content, calls = tool_reply(text, self._call_prefix(i)) if self.tools else (text, [])
                choice = oa.chat_choice(i, content, "tool_calls" if calls else finish)
                if calls:
                    choice["message"]["tool_calls"] = calls
            self._extras(choice, i, self.ids.get(i, []), self.token_logprobs.get(i, []), 0)
            choices.append(choice)
        return self._envelope(False, choices, self.usage)

    def chunks(self, update: Update) -> list[dict[str, Any]]:
        """The stream events of one step (chat: the first event of each choice carries the role)."""
        seen = set(self.texts)
        self.add(update)
        events = []
        for c in update.choices:
            first = c.index not in seen
            if self.kind == "completion":
                choice = oa.completion_choice(c.index, c.text, c.finish_reason)
                offset = len(self.texts[c.index]) - len(c.text)
            else:
                choice = oa.chat_delta_choice(c.index, self._delta(c.index, c.finish_reason, first), c.finish_reason)
                if "tool_calls" in choice["delta"]:
                    choice["finish_reason"] = "tool_calls"
                offset = 0
            self._extras(choice, c.index, c.token_ids, c.logprobs, offset)
            events.append(self._envelope(True, [choice], None, first=first and not events))
        if update.done and self.include_usage:
            events.append(self._envelope(True, [], self.usage))
        return events

    def _delta(self, index: int, finish: str | None, first: bool) -> dict[str, Any]:
        """A chat choice's new content; with tools, held back from a call's opening until the reply
        is whole, then the rest of the content and the calls (OpenAI's stream shape, one piece each)."""
        text, shown = self.texts[index], self.shown.get(index, 0)
        end = len(text) if finish or not self.tools else max(shown, shown_end(text))
        delta: dict[str, Any] = {"role": "assistant"} if first else {}
        calls: list[dict[str, Any]] = []
        if finish and self.tools:
            _, calls = tool_reply(text, self._call_prefix(index))
            if calls:  # the held part's text outside the blocks, then the calls
                rest = parse_tool_calls(text[shown:]).content
                delta["content"] = rest
                delta["tool_calls"] = [{"index": k, **call} for k, call in enumerate(calls)]
        if not calls:
            delta["content"] = text[shown:end]
        self.shown[index] = end
        return delta

    def served(self) -> Served:
        """The complete response as the feedback window keeps it (choice i answers prompt i // n)."""
        rows = range(self.generation.rows)
        return Served(self.id, self.model, [self.prompt_texts[i // self.generation.n] for i in rows],
                      [self.texts.get(i, "") for i in rows])

    def record(self) -> list[dict[str, Any]]:
        """Each choice's prompt ids, completion ids and log-probs: what an episode is made of."""
        return [
            {"prompt_ids": self.prompt_ids(i), "completion_ids": self.ids.get(i, []),
             "logprobs": self.token_logprobs.get(i, [])}
            for i in range(self.generation.rows)
        ]  # fmt: skip


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
        self.vocab_size = generator.model.get_input_embeddings().num_embeddings
        self._text_tokenizer = own_tokenizer(generator).tokenizer
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
                prompts = [self._token_ids(p) if isinstance(p, list) else encoder.encode_text(p) for p in req.prompts]
                texts: list[Prompt] = [p if isinstance(p, str) else encoder.tokenizer.decode(p) for p in req.prompts]
            else:
                prompts = [self._encode_chat(encoder, req)]
                texts = [[m.as_template_input() for m in req.messages]]
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
        logprobs = req.logprobs is not None and req.logprobs is not False  # completions: 0, chat: true
        if req.num_beams > 1 and (logprobs or req.return_token_ids):
            raise oa.OpenAIError(400, "logprobs and return_token_ids need sampling or greedy decoding, not beams",
                                 "num_beams")  # fmt: skip
        generation = GenerationRequest(
            prompts, req.n, params, time.monotonic() + limits.request_timeout_s, num_beams=req.num_beams,
            logprobs=logprobs or req.return_token_ids,
        )
        prefix = "cmpl" if kind == "completion" else "chatcmpl"
        return Job(
            kind=kind, id=f"{prefix}-{uuid.uuid4().hex}", created=int(time.time()), model=self.model_name,
            stream=req.stream, include_usage=bool(req.stream_options and req.stream_options.include_usage),
            timeout_s=limits.request_timeout_s, generation=generation, logprobs=logprobs,
            token_ids=req.return_token_ids, tools=getattr(req, "parses_tool_calls", False), token_text=self.token_text,
            prompt_texts=texts,
        )

    def _token_ids(self, ids: list[int]) -> list[int]:
        """A prompt given as token ids, checked against the model's vocabulary."""
        if any(i < 0 or i >= self.vocab_size for i in ids):
            raise ValueError(f"token ids must be in 0..{self.vocab_size - 1}")
        return ids

    @staticmethod
    def _encode_chat(encoder: TextGenerator, req: oa.ChatCompletionRequest) -> list[int]:
        """The conversation's ids; tools through the template's own support when it has some, else
        described in the system message with the <tool_call> convention."""
        native = encoder.template_has_tools
        messages = [m.as_template_input(native) for m in req.messages]
        tools = [t.model_dump(exclude_none=True) for t in req.tools or []]
        if native:
            return encoder.encode_chat(messages, tools or None)
        return encoder.encode_chat(with_tools(messages, tools))

    def token_text(self, token: int) -> str:
        """One token's text (for log-prob entries); called on the server's event loop only."""
        return self._text_tokenizer.decode([token])
