"""The learner's RL math (actors/rl/advantages.py, losses.py, estimators.py, objective.py) against
hand-computed values, and the algorithm tables (actors/rl/algorithms.py) against the config."""

import math
from dataclasses import FrozenInstanceError, replace
from typing import get_args

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from rayrlhf.actors.rl.advantages import (
    expand_to_tokens,
    final_token_rewards,
    gae,
    grpo_advantages,
    masked_mean,
    masked_whiten,
    reinforce_advantages,
)
from rayrlhf.actors.rl.logprobs import entropy_metric
from rayrlhf.actors.rl.algorithms import ADVANTAGE_ESTIMATORS, LOSS_AGGREGATIONS, POLICY_LOSSES, load
from rayrlhf.actors.rl.losses import (
    AdaptiveKLController,
    FixedKLController,
    clipped_value_loss,
    entropy_from_logits,
    kl_penalty,
    cispo,
    gspo,
    make_kl_controller,
    ppo_clip,
)
from rayrlhf.actors.rl.objective import Objective
from rayrlhf.actors.rl.token_batch import TokenBatch
from rayrlhf.actors.rl.trajectory import LearnerBatch, Rewards, Trajectory
from rayrlhf.jobs.config.run import AlgorithmConfig, KLConfig


def close(actual, expected, tol=1e-5):
    # torch.allclose, not torch.testing.assert_close: the latter's lazy imports cost seconds.
    a = torch.as_tensor(actual, dtype=torch.float32).detach()
    e = torch.as_tensor(expected, dtype=torch.float32)
    assert a.shape == e.shape and torch.allclose(a, e, atol=tol, rtol=0), f"{a} != {e}"


# Three groups, interleaved and out of order: group 7 = rows 0, 2, 4 (rewards 1, 3, 5),
# group 2 = rows 1, 3 (rewards 10, 20), group 5 = row 5 alone (reward 4).
REWARDS = torch.tensor([1.0, 10.0, 3.0, 20.0, 5.0, 4.0])
GROUPS = torch.tensor([7, 2, 7, 2, 7, 5])


def test_masked_mean_and_empty_mask():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, float("inf"), 6.0]])
    mask = torch.tensor([[0.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    close(masked_mean(x, mask), (2 + 3 + 4) / 3)          # 3.0; the inf under mask 0 is ignored
    close(masked_mean(x, mask, dim=1), [2.5, 4.0])         # (2+3)/2, 4/1
    empty = torch.zeros_like(mask)
    close(masked_mean(x, empty), 0.0)
    close(masked_mean(x, torch.tensor([[1.0, 1, 1], [0, 0, 0]]), dim=1), [2.0, 0.0])
    # An empty mask must not poison gradients with 0/0.
    y = torch.ones(2, 3, requires_grad=True)
    masked_mean(y, empty).backward()
    assert torch.equal(y.grad, torch.zeros(2, 3))


def test_masked_whiten():
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0, 100.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0]])
    # mean 2.5; population var (2.25 + 0.25 + 0.25 + 2.25) / 4 = 1.25; std 1.1180340
    # (-1.5, -0.5, 0.5, 1.5) / 1.1180340 = -1.3416408, -0.4472136, 0.4472136, 1.3416408
    close(masked_whiten(x, mask), [[-1.3416408, -0.4472136, 0.4472136, 1.3416408, 0.0]])
    # shift_mean=False adds the mean 2.5 back: 1.1583592, 2.0527864, 2.9472136, 3.8416408
    close(masked_whiten(x, mask, shift_mean=False), [[1.1583592, 2.0527864, 2.9472136, 3.8416408, 0.0]])


def test_grpo_interleaved_groups_with_std():
    adv = grpo_advantages(REWARDS, GROUPS, normalize_std=True)
    # group 7: mean 3, unbiased var ((-2)^2 + 0 + 2^2) / 2 = 4, std 2 -> -1, 0, 1
    # group 2: mean 15, unbiased var (25 + 25) / 1 = 50, std 7.0710678 -> -/+ 5 / 7.0710678 = -/+0.7071068
    # group 5: singleton -> 0
    close(adv, [-1.0, -0.7071068, 0.0, 0.7071068, 1.0, 0.0])


def test_grpo_interleaved_groups_without_std():
    adv = grpo_advantages(REWARDS, GROUPS, normalize_std=False)
    # r - group mean: 1-3, 10-15, 3-3, 20-15, 5-3, singleton 0
    close(adv, [-2.0, -5.0, 0.0, 5.0, 2.0, 0.0])


def test_grpo_constant_group_and_all_singletons():
    # A group with equal rewards has std 0: (r - mean) = 0, so 0 / (0 + eps) = 0, no NaN.
    close(grpo_advantages(torch.tensor([2.0, 2.0]), torch.tensor([0, 0]), normalize_std=True), [0.0, 0.0])
    close(grpo_advantages(torch.tensor([1.0, 9.0]), torch.tensor([0, 1]), normalize_std=True), [0.0, 0.0])


