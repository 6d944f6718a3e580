"""The correction of the policy loss for samples drawn by an older policy (the asynchronous pipeline),
and its diagnostics.

Three policies meet in an asynchronous step: the behaviour policy that sampled (its log-probs are
the trajectory's `old_logprobs`, from the rollout workers, up to `pipeline.max_staleness` versions
old), the learner's weights at the start of the step (the proximal policy) and the weights being
optimised. Peers correct for the gap in two ways:
- truncated importance sampling (verl's TIS, OpenRLHF): the PPO loss against the learner's own
  recomputed log-probs, each token weighted by min(pi_old / pi_rollout, cap), detached;
- AReaL's decoupled PPO: clip the ratio pi_theta / pi_proximal (the trust region around the
  weights the step starts from) and weight by pi_proximal / pi_behaviour (AReaL drops tokens whose
  weight passes its cap).
Both need log-probs of the pre-update weights, which peers get from an extra forward pass. Here
they cost nothing: the learner steps once per pass over the batch, so every forward of the first
pass runs under the pre-update weights; their log-probs, detached, are the proximal log-probs
(kept for later passes when algorithm.epochs > 1). With them this is the decoupled objective with
a truncated (clamped, not dropped) weight: one epoch gives exactly the truncated-IS policy gradient
-min(w, cap) * A * grad log pi_theta, and the PPO clip acts only from the second epoch on, around
the step's starting weights rather than around a stale behaviour policy. Clamping keeps every
token's gradient (bounded) where dropping would silently lose samples.

actors/rl/objective.py applies it to any policy loss of the table: the loss's ratio is taken against
the proximal log-probs, and `importance_weights` multiply its per-token values.
"""

from __future__ import annotations

import torch
from torch import Tensor

from rayrlhf.actors.rl.advantages import masked_mean
from rayrlhf.actors.rl.losses import kl_penalty

_MAX_LOG_WEIGHT = 20.0
"""log(pi_proximal / pi_behaviour) is clamped to +-20 before exp(), so padding cannot overflow."""


def admitted(train_version: int, sample_version: int, max_staleness: int) -> bool:
    """Whether a batch sampled by `sample_version` may be trained by the learner at `train_version`:
    the one rule of the driver's admission control (jobs/run/pipeline.py) and the learner's check."""
    return 0 <= train_version - sample_version <= max_staleness


def importance_weights(prox_logp: Tensor, behav_logp: Tensor, mask: Tensor, cap: float) -> tuple[Tensor, Tensor]:
    """Per-token pi_proximal / pi_behaviour truncated at `cap` (1 outside the mask), no gradient;
    and the masked fraction of tokens whose weight was cut."""
    log_w = torch.where(mask != 0, prox_logp - behav_logp, torch.zeros_like(prox_logp))
    raw = torch.exp(log_w.detach().clamp(-_MAX_LOG_WEIGHT, _MAX_LOG_WEIGHT))
    return raw.clamp(max=cap), masked_mean((raw > cap).to(mask.dtype), mask)


def mismatch_kl(prox_logp: Tensor, behav_logp: Tensor, mask: Tensor) -> Tensor:
    """KL(pi_behaviour || pi_learner) per response token, estimated (k3, >= 0) on the sampled tokens
    from the learner's pre-update log-probs and the rollout's: staleness plus numerical mismatch."""
    return masked_mean(kl_penalty(behav_logp, prox_logp.detach(), "k3"), mask).detach()
