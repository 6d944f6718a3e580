"""The off-policy loss (actors/rl/offpolicy.py, as actors/rl/objective.py applies it to the policy loss)
against numbers worked out by hand on a 1 x 3 example."""

import math

import pytest
import torch

from rayrlhf.actors.rl.objective import Objective
from rayrlhf.actors.rl.offpolicy import importance_weights, mismatch_kl
from rayrlhf.actors.rl.token_batch import TokenBatch
from rayrlhf.jobs.config.run import AlgorithmConfig

# one row of three tokens, the last one padding
MASK = torch.tensor([[1.0, 1.0, 0.0]])
BEHAV = torch.log(torch.tensor([[0.5, 0.2, 0.7]]))  # the rollout's log-probs (a stale policy)
PROX = torch.log(torch.tensor([[0.25, 0.6, 0.1]]))  # the learner's, before this step's update
ADV = torch.tensor([[1.0, 1.0, 1.0]])


def decoupled_policy_loss(logp, prox, behav, advantages, mask, clip_eps, cap):
    """The learner's loss of a pipelined run (no reference, no entropy bonus: the policy loss alone):
    (loss, PPO clip fraction, IS clip fraction)."""
    rows = TokenBatch(input_ids=torch.zeros_like(mask, dtype=torch.long), attention_mask=torch.ones_like(mask, dtype=torch.long),
                      response_mask=mask, old_logprobs=behav, scores=torch.zeros(1), group_ids=torch.zeros(1, dtype=torch.long),
                      advantages=advantages)  # fmt: skip
    objective = Objective(AlgorithmConfig(clip_eps=clip_eps), "k3", off_policy_cap=cap)
    loss, stats = objective(rows, logp, torch.zeros_like(mask), None, prox, kl_coef=0.0)
    assert stats["loss"] == stats["pg_loss"]
    return loss, torch.tensor(stats["clip_frac"]), torch.tensor(stats["pipeline/is_clip_frac"])


def test_importance_weights_are_truncated_at_the_cap_and_padding_counts_nothing():
    weights, cut = importance_weights(PROX, BEHAV, MASK, cap=2.0)
    # 0.25 / 0.5 = 0.5; 0.6 / 0.2 = 3, cut to 2; padding: 1
    assert weights[0].tolist() == pytest.approx([0.5, 2.0, 1.0])
    assert cut.item() == pytest.approx(0.5)  # one of the two response tokens


def test_decoupled_loss_clips_around_the_proximal_policy_and_weights_each_token():
    logp = (PROX + torch.log(torch.tensor([[1.5, 0.5, 1.0]])))  # ratios to the proximal policy: 1.5, 0.5
    logp.requires_grad_(True)
    loss, clip_frac, is_clip_frac = decoupled_policy_loss(logp, PROX, BEHAV, ADV, MASK, clip_eps=0.2, cap=2.0)
    # token 1: min(1.5, 1.2) = 1.2 (clipped), weight 0.5 -> -0.6; token 2: min(0.5, 0.8) = 0.5, weight 2 -> -1.0
    assert loss.item() == pytest.approx((-0.6 - 1.0) / 2)
    assert clip_frac.item() == pytest.approx(0.5) and is_clip_frac.item() == pytest.approx(0.5)
    loss.backward()
    # the clipped token has no gradient; token 2: d/dlogp (-2 * ratio * 1) / 2 = -ratio = -0.5
    assert logp.grad[0].tolist() == pytest.approx([0.0, -0.5, 0.0])


def test_one_epoch_is_the_truncated_is_policy_gradient():
    """With the proximal log-probs taken from the same forward (the first pass), r = 1 and the
    gradient is -min(w, cap) * A / n per token: truncated importance sampling."""
    logp = PROX.clone().requires_grad_(True)
    adv = torch.tensor([[2.0, -1.0, 5.0]])
    loss, clip_frac, _ = decoupled_policy_loss(logp, logp.detach(), BEHAV, adv, MASK, clip_eps=0.2, cap=2.0)
    loss.backward()
    assert clip_frac.item() == 0.0
    assert logp.grad[0].tolist() == pytest.approx([-0.5 * 2.0 / 2, -2.0 * -1.0 / 2, 0.0])


def test_mismatch_kl_is_k3_of_behaviour_to_learner_on_response_tokens():
    # k3 = w - log w - 1 with w = prox / behav: 0.5 -> 0.5 + log 2 - 1; 3 -> 3 - log 3 - 1
    expected = ((0.5 + math.log(2) - 1) + (3 - math.log(3) - 1)) / 2
    assert mismatch_kl(PROX, BEHAV, MASK).item() == pytest.approx(expected, rel=1e-6)
    assert mismatch_kl(BEHAV, BEHAV, MASK).item() == 0.0  # on-policy, no mismatch