def test_grpo_equal_float32_rewards_get_exactly_zero():
    # 0.7 is not representable in float32: a float32 group mean misses it by rounding, and that
    # residue divided by (std ~ 0 + eps) used to give every row about +0.11.
    for n in (16, 3, 7):
        rewards = torch.full((n,), 0.7, dtype=torch.float32)
        for normalize_std in (True, False):
            adv = grpo_advantages(rewards, torch.zeros(n, dtype=torch.long), normalize_std=normalize_std)
            assert adv.dtype == torch.float32
            assert torch.equal(adv, torch.zeros(n)), (n, normalize_std, adv)
    # a constant group next to a varied one: the constant one is exactly 0, the other unchanged
    rewards = torch.tensor([0.7, 0.1, 0.7, 0.3, 0.7], dtype=torch.float32)
    adv = grpo_advantages(rewards, torch.tensor([0, 1, 0, 1, 0]), normalize_std=True)
    assert torch.equal(adv[[0, 2, 4]], torch.zeros(3))
    # group 1: mean 0.2, unbiased std sqrt(0.01 + 0.01) = 0.1414214 -> -/+ 0.1 / 0.1414214 = -/+0.7071068
    close(adv[[1, 3]], [-0.7071068, 0.7071068])


def test_rloo():
    adv = reinforce_advantages(REWARDS, GROUPS)
    # group 7: 1 - (3+5)/2 = -3; 3 - (1+5)/2 = 0; 5 - (1+3)/2 = 3
    # group 2: 10 - 20 = -10; 20 - 10 = 10
    # singleton (reward 4): batch sum 1+10+3+20+5+4 = 43; leave-one-out mean (43-4)/5 = 7.8 -> 4 - 7.8 = -3.8
    close(adv, [-3.0, -10.0, 0.0, 10.0, 3.0, -3.8])
    close(reinforce_advantages(torch.tensor([5.0]), torch.tensor([0])), [0.0])


def test_expand_and_final_token_rewards():
    mask = torch.tensor([[0.0, 1.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0]])
    scores = torch.tensor([2.0, -1.0, 7.0])
    close(expand_to_tokens(scores, mask), [[0, 2, 2, 0], [-1, -1, -1, -1], [0, 0, 0, 0]])
    # last response token: row 0 at t=2, row 1 at t=3, row 2 has none
    close(final_token_rewards(scores, mask), [[0, 0, 2, 0], [0, 0, 0, -1], [0, 0, 0, 0]])


def test_gae_left_padded_response():
    # Prompt at t=0,1 (left padding), response t=2,3,4, right padding t=5; junk outside the mask.
    mask = torch.tensor([[0.0, 0.0, 1.0, 1.0, 1.0, 0.0]])
    rewards = torch.tensor([[5.0, 5.0, 0.0, -0.1, 1.0, 5.0]])
    values = torch.tensor([[9.0, 9.0, 0.5, 0.6, 0.7, 9.0]])
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.5)
    # delta4 = 1.0 + 0.9*0 - 0.7 = 0.3              (value after the last token is 0)
    # delta3 = -0.1 + 0.9*0.7 - 0.6 = -0.07
    # delta2 = 0 + 0.9*0.6 - 0.5 = 0.04
    # gamma*lam = 0.45: A4 = 0.3; A3 = -0.07 + 0.45*0.3 = 0.065; A2 = 0.04 + 0.45*0.065 = 0.06925
    close(adv, [[0, 0, 0.06925, 0.065, 0.3, 0]])
    # returns = A + V: 0.06925+0.5 = 0.56925, 0.065+0.6 = 0.665, 0.3+0.7 = 1.0
    close(ret, [[0, 0, 0.56925, 0.665, 1.0, 0]])
    # gamma = lam = 1: A_t = sum of rewards from t on - V_t: 0.9-0.5 = 0.4, 0.9-0.6 = 0.3, 1-0.7 = 0.3
    adv1, _ = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    close(adv1, [[0, 0, 0.4, 0.3, 0.3, 0]])


def _policy_batch():
    """Row 0: prompt token, then a, b, c; row 1: d, e, f, then padding (mask 0, junk values)."""
    ratios = torch.tensor([[math.exp(5.0), 1.1, 1.5, 0.5], [0.5, 1.5, 0.9, math.exp(5.0)]])
    advantages = torch.tensor([[3.0, 1.0, 1.0, 1.0], [-1.0, -1.0, -2.0, 3.0]])
    mask = torch.tensor([[0.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 0.0]])
    old_logp = torch.tensor([[-1.0, -2.0, -0.5, -3.0], [-1.5, -0.2, -2.5, -1.0]])
    logp = (old_logp + ratios.log()).requires_grad_(True)
    return logp, old_logp, advantages, mask


