"""The learner's loss on one micro-batch, given the policy's forward pass over it.

The configured policy loss (actors/rl/algorithms.py), corrected for a pipelined run's stale samples
(actors/rl/offpolicy.py); minus the entropy bonus; plus the KL to the reference (estimators that put
it in the reward leave it out) or, with a critic, the value loss. Every term is aggregated alike
(algorithm.loss_aggregation, normalised over the whole step: actors/rl/aggregation.py), so the loss
and its gradient do not depend on the micro-batching. Pure tensor code, so tests pin its numbers
without a model.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from rayrlhf.actors.rl.advantages import masked_mean
from rayrlhf.actors.rl.algorithms import ADVANTAGE_ESTIMATORS, LOSS_AGGREGATIONS, POLICY_LOSSES, load
from rayrlhf.actors.rl.losses import clipped_value_loss, kl_penalty
from rayrlhf.actors.rl.offpolicy import importance_weights, mismatch_kl
from rayrlhf.actors.rl.token_batch import TokenBatch

if TYPE_CHECKING:
    from rayrlhf.jobs.config.run import AlgorithmConfig


class Objective:
    def __init__(self, algorithm: AlgorithmConfig, kl_estimator: str, off_policy_cap: float | None):
        """`off_policy_cap`: the importance-weight cap of a pipelined run (pipeline.is_cap); None on-policy."""
        self.algorithm, self.kl_estimator, self.off_policy_cap = algorithm, kl_estimator, off_policy_cap
        estimator = ADVANTAGE_ESTIMATORS[algorithm.name]
        self.critic, self.kl_in_reward = estimator.critic, estimator.kl_in_reward
        self.policy_loss = load(POLICY_LOSSES[algorithm.policy_loss])
        self.aggregate = load(LOSS_AGGREGATIONS[algorithm.loss_aggregation])

    def units(self, mask: Tensor) -> float:
        """The aggregation's normaliser (tokens, answers, ...) of the rows of `mask`."""
        return float(self.aggregate(mask, mask, self.algorithm)[1])

    def __call__(
        self, rows: TokenBatch, logprobs: Tensor, entropy: Tensor, values: Tensor | None, proximal: Tensor,
        kl_coef: float, units: float | None = None,
    ) -> tuple[Tensor, dict[str, float]]:
        """`proximal`: the learner's log-probs under the step's starting weights (detached). `units`: the
        step's aggregation normaliser over the number of micro-batch losses the engine averages (micro-
        batches x data-parallel ranks), so that average is the step's loss; None: these rows are the whole
        step. The logged kl, entropy and value_loss are token means over these rows (the adaptive KL
        controller reads a per-token KL whatever the aggregation)."""
        algo, mask = self.algorithm, rows.response_mask
        if self.off_policy_cap is None:  # on-policy: the rollout's log-probs are the pre-update policy's
            anchor, weights, is_clip_frac = rows.old_logprobs, None, torch.zeros(())
        else:  # decoupled PPO with truncated importance weights, no extra forward (actors/rl/offpolicy.py)
            anchor = proximal
            weights, is_clip_frac = importance_weights(proximal, rows.old_logprobs, mask, self.off_policy_cap)
        divisor = max(self.units(mask) if units is None else units, 1e-12)

        def aggregated(per_token: Tensor) -> Tensor:  # an empty step's total is 0
            return self.aggregate(per_token, mask, algo)[0] / divisor

        per_token, policy_stats = self.policy_loss(logprobs, anchor, rows.advantages, mask, algo)
        pg_loss = aggregated(per_token if weights is None else weights * per_token)
        loss = pg_loss - algo.entropy_coef * aggregated(entropy)
        stats = {"pg_loss": pg_loss.item(), "entropy": masked_mean(entropy, mask).item(),
                 **{k: v.item() for k, v in policy_stats.items()},
                 "pipeline/mismatch_kl": mismatch_kl(proximal, rows.old_logprobs, mask).item(),
                 "pipeline/is_clip_frac": is_clip_frac.item()}  # fmt: skip
        if rows.ref_logprobs is not None:
            kl = kl_penalty(logprobs, rows.ref_logprobs, self.kl_estimator)
            stats["kl"] = masked_mean(kl, mask).item()
            if not self.kl_in_reward:
                loss = loss + kl_coef * aggregated(kl)
        else:  # no reference policy: the run has no KL term
            stats["kl"] = 0.0
        if self.critic:
            assert values is not None and rows.old_values is not None and rows.returns is not None  # a critic's batch
            value_loss = clipped_value_loss(values, rows.old_values, rows.returns, algo.value_clip)
            loss = loss + algo.vf_coef * aggregated(value_loss)
            stats["value_loss"] = masked_mean(value_loss, mask).item()
        stats["loss"] = loss.item()
        return loss, stats
