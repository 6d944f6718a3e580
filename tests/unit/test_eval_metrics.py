"""pass@k and mean@n against hand-computed values."""

import math

import numpy as np
import pytest

from rayrlhf.jobs.run.eval_metrics import ks, pass_at_k, sampled_metrics


def test_pass_at_k_hand_computed():
    # n=4, c=1: pass@1 = 1/4; pass@2 = 1 - C(3,2)/C(4,2) = 1 - 3/6 = 1/2; pass@4 = 1
    assert pass_at_k(1, 4, 1) == pytest.approx(0.25)
    assert pass_at_k(1, 4, 2) == pytest.approx(0.5)
    assert pass_at_k(1, 4, 4) == 1.0
    # n=5, c=2, k=3: 1 - C(3,3)/C(5,3) = 1 - 1/10
    assert pass_at_k(2, 5, 3) == pytest.approx(0.9)
    assert pass_at_k(0, 8, 8) == 0.0
    # unbiased, not 1 - (1 - c/n)^k: n=4, c=1, k=2 would give 0.4375 there
    assert pass_at_k(1, 4, 2) != pytest.approx(1 - (1 - 0.25) ** 2)
    with pytest.raises(ValueError, match="1 <= k <= n"):
        pass_at_k(1, 4, 5)


def test_ks_are_powers_of_two_and_n():
    assert ks(1) == [1] and ks(4) == [1, 2, 4] and ks(6) == [1, 2, 4, 6] and ks(8) == [1, 2, 4, 8]


def test_sampled_metrics_per_prompt_and_component():
    n = 4
    exact = np.array([1, 0, 0, 0,  1, 1, 0, 0,  0, 0, 0, 0], dtype=float)  # c = 1, 2, 0
    rouge = np.array([0.5, 0.25, 0, 0,  1, 1, 0.5, 0.5,  0, 0, 0, 0.25])
    partial = np.array([1, 1, 0, 1] + [math.nan] * 4 + [0, 0, 0, 0])  # applies to prompts 0 and 2 only
    out = sampled_metrics({"exact": exact, "rouge_l": rouge, "partial": partial}, n)
    assert out["eval/exact/mean@4"] == pytest.approx(3 / 12)
    assert out["eval/exact/pass@1"] == pytest.approx((1 / 4 + 2 / 4 + 0) / 3)
    # pass@2: c=1 -> 1/2; c=2 -> 1 - C(2,2)/C(4,2) = 5/6; c=0 -> 0
    assert out["eval/exact/pass@2"] == pytest.approx((0.5 + 5 / 6 + 0) / 3)
    assert out["eval/exact/pass@4"] == pytest.approx(2 / 3)
    assert out["eval/rouge_l/mean@4"] == pytest.approx(rouge.mean())
    assert not any(k.startswith("eval/rouge_l/pass@") for k in out)  # not a 0/1 component
    assert out["eval/partial/mean@4"] == pytest.approx(3 / 8)
    assert out["eval/partial/pass@4"] == pytest.approx(0.5)  # prompt 1 left out: (1 + 0) / 2