def test_clipped_policy_loss_values():
    logp, old_logp, advantages, mask = _policy_batch()
    per_token, stats = ppo_clip(logp, old_logp, advantages, mask, AlgorithmConfig(clip_eps=0.2))
    loss, clip_frac = masked_mean(per_token, mask), stats["clip_frac"]  # aggregated as token-mean
    # min(ratio*A, clip(ratio, 0.8, 1.2)*A) per token:
    #   a: r=1.1, A=+1 -> min(1.1, 1.1)  = 1.1   inside the range
    #   b: r=1.5, A=+1 -> min(1.5, 1.2)  = 1.2   clipped (gradient 0)
    #   c: r=0.5, A=+1 -> min(0.5, 0.8)  = 0.5   unclipped branch, gradient kept
    #   d: r=0.5, A=-1 -> min(-0.5,-0.8) = -0.8  clipped (gradient 0)
    #   e: r=1.5, A=-1 -> min(-1.5,-1.2) = -1.5  unclipped branch, gradient kept
    #   f: r=0.9, A=-2 -> min(-1.8,-1.8) = -1.8  inside the range
    # loss = -(1.1 + 1.2 + 0.5 - 0.8 - 1.5 - 1.8) / 6 = 1.3 / 6 = 0.2166667
    close(loss, 1.3 / 6)
    close(clip_frac, 2 / 6)  # b and d
    assert not clip_frac.requires_grad


def test_clipped_policy_loss_gradient_is_zero_on_clipped_tokens():
    logp, old_logp, advantages, mask = _policy_batch()
    per_token, _ = ppo_clip(logp, old_logp, advantages, mask, AlgorithmConfig(clip_eps=0.2))
    masked_mean(per_token, mask).backward()
    # d/dlogp of -ratio*A/6 is -ratio*A/6 on unclipped tokens:
    #   a: -1.1/6, c: -0.5/6, e: +1.5/6, f: -(0.9*-2)/6 = 1.8/6; clipped b, d and masked tokens: 0
    close(logp.grad, [[0.0, -1.1 / 6, 0.0, -0.5 / 6], [0.0, 1.5 / 6, 1.8 / 6, 0.0]])
    assert logp.grad[0, 2] == 0 and logp.grad[1, 0] == 0


def test_clipped_value_loss():
    values = torch.tensor([[1.0, 0.6, 0.0, 2.0, 50.0]])
    old = torch.tensor([[0.5, 0.5, 0.5, 0.5, 0.0]])
    returns = torch.tensor([[1.0, 1.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0]])
    # clip 0.2: v_clipped = old + clamp(v - old, -0.2, 0.2) = 0.7, 0.6, 0.3, 0.7
    # max((v-R)^2, (vc-R)^2): max(0, 0.09) = 0.09; max(0.16, 0.16) = 0.16; max(0, 0.09) = 0.09; max(4, 0.49) = 4
    # 0.5 * (0.09 + 0.16 + 0.09 + 4) / 4 = 0.5 * 1.085 = 0.5425
    close(masked_mean(clipped_value_loss(values, old, returns, clip=0.2), mask), 0.5425)


def test_kl_estimators():
    logp = torch.tensor([[-1.0, -2.0, -0.5]])
    ref = torch.tensor([[-1.5, -2.0, -0.3]])
    close(kl_penalty(logp, ref, "k1"), [[0.5, 0.0, -0.2]])  # logp - ref
    # k3 with x = ref - logp = -0.5, 0, 0.2: e^x - x - 1
    #   e^-0.5 + 0.5 - 1 = 0.6065307 - 0.5 = 0.1065307; 0; e^0.2 - 1.2 = 1.2214028 - 1.2 = 0.0214028
    close(kl_penalty(logp, ref, "k3"), [[0.1065307, 0.0, 0.0214028]])
    a, b = torch.randn(4, 16) * 3, torch.randn(4, 16) * 3
    assert (kl_penalty(a, b, "k3") >= 0).all()
    assert torch.equal(kl_penalty(a, a, "k3"), torch.zeros(4, 16))
    # far-off tokens (padding) stay finite
    assert torch.isfinite(kl_penalty(torch.tensor([-200.0]), torch.tensor([0.0]), "k3")).all()
    with pytest.raises(ValueError, match="kl.estimator"):
        kl_penalty(logp, ref, "k2")


def test_entropy_from_logits():
    close(entropy_from_logits(torch.zeros(2, 3, 7)), torch.full((2, 3), math.log(7)))  # uniform: log V
    # p = (1/4, 3/4): H = 0.25*ln 4 + 0.75*ln(4/3) = 0.3465736 + 0.2157616 = 0.5623351
    two = torch.tensor([[[0.0, math.log(3.0)]]])
    close(entropy_from_logits(two), [[0.5623351]])
    close(entropy_from_logits(two + 1000.0), [[0.5623351]])  # shift-invariant, no overflow
    # A -inf (masked) vocabulary entry contributes 0, with finite gradients.
    masked = torch.tensor([[[0.0, math.log(3.0), float("-inf")]]], requires_grad=True)
    h = entropy_from_logits(masked)
    close(h, [[0.5623351]])
    h.sum().backward()
    assert torch.isfinite(masked.grad).all()
    # The learner's metric-only path gives the same values from the logsumexp it already has.
    for logits in (torch.zeros(2, 3, 7), two, two + 1000.0, torch.randn(2, 3, 50) * 5):
        close(entropy_metric(logits, torch.logsumexp(logits, dim=-1)), entropy_from_logits(logits))


