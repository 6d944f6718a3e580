"""Reward-model losses: small pure functions of scalar rewards (or embeddings), one per choice.

Pairwise losses compare the reward of the chosen answer with the rejected one of the same prompt;
pointwise losses fit each answer's reward to a target (a score, or a 0/1 label read as the logit of
"good"). Every loss averages over the batch. `objective` picks one by name for the RM job.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

PAIRWISE = ("bradley_terry", "hinge", "triplet")
POINTWISE = ("mse", "cross_entropy", "focal")
LOSSES = PAIRWISE + POINTWISE


def bradley_terry(chosen: torch.Tensor, rejected: torch.Tensor, margin: float = 0.0) -> torch.Tensor:
    """-log sigmoid(r_c - r_r - margin): the Bradley-Terry likelihood of the observed preference."""
    return -F.logsigmoid(chosen - rejected - margin).mean()


def hinge(chosen: torch.Tensor, rejected: torch.Tensor, margin: float = 1.0) -> torch.Tensor:
    """max(0, margin - (r_c - r_r)): margin ranking; pairs already apart by `margin` cost nothing."""
    return F.relu(margin - (chosen - rejected)).mean()


def mse(rewards: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Regression of each reward to its score."""
    return ((rewards - targets) ** 2).mean()


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy with the reward as the logit of label 1 (a good answer)."""
    return F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype))


def focal(logits: torch.Tensor, labels: torch.Tensor, gamma: float = 2.0, alpha: float | None = None) -> torch.Tensor:
    """Focal loss (Lin et al. 2017): cross-entropy scaled by (1 - p_t)^gamma, so that answers the
    model already classifies well weigh less; alpha (if given) weighs label 1 by alpha and label 0
    by 1 - alpha. gamma=0 and alpha=None give `cross_entropy` exactly. Labels are 0/1.

    Computed in log space from the signed logit z (+logit for label 1, -logit for label 0):
    1 - p_t = sigmoid(-z), so the factor is exp(gamma * logsigmoid(-z)). The literal
    (1 - p_t) ** gamma has an infinite derivative at p_t == 1 (sigmoid(17) rounds to 1 in float32)
    for 0 < gamma < 1, which made the gradient NaN once a row was confidently right.
    """
    labels = labels.to(logits.dtype)
    ce = F.binary_cross_entropy_with_logits(logits, labels, reduction="none")
    signed = torch.where(labels > 0.5, logits, -logits)
    loss = torch.exp(gamma * F.logsigmoid(-signed)) * ce
    if alpha is not None:
        loss = (alpha * labels + (1 - alpha) * (1 - labels)) * loss
    return loss.mean()


def triplet(anchor: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor, margin: float = 0.5) -> torch.Tensor:
    """max(0, |a - p| - |a - n| + margin) with Euclidean distances over the last dimension."""
    d_pos = (anchor - positive).norm(dim=-1)
    d_neg = (anchor - negative).norm(dim=-1)
    return F.relu(d_pos - d_neg + margin).mean()


def pairwise_accuracy(chosen: torch.Tensor, rejected: torch.Tensor) -> float:
    """Fraction of pairs ranked the right way (ties count as wrong)."""
    return float((chosen > rejected).float().mean())


def objective(
    name: str,
    params: dict[str, Any],
    rewards: torch.Tensor,
    targets: torch.Tensor,
    num_pairs: int,
    embeddings: torch.Tensor | None = None,
    anchors: torch.Tensor | None = None,
) -> torch.Tensor:
    """The training loss of one batch, by loss name.

    Layout: with num_pairs > 0, rewards[:num_pairs] are the chosen answers and
    rewards[num_pairs:] the rejected ones of the same prompts (targets 1 and 0 for the
    pointwise losses); with num_pairs == 0 the rows are rated samples and `targets` holds their
    scores (mse) or labels. `triplet` pulls the (prompt, chosen) embedding towards the prompt's
    own embedding (the anchor) and pushes the rejected one away; the scalar head learns from a
    Bradley-Terry term alongside it, as an embedding loss alone gives the head no signal.
    """
    if name in PAIRWISE and num_pairs == 0:
        raise ValueError(f"loss {name!r} needs preference pairs (prompt, chosen, rejected)")
    chosen, rejected = rewards[:num_pairs], rewards[num_pairs:]
    if name == "bradley_terry":
        return bradley_terry(chosen, rejected, params["bt_margin"])
    if name == "hinge":
        return hinge(chosen, rejected, params["hinge_margin"])
    if name == "triplet":
        if embeddings is None or anchors is None:
            raise ValueError("loss 'triplet' needs answer embeddings and prompt (anchor) embeddings")
        pos, neg = embeddings[:num_pairs], embeddings[num_pairs:]
        return triplet(anchors, pos, neg, params["triplet_margin"]) + bradley_terry(chosen, rejected)
    if name == "mse":
        return mse(rewards, targets)
    if name == "cross_entropy":
        return cross_entropy(rewards, targets)
    if name == "focal":
        return focal(rewards, targets, params["focal_gamma"], params["focal_alpha"])
    raise ValueError(f"unknown loss {name!r}: expected one of {LOSSES}")
