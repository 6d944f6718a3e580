"""Reward-model losses against values computed by hand."""

import math

import pytest
import torch

from rayrlhf.actors.supervised.rm_losses import (
    LOSSES,
    bradley_terry,
    cross_entropy,
    focal,
    hinge,
    mse,
    objective,
    pairwise_accuracy,
    triplet,
)

T = torch.tensor
PARAMS = dict(bt_margin=0.0, hinge_margin=1.0, triplet_margin=0.5, focal_gamma=2.0, focal_alpha=None)


def test_bradley_terry():
    # -log sigmoid(2) = log(1 + e^-2) = 0.126928; -log sigmoid(0) = log 2 = 0.693147; mean 0.410038
    assert bradley_terry(T([2.0, 0.0]), T([0.0, 0.0])).item() == pytest.approx(0.410038, abs=1e-6)
    # margin 1: -log sigmoid(2 - 0 - 1) = log(1 + e^-1) = 0.313262
    assert bradley_terry(T([2.0]), T([0.0]), margin=1.0).item() == pytest.approx(0.313262, abs=1e-6)


def test_bradley_terry_gradient_raises_chosen_and_lowers_rejected():
    chosen, rejected = T([0.3], requires_grad=True), T([0.1], requires_grad=True)
    bradley_terry(chosen, rejected).backward()
    # d/dr_c = -(1 - sigmoid(0.2)) = -0.450166; d/dr_r = +0.450166
    assert chosen.grad.item() == pytest.approx(-0.450166, abs=1e-6)
    assert rejected.grad.item() == pytest.approx(0.450166, abs=1e-6)


def test_hinge():
    # differences 2, 0.5, -1 with margin 1 -> max(0, 1 - d) = 0, 0.5, 2 -> mean 2.5 / 3
    loss = hinge(T([2.0, 0.5, -1.0]), T([0.0, 0.0, 0.0]), margin=1.0)
    assert loss.item() == pytest.approx(2.5 / 3, abs=1e-6)


def test_mse():
    # (1 - 0)^2 and (3 - 1)^2 -> (1 + 4) / 2
    assert mse(T([1.0, 3.0]), T([0.0, 1.0])).item() == pytest.approx(2.5)


def test_cross_entropy():
    # label 1: -log sigmoid(0) = 0.693147 and -log sigmoid(ln 3) = -log 0.75 = 0.287682; mean 0.490415
    assert cross_entropy(T([0.0, math.log(3)]), T([1, 1])).item() == pytest.approx(0.490415, abs=1e-6)


def test_focal():
    logit = T([math.log(3)])  # sigmoid = 0.75
    # label 1: p_t = 0.75, (1 - 0.75)^2 * -log 0.75 = 0.0625 * 0.287682 = 0.017980
    assert focal(logit, T([1]), gamma=2.0).item() == pytest.approx(0.017980, abs=1e-6)
    # label 0: p_t = 0.25, 0.75^2 * -log 0.25 = 0.5625 * 1.386294 = 0.779791
    assert focal(logit, T([0]), gamma=2.0).item() == pytest.approx(0.779791, abs=1e-6)
    # alpha 0.25 weighs label 1 by 0.25: 0.017980 * 0.25 = 0.004495
    assert focal(logit, T([1]), gamma=2.0, alpha=0.25).item() == pytest.approx(0.004495, abs=1e-6)


def test_focal_without_focusing_is_cross_entropy():
    logits, labels = T([-1.2, 0.3, 2.0]), T([0, 1, 1])
    assert focal(logits, labels, gamma=0.0).item() == pytest.approx(cross_entropy(logits, labels).item(), abs=1e-7)


def test_focal_gradient_is_finite_when_confidently_right():
    # (1 - p_t) ** gamma at p_t == 1 (sigmoid(17) rounds to 1 in float32) has an infinite
    # derivative for gamma < 1; it used to turn the whole batch's gradient into NaN.
    for gamma in (0.25, 0.5, 0.9):
        logits = T([17.0, 30.0, -40.0, 120.0, 0.5], requires_grad=True)
        labels = T([1, 1, 0, 1, 0])
        loss = focal(logits, labels, gamma=gamma)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(logits.grad).all(), (gamma, logits.grad)
        # the confident rows barely matter; the unsure one (logit 0.5, label 0) pushes its logit down
        assert logits.grad[4] > 0 and logits.grad[:4].abs().max() < 1e-5
    # value check at gamma 0.5, logit 17, label 1: 1 - p_t = sigmoid(-17) = 4.1399e-8,
    # factor sqrt(4.1399e-8) = 2.0347e-4, ce = softplus(-17) = 4.1399e-8 -> loss 8.4234e-12
    assert focal(T([17.0]), T([1]), gamma=0.5).item() == pytest.approx(8.4234e-12, rel=1e-3)


def test_triplet():
    anchor = T([[0.0, 0.0], [0.0, 0.0]])
    positive = T([[3.0, 4.0], [1.0, 0.0]])  # distances 5 and 1
    negative = T([[0.0, 1.0], [0.0, 3.0]])  # distances 1 and 3
    # max(0, 5 - 1 + 0.5) = 4.5 and max(0, 1 - 3 + 0.5) = 0 -> mean 2.25
    assert triplet(anchor, positive, negative, margin=0.5).item() == pytest.approx(2.25)


def test_pairwise_accuracy_counts_ties_as_wrong():
    assert pairwise_accuracy(T([1.0, 2.0, 3.0]), T([0.0, 2.0, 4.0])) == pytest.approx(1 / 3)


def test_objective_layout():
    rewards = T([2.0, 0.0, 0.0, 0.0])  # two pairs: chosen (2, 0), rejected (0, 0)
    targets = T([1.0, 1.0, 0.0, 0.0])
    assert objective("bradley_terry", PARAMS, rewards, targets, 2).item() == pytest.approx(0.410038, abs=1e-6)
    # pointwise on the same pairs: (2 - 1)^2, (0 - 1)^2, 0, 0 -> 2 / 4
    assert objective("mse", PARAMS, rewards, targets, 2).item() == pytest.approx(0.5)
    # triplet = embedding term + Bradley-Terry: anchors equal to the chosen embeddings, rejected at distance 2
    emb = T([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])
    loss = objective("triplet", PARAMS, rewards, targets, 2, embeddings=emb, anchors=emb[:2])
    assert loss.item() == pytest.approx(0.0 + 0.410038, abs=1e-6)  # max(0, 0 - 2 + 0.5) = 0


def test_objective_refuses_pairwise_loss_on_rated_rows():
    with pytest.raises(ValueError, match="needs preference pairs"):
        objective("hinge", PARAMS, T([0.1, 0.2]), T([1.0, 0.0]), 0)
    with pytest.raises(ValueError, match="unknown loss"):
        objective("dpo", PARAMS, T([0.1, 0.2]), T([1.0, 0.0]), 1)


def test_the_config_schema_offers_exactly_the_implemented_losses():
    from typing import get_args

    from rayrlhf.jobs.config.supervised import LossName

    assert set(get_args(LossName)) == set(LOSSES)