def test_adaptive_kl_controller_above_and_below_target():
    above = AdaptiveKLController(init_coef=0.1, target=0.1, horizon=1000)
    above.update(current_kl=0.2, n_steps=100)
    close(above.value, 0.102)  # err = clip(0.2/0.1 - 1 = 1, +-0.2) = 0.2; 0.1 * (1 + 0.2*100/1000)
    below = AdaptiveKLController(init_coef=0.1, target=0.1, horizon=1000)
    below.update(current_kl=0.09, n_steps=100)
    close(below.value, 0.099)  # err = 0.9 - 1 = -0.1; 0.1 * (1 - 0.1*100/1000) = 0.1 * 0.99
    below.update(current_kl=0.0, n_steps=100)
    close(below.value, 0.09702)  # err = clip(-1) = -0.2; 0.099 * (1 - 0.02) = 0.09702


def test_make_kl_controller_from_config():
    fixed = make_kl_controller(KLConfig(coef=0.3))
    assert isinstance(fixed, FixedKLController)
    fixed.update(current_kl=10.0, n_steps=100)
    assert fixed.value == 0.3
    adaptive = make_kl_controller(KLConfig(coef=0.3, adaptive=True, target=0.5, horizon=10))
    assert isinstance(adaptive, AdaptiveKLController)
    adaptive.update(current_kl=1.0, n_steps=1)
    close(adaptive.value, 0.306)  # err = clip(1.0/0.5 - 1) = 0.2; 0.3 * (1 + 0.2*1/10) = 0.306


# --- the tables, the typed batch and the whole micro-batch loss ---------------------------------


def test_the_config_accepts_exactly_the_tables_names_and_every_entry_loads():
    for field, table in (("name", ADVANTAGE_ESTIMATORS), ("policy_loss", POLICY_LOSSES),
                         ("loss_aggregation", LOSS_AGGREGATIONS)):  # fmt: skip
        assert get_args(AlgorithmConfig.model_fields[field].annotation) == tuple(table), field
        for entry in table.values():
            assert callable(load(getattr(entry, "function", entry))), entry
    assert list(ADVANTAGE_ESTIMATORS)[:3] == ["grpo", "ppo", "reinforce"]  # old configs and checkpoints name these
    assert [n for n, e in ADVANTAGE_ESTIMATORS.items() if e.critic] == ["ppo"]
    with pytest.raises(ValidationError, match="policy_loss"):
        AlgorithmConfig(policy_loss="nope")


def learner_batch(loss_mask: list[float]) -> LearnerBatch:
    """3 rows: row 0 uses columns 1-3, row 1 columns 2-3, row 2 columns 3-4 of 6 (0 and 5 are padding)."""
    attention = np.array([[0, 1, 1, 1, 0, 0], [0, 0, 1, 1, 0, 0], [0, 0, 0, 1, 1, 0]])
    response = np.array([[0, 0, 1, 1, 0, 0], [0, 0, 0, 1, 0, 0], [0, 0, 0, 0, 1, 0]], dtype=np.float32)
    traj = Trajectory(input_ids=np.arange(18).reshape(3, 6), attention_mask=attention, response_mask=response,
                      old_logprobs=-np.arange(18, dtype=np.float32).reshape(3, 6), group_ids=np.array([4, 4, 9]),
                      sample_ids=np.array([0, 1, 2]), policy_version=0)  # fmt: skip
    scores = np.array([1.0, 2.0, 3.0], dtype=np.float32)
    rewards = Rewards(total=scores, raw_total=scores, components={}, loss_mask=np.array(loss_mask, dtype=np.float32))
    return LearnerBatch.join([traj], [rewards], [None])


def test_token_batch_drops_masked_rows_from_the_loss_and_micro_batches_are_cut_slices():
    batch = TokenBatch.from_shard(learner_batch([1.0, 0.0, 1.0]), "cpu")
    assert batch.input_ids.dtype == torch.long and batch.response_mask.dtype == torch.float32
    assert batch.response_mask.tolist() == [[0, 0, 1, 1, 0, 0], [0] * 6, [0, 0, 0, 0, 1, 0]]  # row 1 dropped
    assert batch.ref_logprobs is None and batch.advantages is None and batch.proximal_logprobs is None
    first, second = batch.micro_batches(2)
    # rows 0-1 use columns 1..3; row 2 alone columns 3..4; per-row fields are sliced by row only
    assert first.input_ids.tolist() == [[1, 2, 3], [7, 8, 9]] and first.group_ids.tolist() == [4, 4]
    assert second.input_ids.tolist() == [[15, 16]] and second.old_logprobs.tolist() == [[-15.0, -16.0]]
    assert second.scores.tolist() == [3.0] and second.ref_logprobs is None
    with pytest.raises(FrozenInstanceError):
        batch.advantages = torch.zeros(3, 6)


