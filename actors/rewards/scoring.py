"""The reward of a batch from its components: a loop, the running normalisation, length control.

    total = Σ_c weight_c · z_c(score_c(batch))  [or z(Σ_c weight_c · score_c), or no z at all]
            - the length penalties of length_control.py (added after normalisation)

Every component is computed for every row, whatever its weight, and returned raw so that the
driver logs them all (reward hacking shows up in the unweighted components). Pure logic: the
reward role (actors/reward_scorer.py) only adds how its components are built from the config.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import numpy as np

from rayrlhf.actors.rewards.components import RewardBatch, RewardComponent
from rayrlhf.actors.rewards.length_control import LengthControl
from rayrlhf.actors.rewards.metrics import words
from rayrlhf.actors.rewards.names import TOTAL
from rayrlhf.actors.rewards.normalizer import RunningNormalizer
from rayrlhf.actors.rl.trajectory import Rewards, Trajectory


class ComponentScorer:
    def __init__(
        self,
        components: Sequence[RewardComponent],
        normalize: Literal["none", "total", "components"],
        empty_reward: float,
        length: LengthControl,
    ) -> None:
        self.components: dict[str, RewardComponent] = {}
        for c in components:
            if c.name in self.components or c.name == TOTAL:
                raise ValueError(f"the name {c.name!r} is taken; give each reward component its own name")
            self.components[c.name] = c
        self.normalize, self.empty_reward, self.length = normalize, empty_reward, length
        self.normalizers = {name: RunningNormalizer() for name in (*self.components, TOTAL)}

    def score(self, traj: Trajectory, update_stats: bool = True) -> Rewards:
        """Rewards for one batch; `update_stats=False` (evaluation) leaves the normalisers as they are.

        Responses without a single word (empty, whitespace, punctuation only) get `empty_reward` as
        their total and are left out of the normaliser statistics: they are the degenerate optimum
        of r_freq (an empty answer scores 0, the maximum), not a sample of real answers.
        """
        batch = RewardBatch.of(traj)
        n = len(batch.responses)
        comps = {name: self._raw(c, batch, n) for name, c in self.components.items()}
        empty = np.array([not words(r) for r in batch.responses], dtype=bool)
        raw = np.zeros(n, dtype=np.float64)
        total = np.zeros(n, dtype=np.float64)
        for name, c in self.components.items():
            if c.weight == 0:
                continue
            values = comps[name].astype(np.float64)
            raw += c.weight * np.nan_to_num(values, nan=0.0)
            if self.normalize == "components":
                values = self._normalize(name, values, empty, update_stats)
            total += c.weight * np.nan_to_num(values, nan=0.0)
        if self.normalize == "total":
            total = self._normalize(TOTAL, total, empty, update_stats)
        elif self.normalize == "none":
            total = raw.copy()
        penalty = self.length.penalty(traj)
        total -= penalty
        raw -= penalty
        total[empty] = self.empty_reward
        raw[empty] = self.empty_reward
        return Rewards(
            total=total.astype(np.float32), raw_total=raw.astype(np.float32), components=comps,
            loss_mask=self.length.loss_mask(traj), info=self.length.info(traj, penalty),
        )

    @staticmethod
    def _raw(component: RewardComponent, batch: RewardBatch, n: int) -> np.ndarray:
        values = np.asarray(component.score(batch), dtype=np.float32)
        if values.shape != (n,):
            raise ValueError(f"reward component {component.name!r} gave {values.shape} values for {n} rows")
        return values

    def _normalize(self, name: str, values: np.ndarray, empty: np.ndarray, update: bool) -> np.ndarray:
        norm = self.normalizers[name]
        if update:
            norm.update(values[~empty])
        return norm.normalize(values, update=False)

    def state_dict(self) -> dict[str, Any]:
        return {name: norm.state_dict() for name, norm in self.normalizers.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name, norm in self.normalizers.items():
            norm.load_state_dict(state[name])
