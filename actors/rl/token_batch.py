"""The learner's typed token batch: a rank's shard as tensors, built once per step.

Nothing is added to it in place: the advantages (and PPO's values and returns) make a new batch
(`dataclasses.replace`), micro-batches are slices of it, and the proximal log-probs of a pipelined
run (taken in the first epoch, actors/rl/offpolicy.py) are a field of the micro-batch kept for the
later epochs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields, replace

import torch
from torch import Tensor

from rayrlhf.actors.rl.logprobs import from_numpy
from rayrlhf.actors.rl.trajectory import LearnerBatch


@dataclass(frozen=True)
class TokenBatch:
    input_ids: Tensor
    """[B, T] long: left-padded prompt, then the right-padded response."""
    attention_mask: Tensor
    """[B, T] long."""
    response_mask: Tensor
    """[B, T] float: 1 on the response tokens of rows that enter the loss (the reward may drop rows)."""
    old_logprobs: Tensor
    """[B, T] float: log-probs under the policy that sampled (the behaviour policy)."""
    scores: Tensor
    """[B] float: the rewards the learner optimises."""
    group_ids: Tensor
    """[B] long: the k samples of a prompt share one."""
    ref_logprobs: Tensor | None = None
    """[B, T] float: the reference policy's log-probs; None when the run has no KL term."""
    old_values: Tensor | None = None
    """[B, T] float: a critic's values under the pre-update weights (ppo)."""
    advantages: Tensor | None = None
    """[B, T] float, 0 outside the response."""
    returns: Tensor | None = None
    """[B, T] float: a critic's value targets (ppo)."""
    proximal_logprobs: Tensor | None = None
    """[B, T] float: the learner's own log-probs in the first epoch (the pre-update weights), kept for
    the later epochs of a pipelined run's loss."""

    @classmethod
    def from_shard(cls, shard: LearnerBatch, device: torch.device | str) -> TokenBatch:
        traj = shard.trajectory
        batch = cls(
            input_ids=from_numpy(traj.input_ids).long(),
            attention_mask=from_numpy(traj.attention_mask).long(),
            response_mask=from_numpy(traj.response_mask * shard.loss_mask[:, None]).float(),
            old_logprobs=from_numpy(traj.old_logprobs).float(),
            scores=from_numpy(shard.scores),
            group_ids=from_numpy(traj.group_ids).long(),
            ref_logprobs=None if shard.ref_logprobs is None else from_numpy(shard.ref_logprobs).float(),
        )
        return batch._map(lambda t: t.to(device))

    def __len__(self) -> int:
        return len(self.input_ids)

    def _map(self, fn: Callable[[Tensor], Tensor]) -> TokenBatch:
        return replace(self, **{f.name: fn(t) for f in fields(self) if (t := getattr(self, f.name)) is not None})

    def rows(self, start: int, stop: int) -> TokenBatch:
        return self._map(lambda t: t[start:stop])

    def micro_batches(self, size: int) -> list[TokenBatch]:
        """Row slices of `size`, each cut to the columns where it has any real token (saves compute)."""
        out = []
        for start in range(0, len(self), size):
            rows = self.rows(start, start + size)
            used = rows.attention_mask.any(dim=0).nonzero().squeeze(-1)
            lo, hi = int(used.min()), int(used.max()) + 1
            out.append(rows._map(lambda t, lo=lo, hi=hi: t[:, lo:hi] if t.dim() == 2 else t))  # type: ignore[misc]
        return out
