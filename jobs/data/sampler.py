"""The order training prompts are drawn in: part of a run checkpoint, so a resumed run draws what the
lost one would have drawn."""

from __future__ import annotations

import random
from typing import Any

from rayrlhf.actors.rl.trajectory import Prompt


class PromptSampler:
    """Epochs over the training prompts in a seeded order; its state is the rest of the epoch and the RNG."""

    def __init__(self, prompts: list[Prompt], seed: int) -> None:
        self.prompts = prompts
        self.rng = random.Random(seed)
        self.order: list[int] = []

    def draw(self, n: int) -> list[Prompt]:
        batch = []
        for _ in range(n):
            if not self.order:
                self.order = list(range(len(self.prompts)))
                self.rng.shuffle(self.order)
            batch.append(self.prompts[self.order.pop()])
        return batch

    def state_dict(self) -> dict[str, Any]:
        version, internal, gauss = self.rng.getstate()
        return {"order": list(self.order), "rng": [version, list(internal), gauss]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        version, internal, gauss = state["rng"]
        self.rng.setstate((version, tuple(internal), gauss))
        self.order = list(state["order"])
