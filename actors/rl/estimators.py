"""The advantage estimators that algorithm.name chooses (the table is actors/rl/algorithms.py).

Each takes the rank's whole TokenBatch, the step's KL coefficient and the algorithm section, and
returns per-token advantages and, for a critic, the value targets (else None); the math is in
advantages.py.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from rayrlhf.actors.rl.advantages import (
    expand_to_tokens,
    final_token_rewards,
    gae,
    grpo_advantages,
    masked_whiten,
    reinforce_advantages,
)
from rayrlhf.actors.rl.losses import kl_penalty

if TYPE_CHECKING:
    from rayrlhf.actors.rl.token_batch import TokenBatch
    from rayrlhf.jobs.config.run import AlgorithmConfig


def grpo(batch: TokenBatch, kl_coef: float, algo: AlgorithmConfig) -> tuple[Tensor, None]:
    """The group-relative sequence advantage on each response token."""
    seq = grpo_advantages(batch.scores, batch.group_ids, algo.normalize_std)
    return expand_to_tokens(seq, batch.response_mask), None


def dr_grpo(batch: TokenBatch, kl_coef: float, algo: AlgorithmConfig) -> tuple[Tensor, None]:
    """Dr. GRPO's advantage (Liu et al. 2025): reward minus the group mean, never over the group std
    (whatever normalize_std says), on each response token."""
    seq = grpo_advantages(batch.scores, batch.group_ids, normalize_std=False)
    return expand_to_tokens(seq, batch.response_mask), None


def rloo(batch: TokenBatch, kl_coef: float, algo: AlgorithmConfig) -> tuple[Tensor, None]:
    """REINFORCE with the leave-one-out baseline, on each response token."""
    return expand_to_tokens(reinforce_advantages(batch.scores, batch.group_ids), batch.response_mask), None


def reinforce_pp(batch: TokenBatch, kl_coef: float, algo: AlgorithmConfig) -> tuple[Tensor, None]:
    """REINFORCE++ (Hu 2025; OpenRLHF's `reinforce`): the return to go (gamma) of the KL-shaped
    per-token reward, whitened over the batch's response tokens (per rank): the batch mean is the
    baseline and the batch std the scale, no critic and no groups."""
    mask = batch.response_mask
    returns, _ = gae(_kl_shaped_rewards(batch, kl_coef), torch.zeros_like(mask), mask, algo.gamma, 1.0)
    return masked_whiten(returns, mask), None


def ppo_gae(batch: TokenBatch, kl_coef: float, algo: AlgorithmConfig) -> tuple[Tensor, Tensor]:
    """Whitened GAE (per rank) over the KL-shaped per-token reward, and the value targets."""
    mask = batch.response_mask
    assert batch.old_values is not None, "ppo needs the value head's estimates"
    advantages, returns = gae(_kl_shaped_rewards(batch, kl_coef), batch.old_values, mask, algo.gamma, algo.lam)
    return masked_whiten(advantages, mask), returns


def _kl_shaped_rewards(batch: TokenBatch, kl_coef: float) -> Tensor:
    """The score on the last response token minus kl_coef times the k1 KL to the reference on every token."""
    mask = batch.response_mask
    rewards = final_token_rewards(batch.scores, mask)
    if batch.ref_logprobs is not None:
        rewards = rewards - kl_coef * kl_penalty(batch.old_logprobs, batch.ref_logprobs, "k1") * mask
    return rewards
