"""Batched, step-by-step sampling for serving: many requests, each with its own settings.

Why not `model.generate`: it takes one temperature / top_p / length for the whole batch and
returns only at the end. A server batches requests with different settings and streams text as
it comes, so this module runs its own KV-cached decode loop with per-row temperature (0 means
greedy), top_p, max_tokens, stop strings, seed and deadline. Rows that finish leave the batch
(their cache rows are dropped), so a short request does not pay for a long neighbour.

Text is streamed safely: a delta never contains part of a stop string that may still complete,
nor half of a multi-byte character.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from rayrlhf.actors.models import load_policy
from rayrlhf.actors.rollout_worker import eos_token_ids, left_pad


class GenerationError(RuntimeError):
    """The model could not produce text (e.g. non-finite logits from a diverged checkpoint)."""


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    temperature: float
    """0 means greedy."""
    top_p: float
    stop: tuple[str, ...]
    seed: int | None
    """Same seed, same prompt, same settings: same text (up to batch-dependent float rounding)."""


@dataclass
class GenerationRequest:
    """One client request: n samples of each prompt (prompts as token ids)."""

    prompts: list[list[int]]
    n: int
    params: SamplingParams
    deadline: float
    """time.monotonic() after which its rows stop with finish_reason "timeout"."""
    cancelled: bool = False
    """Set by a caller that stopped listening; its rows leave the batch at the next step."""

    @property
    def rows(self) -> int:
        return len(self.prompts) * self.n

    @property
    def prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)


@dataclass
class ChoiceDelta:
    index: int
    """prompt_index * n + sample_index, as OpenAI numbers choices."""
    text: str
    finish_reason: str | None
    """None while running; then "stop" (EOS or stop string), "length", "timeout" or "cancelled"."""


@dataclass
class Update:
    """What one decode step produced for one request."""

    choices: list[ChoiceDelta]
    """Only the choices with new text or a finish reason in this step."""
    prompt_tokens: int
    completion_tokens: int
    """Tokens sampled so far over all choices, a final EOS included."""
    done: bool
    batch_requests: int
    batch_rows: int


def find_stop(text: str, stops: tuple[str, ...], start: int = 0) -> int | None:
    """Index where the earliest stop string begins in text[start:], or None."""
    hits = [i for i in (text.find(s, start) for s in stops) if i >= 0]
    return min(hits) if hits else None


def held_back(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest suffix of text that is a proper prefix of a stop string."""
    best = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:k]):
                best = k
                break
    return best


def sample_tokens(
    logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor, generators: list[torch.Generator]
) -> torch.Tensor:
    """One token per row: argmax where temperature is 0, else nucleus sampling of softmax(logits / T)."""
    probs = torch.softmax(logits / temperature.clamp(min=1e-5)[:, None], dim=-1)
    sorted_p, order = probs.sort(dim=-1, descending=True)
    outside = (sorted_p.cumsum(-1) - sorted_p) >= top_p[:, None]  # mass before this token already >= top_p
    outside[:, 0] = False  # the most likely token is always kept (top_p = 0 keeps only it)
    sorted_p = sorted_p.masked_fill(outside, 0.0)
    tokens = logits.argmax(dim=-1)
    for row in torch.nonzero(temperature > 0).flatten().tolist():
        pick = torch.multinomial(sorted_p[row], 1, generator=generators[row])
        tokens[row] = order[row, pick[0]]
    return tokens


@dataclass
class _Row:
    request: int
    choice: int
    params: SamplingParams
    generator: torch.Generator
    tokens: list[int] = field(default_factory=list)
    sampled: int = 0
    emitted: int = 0
    finish: str | None = None


def context_length(config) -> int:
    """Positions the model can attend over (prompt + completion), from its HF config."""
    return int(getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None) or 2048)


class _Batch:
    """The decode state of the rows still running: next inputs, attention mask, positions, KV cache."""

    def __init__(self, input_ids: torch.Tensor, mask: torch.Tensor) -> None:
        self.input_ids, self.mask = input_ids, mask
        self.positions = (mask.cumsum(-1) - 1).clamp(min=0)  # left padding: real tokens count from 0
        self.past = None
        self.active = list(range(len(input_ids)))
        """Row numbers still in the batch, in batch order."""

    def step(self, past, tokens: torch.Tensor) -> None:
        """Feed the sampled tokens next."""
        self.past = past
        self.input_ids = tokens[:, None]
        self.mask = torch.cat([self.mask, torch.ones_like(self.mask[:, :1])], dim=1)
        self.positions = self.positions[:, -1:] + 1

    def drop_finished(self, rows: list[_Row]) -> None:
        keep = [b for b, i in enumerate(self.active) if rows[i].finish is None]
        if len(keep) == len(self.active):
            return
        index = torch.tensor(keep, dtype=torch.long)
        if self.past is not None:
            self.past.batch_select_indices(index)
        self.input_ids, self.mask, self.positions = self.input_ids[index], self.mask[index], self.positions[index]
        self.active = [self.active[b] for b in keep]


