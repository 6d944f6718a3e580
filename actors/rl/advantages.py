"""Advantage estimators: GRPO, REINFORCE with a leave-one-out baseline (RLOO), and GAE for PPO.

Token-level tensors are [B, T] and aligned to token positions: position t holds the quantity for
token t. `mask` is a float [B, T] tensor, 1 on response tokens (a left-padded prompt comes before
them, right padding after); the response region of a row is contiguous.
"""

from __future__ import annotations

import torch
from torch import Tensor


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """sum(x * mask) / sum(mask); 0 where the mask is empty.

    Values outside the mask are never read, so non-finite padding cannot leak in as NaN.
    """
    weighted = torch.where(mask != 0, x * mask, torch.zeros_like(x))
    if dim is None:
        total, count = weighted.sum(), mask.sum()
    else:
        total, count = weighted.sum(dim), mask.sum(dim)
    # Divide by a safe count: where() alone would still backpropagate the NaN of 0/0.
    safe = torch.where(count > 0, count, torch.ones_like(count))
    return torch.where(count > 0, total / safe, torch.zeros_like(total))


def masked_whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """Zero-mean, unit-variance over the masked entries (population variance); 0 outside the mask.

    shift_mean=False only rescales, keeping the original mean (as TRL does for PPO advantages).
    """
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    whitened = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(mask != 0, whitened, torch.zeros_like(whitened))


def _as_float(x: Tensor) -> Tensor:
    return x if x.is_floating_point() else x.float()


def _group_stats(rewards: Tensor, group_ids: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per-row group size, group sum and group sum of squared deviations (any group order)."""
    uniq, inverse = torch.unique(group_ids, return_inverse=True)
    counts = torch.zeros(len(uniq), dtype=rewards.dtype, device=rewards.device).index_add_(
        0, inverse, torch.ones_like(rewards)
    )
    sums = torch.zeros_like(counts).index_add_(0, inverse, rewards)
    means = sums / counts
    sq_dev = torch.zeros_like(counts).index_add_(0, inverse, (rewards - means[inverse]) ** 2)
    return counts[inverse], sums[inverse], sq_dev[inverse]


def grpo_advantages(rewards: Tensor, group_ids: Tensor, normalize_std: bool, eps: float = 1e-6) -> Tensor:
    """Group-relative advantage: (r - group mean) [/ (group std + eps)]; singleton groups get 0.

    The std is torch's unbiased one (n - 1), as in the GRPO paper and TRL. Statistics are taken in
    float64, and a group whose rewards are all equal gets exactly 0: in float32 the mean of 16
    copies of 0.7 misses 0.7 by rounding, and that residue over (std ~ 0 + eps) was ~0.1.
    """
    rewards = _as_float(rewards)
    r64 = rewards.double()
    count, total, sq_dev = _group_stats(r64, group_ids)
    centred = r64 - total / count
    if normalize_std:
        std = torch.sqrt(sq_dev / (count - 1).clamp(min=1))
        centred = centred / (std + eps)
    _, inverse = torch.unique(group_ids, return_inverse=True)
    low = torch.full_like(r64, torch.inf).scatter_reduce(0, inverse, r64, "amin")[inverse]
    high = torch.full_like(r64, -torch.inf).scatter_reduce(0, inverse, r64, "amax")[inverse]
    varied = (count > 1) & (high > low)
    return torch.where(varied, centred, torch.zeros_like(centred)).to(rewards.dtype)


def reinforce_advantages(rewards: Tensor, group_ids: Tensor) -> Tensor:
    """REINFORCE with a leave-one-out baseline (RLOO, Ahmadian et al. 2024).

    Baseline of row i: the mean reward of the other members of its group. A singleton group has
    no other members, so it falls back to the mean of the rest of the batch; a batch of one gets 0.
    """
    rewards = _as_float(rewards)
    count, total, _ = _group_stats(rewards, group_ids)
    group_base = (total - rewards) / (count - 1).clamp(min=1)
    n = rewards.numel()
    batch_base = (rewards.sum() - rewards) / max(n - 1, 1)
    baseline = torch.where(count > 1, group_base, batch_base)
    adv = rewards - baseline
    return adv if n > 1 else torch.zeros_like(adv)


def expand_to_tokens(seq_values: Tensor, mask: Tensor) -> Tensor:
    """A per-sequence value on each of that row's response tokens, 0 elsewhere."""
    return seq_values.unsqueeze(-1) * mask


def final_token_rewards(scores: Tensor, mask: Tensor) -> Tensor:
    """The sequence score on each row's last response token (0 elsewhere; empty rows get nothing)."""
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    last = torch.where(mask != 0, positions, torch.full_like(positions, -1)).max(dim=1).values
    out = torch.zeros(mask.shape, dtype=torch.result_type(scores, mask), device=mask.device)
    rows = torch.nonzero(last >= 0).squeeze(-1)
    out[rows, last[rows]] = scores[rows].to(out.dtype)
    return out


@torch.no_grad()
def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """Generalised Advantage Estimation (Schulman et al. 2016) over the response tokens only.

    values[:, t] is V(tokens_<t), the value of the state in which token t is chosen; the value
    after the last response token is 0 (the episode ends). Both outputs are targets (no gradient)
    and are 0 outside the mask; returns = advantages + values on the mask.
    """
    r = rewards * mask
    v = values * mask  # padding after the response is 0, so V(after last token) = 0
    T = mask.shape[1]
    advantages = torch.zeros_like(v)
    carry = torch.zeros_like(v[:, 0])
    for t in reversed(range(T)):
        next_v = v[:, t + 1] if t + 1 < T else torch.zeros_like(carry)
        delta = r[:, t] + gamma * next_v - v[:, t]
        carry = (delta + gamma * lam * carry) * mask[:, t]  # resets outside the response
        advantages[:, t] = carry
    returns = (advantages + v) * mask
    return advantages, returns
