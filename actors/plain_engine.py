"""A single-process stand-in for the DeepSpeed engine: the same calls, plain torch underneath.

With one rank and no offload, ZeRO has nothing to partition: every stage is the identity, yet the
engine still copies gradients into flat buffers, runs its bookkeeping and copies the updated
partition back into the parameters on every step. This engine does what those calls mean and
nothing else, with the same arithmetic: each loss scaled by 1/accumulation, the global gradient
norm clipped to grad_clip at the accumulation boundary, then the optimizer step.
"""

from __future__ import annotations

import torch
from torch import nn


class PlainEngine:
    def __init__(self, module: nn.Module, optimizer: torch.optim.Optimizer, accumulation: int, grad_clip: float):
        self.module, self.optimizer = module, optimizer
        self.accumulation, self.grad_clip = accumulation, grad_clip
        self.device = next(module.parameters()).device
        self._micro_steps = 0
        self._grad_norm: float | None = None
        self._params = [p for p in module.parameters() if p.requires_grad]

    def __call__(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.accumulation if self.accumulation > 1 else loss).backward()

    def is_gradient_accumulation_boundary(self) -> bool:
        return (self._micro_steps + 1) % self.accumulation == 0

    def step(self) -> None:
        if self.is_gradient_accumulation_boundary():
            self._grad_norm = float(torch.nn.utils.clip_grad_norm_(self._params, self.grad_clip))
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        self._micro_steps += 1

    def get_global_grad_norm(self) -> float | None:
        """The norm before clipping at the last boundary (what DeepSpeed reports)."""
        return self._grad_norm