def pin_batch() -> TokenBatch:
    """Two groups of two (scores 1, 0 and 3, 1), 7 response tokens, old log-probs -1, reference -1.2."""
    mask = torch.tensor([[0.0, 1.0, 1.0], [0.0, 1.0, 1.0], [0.0, 1.0, 0.0], [0.0, 1.0, 1.0]])
    return TokenBatch(input_ids=torch.zeros(4, 3, dtype=torch.long), attention_mask=torch.ones(4, 3, dtype=torch.long),
                      response_mask=mask, old_logprobs=torch.full((4, 3), -1.0), scores=torch.tensor([1.0, 0.0, 3.0, 1.0]),
                      group_ids=torch.tensor([0, 0, 1, 1]), ref_logprobs=torch.full((4, 3), -1.2))  # fmt: skip


# the current policy's ratios to the old one: 1.5 at (0, 1), 0.5 at (1, 2), 1 elsewhere
RATIOS = torch.tensor([[1.0, 1.5, 1.0], [1.0, 1.0, 0.5], [1.0, 1.0, 1.0], [1.0, 1.0, 1.0]])
# k1 KL of the loss, (logp - ref) on the 7 tokens: five 0.2, 0.2 + ln 1.5, 0.2 + ln 0.5 -> 1.1123179 / 7
KL = 0.1589026


@pytest.mark.parametrize(
    "name, pg_loss, value_loss, loss",
    [
        # A = +-0.5 / (0.7071068 + 1e-6) = +-0.7071058 (group 0), +-1 / (1.4142136 + 1e-6) = +-0.7071063 (group 1).
        # min(r A, clip(r) A) summed: row 0: 1.2 a0 + a0; row 1: -a0 - 0.8 a0; row 2: a1; row 3: -2 a1
        # = 0.4 a0 - a1 = -0.4242640; pg_loss = 0.4242640 / 7 = 0.0606091;
        # loss = pg_loss - 0.1 * entropy 2 + 0.5 * KL = 0.0606091 - 0.2 + 0.0794513
        ("grpo", 0.0606091, None, -0.0599396),
        # RLOO: A = 1, -1 (group 0), 2, -2 (group 1); summed: 2.2 - 1.8 + 2 - 4 = -1.6; pg_loss = 1.6 / 7
        ("reinforce", 1.6 / 7, None, 1.6 / 7 - 0.2 + 0.0794513),
        # GAE, gamma = lam = 1, old values 0: the returns-to-go of the score minus 0.5 * k1(old, ref) = 0.1 per
        # token: 0.8, 0.9 | -0.2, -0.1 | 2.9 | 0.8, 0.9; mean 6/7, population variance 0.8881633, std 0.9424241:
        # whitened -0.0606339, 0.0454754 | -1.1217273, -1.0156179 | 2.1676621 | -0.0606339, 0.0454754.
        # min(r A, clip(r) A): (0, 1) r 1.5, A < 0: 1.5 A = -0.0909509; (1, 2) r 0.5, A < 0: 0.8 A = -0.8124943;
        # the rest r = 1; sum = -0.0909509 + 0.0454754 - 1.1217273 - 0.8124943 + 2.1676621 - 0.0606339 + 0.0454754
        # = 0.1728066; pg_loss = -0.1728066 / 7 = -0.0246867.
        # Value loss, values 0.5 against returns R, old 0 (clipped to 0.2): 0.5 * mean(max((0.5 - R)^2, (0.2 - R)^2))
        # = 0.5 * (0.36 + 0.49 + 0.49 + 0.36 + 7.29 + 0.36 + 0.49) / 7 = 0.5 * 9.84 / 7 = 0.7028571;
        # loss = pg_loss - 0.2 + 0.5 * value_loss (the KL is in the reward, not the loss)
        ("ppo", -0.0246867, 0.7028571, -0.0246867 - 0.2 + 0.5 * 0.7028571),
    ],
)
def test_each_algorithms_loss_on_a_small_batch(name, pg_loss, value_loss, loss):
    algo = AlgorithmConfig(name=name, entropy_coef=0.1, gamma=1.0, lam=1.0)
    estimator = ADVANTAGE_ESTIMATORS[name]
    batch = pin_batch()
    if estimator.critic:
        batch = replace(batch, old_values=torch.zeros(4, 3))
    advantages, returns = load(estimator.function)(batch, 0.5, algo)
    rows = replace(batch, advantages=advantages, returns=returns)
    logp = (rows.old_logprobs + RATIOS.log()).requires_grad_(True)
    values = torch.full((4, 3), 0.5) if estimator.critic else None
    got, stats = Objective(algo, "k1", off_policy_cap=None)(rows, logp, torch.full((4, 3), 2.0), values, logp.detach(), 0.5)
    assert stats["pg_loss"] == pytest.approx(pg_loss, abs=1e-6)
    assert stats["kl"] == pytest.approx(KL, abs=1e-6) and stats["entropy"] == pytest.approx(2.0)
    assert stats["clip_frac"] == pytest.approx(2 / 7 if name != "ppo" else 1 / 7)  # ppo: only (1, 2) has r A clipped
    assert stats.get("value_loss") == (None if value_loss is None else pytest.approx(value_loss, abs=1e-6))
    assert stats["pipeline/is_clip_frac"] == 0.0 and got.item() == pytest.approx(loss, abs=1e-6)
    if name == "reinforce":
        got.backward()
        # -r A / 7 on unclipped tokens (0 on the clipped (0, 1) and (1, 2)), + 0.5 / 7 from the KL on every token
        close(logp.grad * 7, [[0.0, 0.5, -0.5], [0.0, 1.5, 0.5], [0.0, -1.5, 0.0], [0.0, 2.5, 2.5]])


