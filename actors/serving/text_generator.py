"""A policy loaded for serving, and the pieces of per-row sampling that need no batch.

Why not `model.generate`: it takes one temperature / top_p / length for the whole batch and
returns only at the end. A server decodes requests with different settings side by side and
streams text as it comes, so actors/generation/decode_loop.py runs its own decode loop with per-row
temperature (0 means greedy), top_p, max_tokens, stop strings, seed and deadline; this module
holds what it is made of: the request and update types, stop-string helpers, the sampler, and
the model with its tokenizer.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from jinja2 import TemplateError

from rayrlhf.actors.runtime.devices import select_device, select_dtype
from rayrlhf.actors.runtime.host_memory import keep_freed_memory
from rayrlhf.actors.runtime.models import load_policy, transpose_output_head
from rayrlhf.actors.generation.tokens import eos_token_ids


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
    """Same seed, same prompt, same settings: same text, whatever else is being decoded."""


@dataclass(eq=False)
class GenerationRequest:
    """One client request: n samples of each prompt (prompts as token ids). Hashed by identity."""

    prompts: list[list[int]]
    n: int
    params: SamplingParams
    deadline: float
    """time.monotonic() after which its rows stop with finish_reason "timeout"."""
    cancelled: bool = False
    """Set by a caller that stopped listening; its rows leave the batch at the next step."""
    num_beams: int = 1
    """Above 1: beam search (actors/generation/beam_search.py) instead of the decode loop; n <= num_beams."""

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
    """Requests that took part in this step (decoded or prefilled)."""
    batch_rows: int
    """Sequences that took part in this step."""

    def then(self, later: Update) -> Update:
        """This update and the request's next one as a single update (for a reader that fell behind)."""
        choices = {c.index: c for c in self.choices}
        for c in later.choices:
            before = choices.get(c.index)
            choices[c.index] = c if before is None else ChoiceDelta(c.index, before.text + c.text, c.finish_reason)
        requests, rows = max((self.batch_requests, self.batch_rows), (later.batch_requests, later.batch_rows))
        return Update(
            choices=sorted(choices.values(), key=lambda c: c.index), prompt_tokens=later.prompt_tokens,
            completion_tokens=later.completion_tokens, done=later.done, batch_requests=requests, batch_rows=rows,
        )


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
    tokens = logits.argmax(dim=-1)
    sampled = torch.nonzero(temperature > 0).flatten()
    if len(sampled) == 0:  # all greedy: no softmax, no sort (a sort of the vocabulary per row is not free)
        return tokens
    logits, temperature, top_p = logits[sampled], temperature[sampled], top_p[sampled]
    probs = torch.softmax(logits / temperature.clamp(min=1e-5)[:, None], dim=-1)
    sorted_p, order = probs.sort(dim=-1, descending=True)
    outside = (sorted_p.cumsum(-1) - sorted_p) >= top_p[:, None]  # mass before this token already >= top_p
    outside[:, 0] = False  # the most likely token is always kept (top_p = 0 keeps only it)
    sorted_p = sorted_p.masked_fill(outside, 0.0)
    for i, row in enumerate(sampled.tolist()):
        pick = torch.multinomial(sorted_p[i], 1, generator=generators[row])
        tokens[row] = order[i, pick[0]]
    return tokens


def row_seed(seed: int, choice: int) -> int:
    """The seed of one choice's sampler: a function of the request's seed and the choice only."""
    return int(np.random.SeedSequence([seed, choice]).generate_state(1)[0])


def context_length(config) -> int:
    """Positions the model can attend over (prompt + completion), from its HF config."""
    return int(getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None) or 2048)


class TextGenerator:
    """A policy loaded for serving: tokenizer in and out, and forward passes that fail loudly."""

    def __init__(self, model_dir: str | Path, dtype: str, torch_threads: int, device: str = "cpu") -> None:
        torch.set_num_threads(torch_threads)
        self.device = select_device(device)
        keep_freed_memory(self.device)
        self.model, self.tokenizer = load_policy(model_dir, select_dtype(dtype, self.device), self.device)
        self.model.requires_grad_(False)
        transpose_output_head(self.model)
        self.eos_ids = eos_token_ids(self.model, self.tokenizer)
        self.pad_id = self.tokenizer.pad_token_id
        self.context_length = context_length(self.model.config)
        self._seeds = np.random.default_rng()
        self._tokenizer_lock = threading.Lock()
        """A server encodes new requests while the loop decodes in another thread; the Rust
        tokenizer refuses concurrent use ("Already borrowed")."""

    def encode_text(self, text: str) -> list[int]:
        with self._tokenizer_lock:
            return self.tokenizer(text).input_ids

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        """Token ids of the chat template with the assistant turn opened."""
        if not self.tokenizer.chat_template:
            raise ValueError("this model has no chat template: use /v1/completions")
        with self._tokenizer_lock:
            try:
                text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            except TemplateError as e:  # templates refuse some conversations (e.g. roles out of order)
                raise ValueError(f"the chat template refused these messages: {e}") from None
            return self.tokenizer(text, add_special_tokens=False).input_ids  # the template has its own

    def decode(self, tokens: list[int]) -> str:
        with self._tokenizer_lock:
            return self.tokenizer.decode(tokens, skip_special_tokens=True)

    def random_seed(self) -> int:
        """For a request without a seed."""
        return int(self._seeds.integers(2**62))

    @torch.no_grad()
    def forward(self, input_ids, attention_mask, position_ids, cache):
        """Last-position logits (float32, on the CPU where rows sample with their own generators) and the
        updated cache (on the model's device); GenerationError if any logit is not finite."""
        device = self.device
        out = self.model(
            input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
            position_ids=position_ids.to(device), cache=cache, use_cache=True, logits_to_keep=1,
        )
        logits = out.logits[:, -1, :].float().cpu()
        if not torch.isfinite(logits.sum()):  # any NaN or inf makes the sum one (far cheaper than isfinite().all())
            raise GenerationError(
                "the model produced non-finite logits (NaN or inf): the checkpoint's weights are likely diverged"
            )
        return logits, out.cache
