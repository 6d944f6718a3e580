"""Length and truncation control: what a response's length costs in the reward, and in the loss.

Without it, a reward that grows with length (r_sim finds more of the reference in a longer
answer) drives responses to the token cap: the default run went from 22.8 to 30.6 of 32 tokens.

- Soft overlong penalty (DAPO, Yu et al. 2025): with a budget of L tokens and a buffer of the last
  B = overlong_buffer * L of them, a response of n tokens loses
      overlong_penalty * clip((n - (L - B)) / B, 0, 1)
  from its total: nothing up to L - B, the full penalty at the limit, linear in between.
- A response cut at the limit without EOS (`truncation`): `penalize` takes `truncation_penalty`
  more off its total, `mask` keeps its reward but drops its tokens from the policy loss (DAPO's
  overlong filtering: a cut answer is not judged as if it were complete), `keep` does nothing.
Penalties are in units of the total and applied after normalisation (to raw_total too).
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from rayrlhf.actors.rewards.metrics import words
from rayrlhf.actors.rl.trajectory import Trajectory


def overlong_penalty(lengths: np.ndarray, budget: int, penalty: float, buffer_frac: float) -> np.ndarray:
    """DAPO's soft overlong penalty of each length (>= 0; subtract it from the reward)."""
    lengths = np.asarray(lengths, dtype=np.float64)
    if budget <= 0 or penalty == 0:
        return np.zeros_like(lengths)
    buffer = max(1, round(buffer_frac * budget))
    return penalty * np.clip((lengths - (budget - buffer)) / buffer, 0.0, 1.0)


class LengthControl:
    def __init__(
        self,
        overlong_penalty: float,
        overlong_buffer: float,
        truncation: Literal["penalize", "mask", "keep"],
        truncation_penalty: float,
    ) -> None:
        self.overlong, self.buffer = overlong_penalty, overlong_buffer
        self.truncation, self.truncation_penalty = truncation, truncation_penalty

    @staticmethod
    def truncated(traj: Trajectory) -> np.ndarray:
        """Rows cut at the token limit without EOS (none, if the batch does not say)."""
        if len(traj.truncated) != len(traj):
            return np.zeros(len(traj), dtype=bool)
        return np.asarray(traj.truncated, dtype=bool)

    def penalty(self, traj: Trajectory) -> np.ndarray:
        """What each row's length takes off its total (>= 0)."""
        out = overlong_penalty(traj.response_lengths, traj.max_new_tokens, self.overlong, self.buffer)
        if self.truncation == "penalize":
            out = out + self.truncation_penalty * self.truncated(traj)
        return out

    def loss_mask(self, traj: Trajectory) -> np.ndarray | None:
        """1 for rows the policy loss uses, 0 for those it drops; None: all of them."""
        if self.truncation != "mask":
            return None
        return (~self.truncated(traj)).astype(np.float32)

    def info(self, traj: Trajectory, penalty: np.ndarray) -> dict[str, np.ndarray]:
        """Per-row diagnostics for the health monitors: cut or not, the length penalty, and the
        answer's length in words over its reference's (NaN without a reference)."""
        ratio = np.full(len(traj), np.nan, dtype=np.float32)
        for i, (response, reference) in enumerate(zip(traj.responses, traj.references)):
            ref_words = len(words(reference)) if reference else 0
            if ref_words:
                ratio[i] = len(words(response)) / ref_words
        return {
            "truncated_frac": self.truncated(traj).astype(np.float32),
            "length_penalty": np.asarray(penalty, dtype=np.float32),
            "length_ratio": ratio,
        }