# --- loss aggregations (actors/rl/aggregation.py) -------------------------------------------------

# per-token losses of 4 answers: 1, 2 | 3 | 4, 5, 6 | (dropped by the reward: no tokens)
AGG_LOSS = torch.tensor([[1.0, 2.0, 9.0], [3.0, 9.0, 9.0], [4.0, 5.0, 6.0], [9.0, 9.0, 9.0]])
AGG_MASK = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0], [1.0, 1.0, 1.0], [0.0, 0.0, 0.0]])


@pytest.mark.parametrize("name, expected", [
    ("token-mean", 21 / 6),                          # (1 + 2 + 3 + 4 + 5 + 6) / 6 tokens
    ("seq-mean-token-mean", (1.5 + 3 + 5) / 3),      # the token means 1.5, 3, 5 over the 3 answers with tokens
    ("seq-mean-token-sum", (3 + 3 + 15) / 3),        # the token sums 3, 3, 15 over 3 answers
    ("seq-mean-token-sum-norm", 21 / (3 * 4)),       # the sums over loss_scale_tokens = 4, over 3 answers
])  # fmt: skip
def test_each_aggregation_against_its_formula(name, expected):
    algo = AlgorithmConfig(loss_aggregation=name, loss_scale_tokens=4)
    total, units = load(LOSS_AGGREGATIONS[name])(AGG_LOSS, AGG_MASK, algo)
    assert (total / units).item() == pytest.approx(expected, abs=1e-6)


def uneven_batch() -> TokenBatch:
    """6 answers of 5, 1, 3, 0 (dropped), 2, 4 response tokens in 5 columns, two groups."""
    lengths = torch.tensor([5, 1, 3, 0, 2, 4])
    mask = (torch.arange(5) < lengths[:, None]).float()
    g = torch.Generator().manual_seed(0)
    return TokenBatch(input_ids=torch.zeros(6, 5, dtype=torch.long), attention_mask=torch.ones(6, 5, dtype=torch.long),
                      response_mask=mask, old_logprobs=-torch.rand(6, 5, generator=g),
                      scores=torch.rand(6, generator=g), group_ids=torch.tensor([0, 0, 0, 1, 1, 1]),
                      advantages=torch.randn(6, 5, generator=g) * mask)  # fmt: skip


@pytest.mark.parametrize("aggregation", list(LOSS_AGGREGATIONS))
@pytest.mark.parametrize("policy_loss", list(POLICY_LOSSES))
def test_the_gradient_does_not_depend_on_the_micro_batch_size(aggregation, policy_loss):
    """Micro-batches of 2 rows, each loss averaged as the engine does (1 / accumulation), give the
    gradient of one micro-batch of all rows; a token mean per micro-batch would weigh row 1's lone
    token 5 times more than row 0's tokens. The KL and entropy terms are aggregated alike."""
    batch = uneven_batch()
    batch = replace(batch, ref_logprobs=batch.old_logprobs - 0.1)
    algo = AlgorithmConfig(policy_loss=policy_loss, loss_aggregation=aggregation, loss_scale_tokens=5, entropy_coef=0.1)
    objective = Objective(algo, "k3", off_policy_cap=None)
    noise = torch.randn(2, 6, 5, generator=torch.Generator().manual_seed(1))
    start, entropy_start = (batch.old_logprobs + 0.3 * noise[0]).detach(), noise[1].abs()

    def gradient(size: int) -> torch.Tensor:
        logp, entropy = start.clone().requires_grad_(True), entropy_start.clone().requires_grad_(True)
        accumulation = len(batch) // size
        units = objective.units(batch.response_mask) / accumulation
        for lo in range(0, len(batch), size):
            rows, part = batch.rows(lo, lo + size), logp[lo : lo + size]
            loss, _ = objective(rows, part, entropy[lo : lo + size], None, part.detach(), 0.5, units)
            (loss / accumulation).backward()
        assert logp.grad is not None and entropy.grad is not None
        return torch.cat([logp.grad, entropy.grad])

    whole = gradient(6)
    assert whole[:6].abs().sum() > 0 and whole[6:].abs().sum() > 0
    close(gradient(2), whole, tol=1e-6)
    close(gradient(3), whole, tol=1e-6)


