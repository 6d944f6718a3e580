"""The loss aggregations of algorithm.loss_aggregation (named as verl's loss_agg_mode).

Each returns (total, units) for the rows it is given; each term of the step's loss (the policy loss,
the KL, the entropy bonus, the value loss) is its total over the units summed over the whole step:
the rank's batch and every data-parallel rank. The learner takes the step's units once, before its
micro-batch loop (`Learner.learn`), and each micro-batch divides its own totals by them
(objective.py), so the loss and its gradient do not depend on how the step is cut into
micro-batches (a micro-batch token-mean would weigh the tokens of a short micro-batch more).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from rayrlhf.jobs.config.run import AlgorithmConfig


def _masked(per_token: Tensor, mask: Tensor) -> Tensor:
    """per_token * mask, with values outside the mask never read (non-finite padding stays out)."""
    return torch.where(mask != 0, per_token * mask, torch.zeros_like(per_token))


def _rows(mask: Tensor) -> Tensor:
    """The rows with at least one token in the loss (the reward may drop rows)."""
    return (mask.sum(-1) > 0).sum().to(mask.dtype)


def token_mean(per_token: Tensor, mask: Tensor, algo: AlgorithmConfig) -> tuple[Tensor, Tensor]:
    """The mean over every response token of the step: a long answer weighs by its length (DAPO's
    token-level loss)."""
    return _masked(per_token, mask).sum(), mask.sum()


def seq_mean_token_mean(per_token: Tensor, mask: Tensor, algo: AlgorithmConfig) -> tuple[Tensor, Tensor]:
    """Each answer's token mean, averaged over answers (the GRPO paper's 1/G sum_i 1/|o_i| sum_t)."""
    lengths = mask.sum(-1)
    per_row = _masked(per_token, mask).sum(-1) / torch.where(lengths > 0, lengths, torch.ones_like(lengths))
    return per_row.sum(), _rows(mask)


def seq_mean_token_sum(per_token: Tensor, mask: Tensor, algo: AlgorithmConfig) -> tuple[Tensor, Tensor]:
    """Each answer's token sum, averaged over answers."""
    return _masked(per_token, mask).sum(), _rows(mask)


def seq_mean_token_sum_norm(per_token: Tensor, mask: Tensor, algo: AlgorithmConfig) -> tuple[Tensor, Tensor]:
    """Each answer's token sum over a constant (algorithm.loss_scale_tokens, by default
    rollout.max_new_tokens), averaged over answers: Dr. GRPO's unbiased loss, no 1/|o_i| length bias.
    (verl divides the sum over the batch by the constant alone, so its loss grows with the batch.)"""
    assert algo.loss_scale_tokens, "seq-mean-token-sum-norm needs algorithm.loss_scale_tokens"
    return _masked(per_token, mask).sum(), _rows(mask) * algo.loss_scale_tokens
