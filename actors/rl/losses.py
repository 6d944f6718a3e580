"""Per-token RL losses (the policy losses of actors/rl/algorithms.py's table, the value loss), the KL
penalty and its coefficient controllers.

Tensors are [B, T], aligned to token positions, with a float response `mask` (see advantages.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from rayrlhf.actors.rl.advantages import masked_mean

_MAX_LOG_RATIO = 20.0
"""k3 clamps log(ref/policy) to +-20 so exp() cannot overflow on far-off (e.g. padding) tokens."""

if TYPE_CHECKING:
    from rayrlhf.jobs.config.run import AlgorithmConfig, KLConfig


def kl_penalty(logp: Tensor, ref_logp: Tensor, estimator: str) -> Tensor:
    """Per-token estimate of KL(policy || reference) from log-probs of the sampled tokens.

    Schulman's estimators (http://joschu.net/blog/kl-approx.html): k1 = log(p/q) is unbiased but
    can be negative; k3 = q/p - log(q/p) - 1 is unbiased, always >= 0 and has lower variance.
    """
    if estimator == "k1":
        return logp - ref_logp
    if estimator == "k3":
        log_ratio = (ref_logp - logp).clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)
        return torch.exp(log_ratio) - log_ratio - 1
    raise ValueError(f"unknown kl.estimator {estimator!r}: expected 'k1' or 'k3'")


def ppo_clip(
    logp: Tensor, anchor_logp: Tensor, advantages: Tensor, mask: Tensor, algo: AlgorithmConfig
) -> tuple[Tensor, dict[str, Tensor]]:
    """The PPO clipped surrogate, per token: -min(r * A, clip(r, 1 - eps_low, 1 + eps_high) * A) with
    r = pi_theta / pi_anchor; and the fraction of clipped tokens. eps_high > eps_low is DAPO's
    clip-higher (algorithm.clip_eps_low / clip_eps_high; both clip_eps by default).

    clip_frac is the masked fraction of tokens where the clipped term is strictly smaller than
    the unclipped one, so min() takes it and the token's gradient is zero: ratio > 1 + eps with
    A > 0, or ratio < 1 - eps with A < 0. Tokens outside the range on the other side (where
    clipping would be optimistic) keep their gradient and do not count. It carries no gradient.
    """
    log_ratio = torch.where(mask != 0, logp - anchor_logp.detach(), torch.zeros_like(logp))
    ratio = torch.exp(log_ratio)
    unclipped = ratio * advantages
    clipped = ratio.clamp(1 - algo.eps_low, 1 + algo.eps_high) * advantages
    clip_frac = masked_mean((clipped < unclipped).to(mask.dtype), mask).detach()
    return -torch.minimum(unclipped, clipped), {"clip_frac": clip_frac}


def cispo(
    logp: Tensor, anchor_logp: Tensor, advantages: Tensor, mask: Tensor, algo: AlgorithmConfig
) -> tuple[Tensor, dict[str, Tensor]]:
    """CISPO (MiniMax-M1, 2025), per token: -sg(clip(r, 1 - eps_low, 1 + eps_high)) * A * log pi_theta.

    The importance weight is clipped and carries no gradient, so every token keeps the gradient
    -w A grad log pi (PPO's clip zeroes it); at r = 1 that is PPO's. clip_frac: the fraction of tokens
    whose weight was clipped.
    """
    ratio = torch.exp(torch.where(mask != 0, logp - anchor_logp, torch.zeros_like(logp))).detach()
    weight = ratio.clamp(1 - algo.eps_low, 1 + algo.eps_high)
    clip_frac = masked_mean((weight != ratio).to(mask.dtype), mask)
    return -weight * advantages * logp, {"clip_frac": clip_frac}


def gspo(
    logp: Tensor, anchor_logp: Tensor, advantages: Tensor, mask: Tensor, algo: AlgorithmConfig
) -> tuple[Tensor, dict[str, Tensor]]:
    """GSPO (Zheng et al. 2025), in its GSPO-token form: on every token of answer i,
    -min(s * A, clip(s, 1 - eps_low, 1 + eps_high) * A) with s = sg(s_i) * pi_theta / sg(pi_theta) and
    s_i = exp(mean over the answer of log(pi_theta / pi_anchor)), the sequence-level ratio.

    Its value is s_i and its gradient s_i grad log pi on each token, so averaged by
    seq-mean-token-mean (the paper's 1/G sum_i 1/|y_i| sum_t, which `policy_loss: gspo` chooses by
    default) it is GSPO's gradient s_i A_i grad log s_i, clipped per sequence. The paper's clip
    range is tiny (clip_eps_low 3e-4, clip_eps_high 4e-4). clip_frac: the fraction of tokens in clipped answers.
    """
    log_ratio = torch.where(mask != 0, logp - anchor_logp.detach(), torch.zeros_like(logp))
    seq_log_ratio = masked_mean(log_ratio, mask, dim=-1).detach().clamp(max=_MAX_LOG_RATIO)
    ratio = torch.exp(seq_log_ratio[:, None] + logp - logp.detach())
    unclipped = ratio * advantages
    clipped = ratio.clamp(1 - algo.eps_low, 1 + algo.eps_high) * advantages
    clip_frac = masked_mean((clipped < unclipped).to(mask.dtype), mask).detach()
    return -torch.minimum(unclipped, clipped), {"clip_frac": clip_frac}


def clipped_value_loss(values: Tensor, old_values: Tensor, returns: Tensor, clip: float) -> Tensor:
    """PPO value loss, per token: half the worse of the plain and the clipped squared error, so the value
    head cannot move further than `clip` from the rollout-time value in one update to fit the return.
    The objective aggregates it as it does the policy loss."""
    clipped = old_values + (values - old_values).clamp(-clip, clip)
    return 0.5 * torch.maximum((values - returns) ** 2, (clipped - returns) ** 2)


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Entropy of softmax(logits) over the last dim: [B, T, V] -> [B, T].

    log_softmax keeps large logits stable; clamping -inf log-probs (masked vocabulary entries)
    to the dtype's minimum makes their 0 * log 0 term 0 instead of NaN.
    """
    logp = torch.log_softmax(logits, dim=-1)
    return -(logp.exp() * logp.clamp(min=torch.finfo(logp.dtype).min)).sum(dim=-1)


class FixedKLController:
    """A constant KL coefficient."""

    def __init__(self, coef: float):
        self.value = coef

    def update(self, current_kl: float, n_steps: int) -> None:
        pass


class AdaptiveKLController:
    """Proportional controller steering the measured KL towards `target` (Ziegler et al. 2019).

    The relative error is clipped to +-0.2, so the coefficient changes by at most
    0.2 * n_steps / horizon per update.
    """

    def __init__(self, init_coef: float, target: float, horizon: int):
        self.value = init_coef
        self.target = target
        self.horizon = horizon

    def update(self, current_kl: float, n_steps: int) -> None:
        err = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + err * n_steps / self.horizon


def make_kl_controller(kl: KLConfig) -> FixedKLController | AdaptiveKLController:
    """The controller the run's KL section asks for."""
    if kl.adaptive:
        return AdaptiveKLController(kl.coef, kl.target, kl.horizon)
    return FixedKLController(kl.coef)
