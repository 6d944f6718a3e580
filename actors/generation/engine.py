"""The generation engine: one small interface, and our implementation of it.

The rollout worker asks an engine for samples through `GenerationEngine` only: token ids in,
token ids and log-probs out, so another backend (vLLM or SGLang on GPUs) can be put beside
LocalEngine without touching the role. LocalEngine runs our own decode loop (DecodeLoop): a batch
is one request stepped to its end; a Serve replica (a LocalEngine too, actors/serving/text_generator.py)
admits requests into the same loop as they arrive, its incremental mode. Beam search is Hugging
Face's `generate` with num_beams, called here only.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Protocol, cast

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from rayrlhf.actors.generation.decode_loop import DecodeLoop
from rayrlhf.actors.generation.model_runner import ModelRunner
from rayrlhf.actors.generation.requests import GenerationRequest, SamplingParams
from rayrlhf.actors.generation.sampler import mix_seed
from rayrlhf.actors.generation.tokens import left_pad


@dataclass
class Generation:
    """The rows of a generate call, prompt by prompt (row = prompt * n + sample)."""

    tokens: torch.Tensor
    """[rows, N] long: each row's sampled ids (its EOS included), then padding."""
    logprobs: torch.Tensor
    """[rows, N] float32: log softmax(logits / T) of each sampled id before the top_p cut (T = 1 for
    greedy rows); 0 after the row's end, and everywhere for beam search."""


class GenerationEngine(Protocol):
    def generate(self, prompts: list[list[int]], n: int, params: SamplingParams, max_rows: int | None = None) -> Generation:
        """n samples of each prompt (token ids), with params.seed as the seed of the RNG scheme
        (actors/generation/sampler.py). No stop strings: they are text, which a batch does not make.
        `max_rows`: at most this many rows (whole prompts' n samples) decode at once, which bounds the
        KV cache of a large call (an evaluation with many samples); None: all of them."""
        ...

    def beam_search(
        self, prompts: list[list[int]], n: int, num_beams: int, max_tokens: int, max_time: float | None = None,
        between_tokens: Callable[[], bool] | None = None,
    ) -> Generation:
        """The best n of num_beams beams of each prompt (deterministic), within max_time seconds if given.
        `between_tokens()` runs after each token (a server decodes other requests there); True ends the search."""
        ...


class _BetweenTokens(StoppingCriteria):
    """Hugging Face's hook after each token of `generate`: a call that may do other work and end the search."""

    def __init__(self, call: Callable[[], bool]) -> None:
        self.call = call

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        ends = torch.full((input_ids.shape[0],), self.call(), dtype=torch.bool, device=input_ids.device)
        return cast(torch.BoolTensor, ends)


class LocalEngine(ModelRunner):
    """GenerationEngine on our own KV-cached decode loop, on this process's device."""

    def generate(self, prompts: list[list[int]], n: int, params: SamplingParams, max_rows: int | None = None) -> Generation:
        if params.stop:
            raise ValueError("generate() takes no stop strings: they need the streamed text of a Serve request")
        parts = self._parts(prompts, n, params, max_rows)
        loop = DecodeLoop(self, max_rows=max(p.rows for p in parts) if max_rows is None else max(max_rows, n))
        pending, rows = deque(parts), []
        while pending or loop.requests:  # a part joins the running batch as soon as its rows fit
            while pending and pending[0].rows <= loop.free_rows:
                rows += loop.admit(pending.popleft())
            loop.step()
        width = max(len(row.tokens) for row in rows)
        tokens = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        logprobs = torch.zeros((len(rows), width), dtype=torch.float32)
        for i, row in enumerate(rows):
            tokens[i, :len(row.tokens)] = torch.tensor(row.tokens)
            logprobs[i, :len(row.logprobs)] = torch.tensor(row.logprobs)
        return Generation(tokens, logprobs)

    @staticmethod
    def _parts(prompts: list[list[int]], n: int, params: SamplingParams, max_rows: int | None) -> list[GenerationRequest]:
        """The call as requests of whole prompts, at most max_rows rows each. One part keeps the call's
        seed (the rollout's steps); part i of several draws from mix_seed(seed, i), so its samples
        depend on the call's seed and its place in the call only, not on when it joined the batch."""
        per = len(prompts) if max_rows is None else max(1, max_rows // n)
        chunks = [prompts[i:i + per] for i in range(0, len(prompts), per)]

        def seeded(i: int) -> SamplingParams:
            return params if len(chunks) == 1 or params.seed is None else replace(params, seed=mix_seed(params.seed, i))

        return [GenerationRequest(chunk, n, seeded(i), deadline=math.inf, text=False, logprobs=True)
                for i, chunk in enumerate(chunks)]  # fmt: skip

    @torch.no_grad()
    def beam_search(
        self, prompts: list[list[int]], n: int, num_beams: int, max_tokens: int, max_time: float | None = None,
        between_tokens: Callable[[], bool] | None = None,
    ) -> Generation:
        ids, mask = left_pad(prompts, self.pad_id)
        hook = StoppingCriteriaList([_BetweenTokens(between_tokens)] if between_tokens is not None else [])
        out = self.model.generate(  # type: ignore[operator]  # nn.Module.__getattr__ hides GenerationMixin; the neutral generation_config of ModelRunner
            input_ids=ids.to(self.device), attention_mask=mask.to(self.device), do_sample=False, num_beams=num_beams,
            num_return_sequences=n, max_new_tokens=max_tokens, early_stopping=True, max_time=max_time,
            stopping_criteria=hook,
        )
        tokens = out[:, ids.shape[1]:].cpu()
        return Generation(tokens, torch.zeros(tokens.shape, dtype=torch.float32))
