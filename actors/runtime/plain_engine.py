"""A single-process stand-in for the DeepSpeed engine: the same calls, plain torch underneath.

With one rank and no offload, ZeRO has nothing to partition: every stage is the identity, yet the
engine still copies gradients into flat buffers, runs its bookkeeping and copies the updated
partition back into the parameters on every step. This engine does what those calls mean and
nothing else, with the same arithmetic: each loss scaled by 1/accumulation, the global gradient
norm clipped to grad_clip at the accumulation boundary, then the optimizer step.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn


class PlainEngine:
    def __init__(self, module: nn.Module, optimizer: torch.optim.Optimizer, accumulation: int, grad_clip: float):
        self.module, self.optimizer = module, optimizer
        self.accumulation, self.grad_clip = accumulation, grad_clip
        self.device = next(module.parameters()).device
        self._micro_steps = 0
        self._grad_norm: float | None = None
        self.skipped_steps = 0
        """Updates not applied because the gradient norm was not finite (DeepSpeed's engine counts them too)."""
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
            if torch.isfinite(torch.tensor(self._grad_norm)):  # a NaN/inf gradient is never applied
                self.optimizer.step()
            else:
                self.skipped_steps += 1
            self.optimizer.zero_grad(set_to_none=True)
        self._micro_steps += 1

    def get_global_grad_norm(self) -> float | None:
        """The norm before clipping at the last boundary (what DeepSpeed reports)."""
        return self._grad_norm

    def save_checkpoint(self, folder: str, tag: str, save_latest: bool = False) -> None:
        """What DeepSpeed's engine writes for one rank: the module, the optimizer and the accumulation counter."""
        path = Path(folder) / tag
        path.mkdir(parents=True, exist_ok=True)
        state = {"module": self.module.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "micro_steps": self._micro_steps}  # fmt: skip
        torch.save(state, path / "plain_engine.pt")

    def load_checkpoint(self, folder: str, tag: str) -> tuple[str | None, dict]:
        """The inverse of save_checkpoint; (None, {}) when there is none (DeepSpeed's convention)."""
        file = Path(folder) / tag / "plain_engine.pt"
        if not file.is_file():
            return None, {}
        state = torch.load(file, map_location=self.device, weights_only=True)
        self.module.load_state_dict(state["module"])
        self.optimizer.load_state_dict(state["optimizer"])
        self._micro_steps = int(state["micro_steps"])
        return str(file), {}