@pytest.mark.parametrize("name", ["grpo", "ppo"])
def test_kl_entropy_and_value_terms_are_step_token_means_whatever_the_micro_batching(name):
    """Two answers of 2 and 1 tokens, zero advantages (so no policy-loss term), token-mean. grpo: KL k1 =
    logp - ref = 0.3, 0.6 | 0.9, entropy 1, 2 | 4: loss = (0.3 + 0.6 + 0.9) / 3 - 0.5 * 7 / 3 = -0.5666667,
    the gradient 1/3 on each logp and -0.5/3 on each entropy. A micro-batch mean would give row 1's
    token the weight of row 0's two (KL (0.45 + 0.9) / 2 = 0.675). ppo (KL in the reward): values - returns
    = 1, 2 | 3 (unclipped): value loss 0.5 * (1 + 4 + 9) / 3 = 7/3, loss = 0.5 * 7/3 - 0.5 * 7/3 = 0,
    the gradient 0.5 * (v - R) / 3 on each value."""
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    zeros = torch.zeros(2, 2)
    rows = TokenBatch(input_ids=torch.zeros(2, 2, dtype=torch.long), attention_mask=torch.ones(2, 2, dtype=torch.long),
                      response_mask=mask, old_logprobs=zeros - 1, scores=torch.zeros(2), group_ids=torch.zeros(2),
                      ref_logprobs=torch.tensor([[-1.3, -1.6], [-1.9, 5.0]]), advantages=zeros,
                      old_values=zeros, returns=torch.tensor([[-1.0, -2.0], [-3.0, 7.0]]))  # fmt: skip
    algo = AlgorithmConfig(name=name, entropy_coef=0.5, value_clip=100.0)
    objective = Objective(algo, "k1", off_policy_cap=None)

    def run(size: int) -> tuple[float, torch.Tensor]:
        logp = (zeros - 1).requires_grad_(True)
        entropy = torch.tensor([[1.0, 2.0], [4.0, 9.0]], requires_grad=True)
        values = zeros.clone().requires_grad_(True)
        accumulation, total = 2 // size, 0.0
        for lo in range(0, 2, size):
            part = slice(lo, lo + size)
            loss, _ = objective(rows.rows(lo, lo + size), logp[part], entropy[part], values[part], logp[part].detach(),
                                1.0, objective.units(mask) / accumulation)  # fmt: skip
            (loss / accumulation).backward()
            total += loss.item() / accumulation
        return total, torch.stack([logp.grad, entropy.grad, zeros if values.grad is None else values.grad])

    expected_loss = -0.5666667 if name == "grpo" else 0.0
    third = mask / 3
    expected_grad = torch.stack([third if name == "grpo" else zeros, -0.5 * third,
                                 zeros if name == "grpo" else 0.5 * torch.tensor([[1.0, 2.0], [3.0, 0.0]]) / 3])  # fmt: skip
    for size in (2, 1):
        loss, grad = run(size)
        assert loss == pytest.approx(expected_loss, abs=1e-6)
        close(grad, expected_grad, tol=1e-6)


def test_dr_grpo_is_the_group_mean_baseline_with_its_unbiased_loss():
    algo = AlgorithmConfig(name="dr_grpo")  # normalize_std (True) is ignored
    assert algo.loss_aggregation == "seq-mean-token-sum-norm"
    assert AlgorithmConfig(name="dr_grpo", loss_aggregation="token-mean").loss_aggregation == "token-mean"
    assert AlgorithmConfig().loss_aggregation == "token-mean"  # the default run is unchanged
    advantages, _ = load(ADVANTAGE_ESTIMATORS["dr_grpo"].function)(pin_batch(), 0.0, algo)
    # scores 1, 0 (group 0, mean 0.5) and 3, 1 (group 1, mean 2): 0.5, -0.5, 1, -1 on each response token
    close(advantages, [[0.0, 0.5, 0.5], [0.0, -0.5, -0.5], [0.0, 1.0, 0.0], [0.0, -1.0, -1.0]])


def test_ppo_clip_with_clip_higher_and_its_config():
    ratio = torch.tensor([[0.7, 1.25, 1.3, 1.4]])
    advantages, mask = torch.tensor([[1.0, 1.0, -1.0, 1.0]]), torch.ones(1, 4)
    algo = AlgorithmConfig(clip_eps_low=0.2, clip_eps_high=0.28)  # DAPO
    per_token, stats = ppo_clip(ratio.log(), torch.zeros(1, 4), advantages, mask, algo)
    # -min(r A, clip(r, 0.8, 1.28) A): min(0.7, 0.8) = 0.7; 1.25 is inside [0.8, 1.28] (clip_eps 0.2 would
    # cut it to 1.2); min(-1.3, -1.28) = -1.3 (pessimistic side: kept); min(1.4, 1.28) = 1.28, clipped
    close(per_token, [[-0.7, -1.25, 1.3, -1.28]])
    assert stats["clip_frac"].item() == pytest.approx(1 / 4)
    symmetric, _ = ppo_clip(ratio.log(), torch.zeros(1, 4), advantages, mask, AlgorithmConfig(clip_eps=0.2))
    close(symmetric, [[-0.7, -1.2, 1.3, -1.2]])
    assert (AlgorithmConfig(clip_eps=0.3).eps_low, AlgorithmConfig(clip_eps=0.3).eps_high) == (0.3, 0.3)
    with pytest.raises(ValidationError, match="clip_eps_high"):
        AlgorithmConfig(clip_eps_low=0.3, clip_eps_high=0.2)
    with pytest.raises(ValidationError, match="must be < 1"):
        AlgorithmConfig(clip_eps_low=1.0, clip_eps_high=2.0)


