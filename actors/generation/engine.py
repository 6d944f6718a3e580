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
from dataclasses import dataclass
from typing import Protocol

import torch

from rayrlhf.actors.generation.decode_loop import DecodeLoop
from rayrlhf.actors.generation.model_runner import ModelRunner
from rayrlhf.actors.generation.requests import GenerationRequest, SamplingParams
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
    def generate(self, prompts: list[list[int]], n: int, params: SamplingParams) -> Generation:
        """n samples of each prompt (token ids), with params.seed as the seed of the RNG scheme
        (actors/generation/sampler.py). No stop strings: they are text, which a batch does not make."""
        ...

    def beam_search(
        self, prompts: list[list[int]], n: int, num_beams: int, max_tokens: int, max_time: float | None = None
    ) -> Generation:
        """The best n of num_beams beams of each prompt (deterministic), within max_time seconds if given."""
        ...


class LocalEngine(ModelRunner):
    """GenerationEngine on our own KV-cached decode loop, on this process's device."""

    def generate(self, prompts: list[list[int]], n: int, params: SamplingParams) -> Generation:
        if params.stop:
            raise ValueError("generate() takes no stop strings: they need the streamed text of a Serve request")
        request = GenerationRequest(prompts, n, params, deadline=math.inf, text=False, logprobs=True)
        loop = DecodeLoop(self, max_rows=request.rows)
        rows = loop.admit(request)
        while loop.requests:
            loop.step()
        width = max(len(row.tokens) for row in rows)
        tokens = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        logprobs = torch.zeros((len(rows), width), dtype=torch.float32)
        for i, row in enumerate(rows):
            tokens[i, :len(row.tokens)] = torch.tensor(row.tokens)
            logprobs[i, :len(row.logprobs)] = torch.tensor(row.logprobs)
        return Generation(tokens, logprobs)

    @torch.no_grad()
    def beam_search(
        self, prompts: list[list[int]], n: int, num_beams: int, max_tokens: int, max_time: float | None = None
    ) -> Generation:
        ids, mask = left_pad(prompts, self.pad_id)
        out = self.model.generate(  # type: ignore[operator]  # nn.Module.__getattr__ hides GenerationMixin; the neutral generation_config of ModelRunner
            input_ids=ids.to(self.device), attention_mask=mask.to(self.device), do_sample=False, num_beams=num_beams,
            num_return_sequences=n, max_new_tokens=max_tokens, early_stopping=True, max_time=max_time,
        )
        tokens = out[:, ids.shape[1]:].cpu()
        return Generation(tokens, torch.zeros(tokens.shape, dtype=torch.float32))
