"""The algorithm tables: advantage estimators, policy losses and loss aggregations, by name.

A table maps each name the config accepts to the "module:function" that implements it, not to the
function itself: the config (jobs/config/training.py) builds its `Literal`s from these keys, and
`rayrlhf --help` and config validation must import no torch (tests/test_package.py), while every
implementation is torch code. The learner imports the functions when it starts (`load`), and
tests/test_algorithms.py imports every entry. So a new policy loss is one function (in losses.py)
plus one line here. (verl registers functions into dicts with decorators, so its names exist only
once the torch modules are imported, and its config is not checked against them.)

The signatures, all tensors [B, T] aligned to token positions (actors/rl/advantages.py):
- advantage estimator: (batch: TokenBatch, kl_coef, algorithm section) -> (advantages, returns or
  None); a `critic` estimator finds the pre-update values in batch.old_values.
- policy loss: (logprobs, anchor log-probs, advantages, response mask, algorithm section) ->
  (per-token loss, metrics); the anchor is what the ratio is taken against (the rollout's log-probs,
  or a pipelined run's proximal ones, whose importance weights then multiply the per-token loss).
- loss aggregation: (per-token loss, response mask, algorithm section) -> (total, units) of the rows
  given; the step's loss is the sum of the totals over the sum of the units (actors/rl/aggregation.py).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Estimator:
    function: str
    """"module:function" of the estimator."""
    critic: bool = False
    """It needs a value head: the learner computes the pre-update values and adds the value loss."""
    kl_in_reward: bool = False
    """The KL to the reference is taken off the per-token reward, not added to the loss."""
    group_relative: bool = False
    """Advantages come from each prompt's group alone: a group whose rewards are all equal gets zero
    advantages (what algorithm.dynamic_sampling drops)."""


ADVANTAGE_ESTIMATORS = {
    "grpo": Estimator("rayrlhf.actors.rl.estimators:grpo", group_relative=True),
    "ppo": Estimator("rayrlhf.actors.rl.estimators:ppo_gae", critic=True, kl_in_reward=True),
    "reinforce": Estimator("rayrlhf.actors.rl.estimators:rloo", group_relative=True),
    "dr_grpo": Estimator("rayrlhf.actors.rl.estimators:dr_grpo", group_relative=True),
    "reinforce_pp": Estimator("rayrlhf.actors.rl.estimators:reinforce_pp", kl_in_reward=True),
}
"""algorithm.name: the advantage estimator (and with it the value head and where the KL goes)."""

POLICY_LOSSES = {
    "ppo_clip": "rayrlhf.actors.rl.losses:ppo_clip",
    "cispo": "rayrlhf.actors.rl.losses:cispo",
    "gspo": "rayrlhf.actors.rl.losses:gspo",
}
"""algorithm.policy_loss."""

LOSS_AGGREGATIONS = {
    "token-mean": "rayrlhf.actors.rl.aggregation:token_mean",
    "seq-mean-token-mean": "rayrlhf.actors.rl.aggregation:seq_mean_token_mean",
    "seq-mean-token-sum": "rayrlhf.actors.rl.aggregation:seq_mean_token_sum",
    "seq-mean-token-sum-norm": "rayrlhf.actors.rl.aggregation:seq_mean_token_sum_norm",
}
"""algorithm.loss_aggregation: how the step's per-token losses become one number."""


def load(path: str) -> Callable[..., Any]:
    """The function a table entry names, imported now."""
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)