def test_cispo_against_its_formula():
    logp = torch.tensor([[-1.0, -2.0, -0.5]], requires_grad=True)
    ratio, advantages = torch.tensor([[1.5, 0.5, 1.1]]), torch.tensor([[1.0, -1.0, 2.0]])
    algo = AlgorithmConfig(clip_eps_low=0.2, clip_eps_high=0.28)
    per_token, stats = cispo(logp, logp.detach() - ratio.log(), advantages, torch.ones(1, 3), algo)
    # w = sg(clip(r, 0.8, 1.28)) = 1.28, 0.8, 1.1; -w A log pi = -1.28 * 1 * -1, -0.8 * -1 * -2, -1.1 * 2 * -0.5
    close(per_token, [[1.28, -1.6, 1.1]])
    assert stats["clip_frac"].item() == pytest.approx(2 / 3)
    per_token.sum().backward()
    close(logp.grad, [[-1.28, 0.8, -2.2]])  # -w A: the clipped tokens keep their gradient


def test_gspo_against_its_sequence_level_formula():
    # answers of 2, 3, 1 tokens; log ratios 0.1, 0.3 | 0, 0.6, 0.3 | -0.1; advantages 1, 1, -1
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    log_ratio = torch.tensor([[0.1, 0.3, 0.0], [0.0, 0.6, 0.3], [-0.1, 0.0, 0.0]])
    advantages = torch.tensor([[1.0], [1.0], [-1.0]]) * mask
    anchor = torch.full((3, 3), -1.0)
    algo = AlgorithmConfig(policy_loss="gspo", clip_eps_low=0.2, clip_eps_high=0.28)
    assert algo.loss_aggregation == "seq-mean-token-mean"
    logp = (anchor + log_ratio).requires_grad_(True)
    per_token, stats = gspo(logp, anchor, advantages, mask, algo)
    # s_i = exp(mean log ratio) = e^0.2 = 1.2214028 (inside [0.8, 1.28]), e^0.3 = 1.3498588 (A > 0: clipped
    # to 1.28), e^-0.1 = 0.9048374 (A < 0, inside): -min(s A, clip(s) A) on each token of the answer
    close(per_token * mask, [[-1.2214028, -1.2214028, 0.0], [-1.28, -1.28, -1.28], [0.9048374, 0.0, 0.0]])
    assert stats["clip_frac"].item() == pytest.approx(3 / 6)  # the 3 tokens of answer 1
    total, units = load(LOSS_AGGREGATIONS[algo.loss_aggregation])(per_token, mask, algo)
    loss = total / units
    assert loss.item() == pytest.approx((-1.2214028 - 1.28 + 0.9048374) / 3, abs=1e-6)
    loss.backward()
    # d/dlogp_t: -s_i A_i / (|y_i| G) where unclipped: -1.2214028 / 6 on answer 0, 0 on 1, 0.9048374 / 3 on 2
    close(logp.grad, [[-0.2035671, -0.2035671, 0.0], [0.0, 0.0, 0.0], [0.3016125, 0.0, 0.0]])
    # the same as the paper's sequence objective -1/G sum_i min(s_i A_i, clip(s_i) A_i), by autograd
    direct = (anchor + log_ratio).requires_grad_(True)
    s = torch.exp(masked_mean(direct - anchor, mask, dim=-1))
    a = advantages[:, 0]
    (-torch.minimum(s * a, s.clamp(0.8, 1.28) * a).mean()).backward()
    close(direct.grad * mask, logp.grad)


def test_reinforce_pp_whitens_the_kl_shaped_returns_over_the_batch():
    batch = pin_batch()  # scores 1, 0, 3, 1; 7 tokens; k1(old -1, ref -1.2) = 0.2 per token
    assert ADVANTAGE_ESTIMATORS["reinforce_pp"].kl_in_reward and not ADVANTAGE_ESTIMATORS["reinforce_pp"].critic
    estimate = load(ADVANTAGE_ESTIMATORS["reinforce_pp"].function)
    advantages, returns = estimate(batch, 0.5, AlgorithmConfig(name="reinforce_pp"))
    # rewards: -0.1 per token, + the score on the last; returns to go (gamma 1): 0.8, 0.9 | -0.2, -0.1 | 2.9 |
    # 0.8, 0.9; over the 7 tokens mean 6/7, population std 0.9424241 (no groups: the batch is the baseline)
    close(advantages, [[0.0, -0.0606339, 0.0454754], [0.0, -1.1217273, -1.0156179], [0.0, 2.1676621, 0.0],
                       [0.0, -0.0606339, 0.0454754]])  # fmt: skip
    assert returns is None
