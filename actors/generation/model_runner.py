"""A loaded policy made ready for decoding: the model side of the generation engine.

Both roles that generate (the rollout worker, a Serve replica) load their policy their own way and
hand it here, so they decode the same model the same way: gradients off, linear layers on oneDNN's
packed GEMM on the CPU (actors/runtime/cpu_linear.py), every id that ends a response, and a neutral
generation_config (the model's own top_k, repetition penalty, ... play no part, in our loop or in HF's
beam search).
"""

from __future__ import annotations

import threading

import numpy as np
import torch
from transformers import GenerationConfig, PreTrainedModel

from rayrlhf.actors.generation.tokens import eos_token_ids
from rayrlhf.actors.runtime.cpu_linear import pack_linears


class GenerationError(RuntimeError):
    """The model could not produce text (e.g. non-finite logits from a diverged checkpoint)."""


class ModelRunner:
    """The policy on its device: one forward at a time, ids to text."""

    def __init__(self, model: PreTrainedModel, tokenizer) -> None:
        model.requires_grad_(False)
        pack_linears(model)  # MKL's sgemm is the slow path on the CPUs we measured (cpu_linear.py)
        self.model, self.tokenizer = model, tokenizer
        self.device = model.device
        self.eos_ids = eos_token_ids(model, tokenizer)
        self.pad_id = tokenizer.pad_token_id
        model.generation_config = GenerationConfig(
            eos_token_id=self.eos_ids, pad_token_id=self.pad_id, bos_token_id=tokenizer.bos_token_id
        )
        self._seeds = np.random.default_rng()
        self._tokenizer_lock = threading.Lock()
        """A server encodes new requests while the loop decodes in another thread; the Rust
        tokenizer refuses concurrent use ("Already borrowed")."""

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
        if not torch.isfinite(logits.sum()):  # any NaN or inf makes the sum one (15x cheaper than isfinite().all())
            raise GenerationError(
                "the model produced non-finite logits (NaN or inf): the checkpoint's weights are likely diverged"
            )
        return logits, out.cache