class TextGenerator:
    """A policy loaded for serving; `stream` runs a batch of requests one token at a time."""

    def __init__(self, model_dir: str | Path, dtype: str, torch_threads: int) -> None:
        torch.set_num_threads(torch_threads)
        self.model, self.tokenizer = load_policy(model_dir, dtype=dtype)
        self.model.requires_grad_(False)
        self.eos_ids = eos_token_ids(self.model, self.tokenizer)
        self.pad_id = self.tokenizer.pad_token_id
        self.context_length = context_length(self.model.config)
        self._seeds = np.random.default_rng()
        self._tokenizer_lock = threading.Lock()
        """A server encodes new requests while a batch decodes in another thread; the Rust
        tokenizer refuses concurrent use ("Already borrowed")."""

    def encode_text(self, text: str) -> list[int]:
        with self._tokenizer_lock:
            return self.tokenizer(text).input_ids

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        """Token ids of the chat template with the assistant turn opened."""
        if not self.tokenizer.chat_template:
            raise ValueError("this model has no chat template: use /v1/completions")
        with self._tokenizer_lock:
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            return self.tokenizer(text, add_special_tokens=False).input_ids  # the template has its own

    def _rows(self, requests: list[GenerationRequest]) -> list[_Row]:
        rows = []
        for r, req in enumerate(requests):
            for choice in range(req.rows):
                base = req.params.seed if req.params.seed is not None else int(self._seeds.integers(2**62))
                seed = int(np.random.SeedSequence([base, choice]).generate_state(1)[0])
                rows.append(_Row(r, choice, req.params, torch.Generator().manual_seed(seed)))
        return rows

    def _prefill_inputs(self, requests: list[GenerationRequest]) -> tuple[torch.Tensor, torch.Tensor]:
        return left_pad([p for req in requests for p in req.prompts for _ in range(req.n)], self.pad_id)

    def _advance(self, row: _Row, token: int) -> ChoiceDelta | None:
        """Take one sampled token into the row; the text that is safe to emit, if any."""
        row.sampled += 1
        if token in self.eos_ids:
            row.finish = "stop"
        else:
            row.tokens.append(token)
        with self._tokenizer_lock:
            text = self.tokenizer.decode(row.tokens, skip_special_tokens=True)
        stops = row.params.stop
        longest = max((len(s) for s in stops), default=0)
        cut = find_stop(text, stops, max(0, row.emitted - longest)) if stops else None
        if cut is not None:
            row.finish, end = "stop", max(cut, row.emitted)
        else:
            if row.finish is None and row.sampled >= row.params.max_tokens:
                row.finish = "length"
            end = len(text)
            if row.finish is None:
                end -= held_back(text, stops)
                if text.endswith("\ufffd"):  # an incomplete multi-byte character: wait for the rest
                    end = min(end, len(text) - 1)
        delta = text[row.emitted:end] if end > row.emitted else ""
        row.emitted = max(row.emitted, end)
        if delta or row.finish:
            return ChoiceDelta(row.choice, delta, row.finish)
        return None

    @staticmethod
    def _expire(requests: list[GenerationRequest], rows: list[_Row], batch: _Batch) -> dict[int, list[ChoiceDelta]]:
        """End the rows whose caller gave up or whose deadline passed, before spending a step on them."""
        now = time.monotonic()
        ended: dict[int, list[ChoiceDelta]] = {}
        for i in batch.active:
            row, request = rows[i], requests[rows[i].request]
            if request.cancelled or now >= request.deadline:
                row.finish = "cancelled" if request.cancelled else "timeout"
                ended.setdefault(row.request, []).append(ChoiceDelta(row.choice, "", row.finish))
        return ended

    @torch.no_grad()
    def stream(self, requests: list[GenerationRequest]) -> Iterator[list[Update | None]]:
        """Yield after every decode step one entry per request: its Update, or None once it is done."""
        if not requests:
            return
        rows = self._rows(requests)
        batch = _Batch(*self._prefill_inputs(requests))
        finished = [False] * len(requests)
        while batch.active:
            ended = self._expire(requests, rows, batch)
            if ended:
                yield self._updates(requests, rows, ended, finished)
                batch.drop_finished(rows)
                if not batch.active:
                    return
            out = self.model(
                input_ids=batch.input_ids, attention_mask=batch.mask, position_ids=batch.positions,
                past_key_values=batch.past, use_cache=True,
            )
            logits = out.logits[:, -1, :].float()
            if not torch.isfinite(logits).all():
                raise GenerationError(
                    "the model produced non-finite logits (NaN or inf): the checkpoint's weights are likely diverged"
                )
            live = [rows[i] for i in batch.active]
            temperature = torch.tensor([r.params.temperature for r in live])
            top_p = torch.tensor([r.params.top_p for r in live])
            tokens = sample_tokens(logits, temperature, top_p, [r.generator for r in live])
            deltas: dict[int, list[ChoiceDelta]] = {}
            for row, token in zip(live, tokens.tolist()):
                delta = self._advance(row, token)
                if delta is not None:
                    deltas.setdefault(row.request, []).append(delta)
            yield self._updates(requests, rows, deltas, finished)
            batch.step(out.past_key_values, tokens)
            batch.drop_finished(rows)

    def _updates(
        self,
        requests: list[GenerationRequest],
        rows: list[_Row],
        deltas: dict[int, list[ChoiceDelta]],
        finished: list[bool],
    ) -> list[Update | None]:
        out: list[Update | None] = []
        for r, req in enumerate(requests):
            if finished[r]:
                out.append(None)
                continue
            own = [row for row in rows if row.request == r]
            done = all(row.finish is not None for row in own)
            finished[r] = done
            out.append(Update(
                choices=deltas.get(r, []), prompt_tokens=req.prompt_tokens,
                completion_tokens=sum(row.sampled for row in own), done=done,
                batch_requests=len(requests), batch_rows=len(rows),
            ))
        return out
