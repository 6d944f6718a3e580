"""The learning sections of a run config: the KL term (kl), the objective (algorithm) and the
learner that optimises it (learner). Part of the run-config schema (jobs/config/run.py)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, model_validator

from rayrlhf.actors.rl.algorithms import ADVANTAGE_ESTIMATORS, LOSS_AGGREGATIONS, POLICY_LOSSES
from rayrlhf.jobs.config.base import StrictModel


class KLConfig(StrictModel):
    coef: float = Field(0.05, ge=0)
    estimator: Literal["k1", "k3"] = "k3"
    adaptive: bool = False
    target: float = Field(0.1, gt=0)
    """Target KL per token for the adaptive controller."""
    horizon: int = Field(1000, ge=1)
    num_cpus: float = Field(0.25, gt=0)
    """Launch options of the reference-policy actor, which exists only when the KL term is on."""
    num_gpus: float = Field(0.0, ge=0)
    torch_threads: int = Field(2, ge=1)
    """It overlaps the reward scorers, but they finish in a second or two; then it runs alone."""


if TYPE_CHECKING:  # a Literal built from a table is pydantic's to check; the type checker sees a str
    EstimatorName = str
    PolicyLossName = str
    AggregationName = str
else:
    EstimatorName = Literal[tuple(ADVANTAGE_ESTIMATORS)]
    PolicyLossName = Literal[tuple(POLICY_LOSSES)]
    AggregationName = Literal[tuple(LOSS_AGGREGATIONS)]
"""The names the algorithm tables hold (actors/rl/algorithms.py: torch-free, so validation stays light)."""


class DynamicSamplingConfig(StrictModel):
    """DAPO's dynamic sampling (Yu et al. 2025; verl: algorithm.filter_groups): drop the prompt groups
    whose rewards are all equal (zero advantages: they teach nothing) and refill the step's batch from
    further prompts (jobs/run/dynamic_sampling.py, docs/verifiable_rewards.md)."""

    enabled: bool = False
    max_draws: int = Field(3, ge=1)
    """Batches of prompts_per_step prompts generated at most per step (verl: max_num_gen_batches). At the
    limit the step trains the groups kept, the batch filled with constant groups left out of the loss;
    none kept: the last draw, as it is."""


class AlgorithmConfig(StrictModel):
    name: EstimatorName = "grpo"
    """The advantage estimator: grpo, dr_grpo (group mean baseline, no std; it defaults loss_aggregation to
    seq-mean-token-sum-norm), reinforce (RLOO, leave-one-out baseline), reinforce_pp (REINFORCE++: KL in
    the per-token reward, batch-whitened returns) or ppo (GAE with a value head)."""
    policy_loss: PolicyLossName = "ppo_clip"
    """ppo_clip: the clipped surrogate (a pipelined run takes its ratio to the proximal policy); cispo:
    the clipped, stop-gradient importance weight times A log pi (MiniMax-M1); gspo: the sequence-level
    ratio and clip (it defaults loss_aggregation to seq-mean-token-mean)."""
    loss_aggregation: AggregationName = "token-mean"
    """How the step's per-token losses become one (the same whatever learner.micro_batch_size):
    token-mean over all its response tokens, seq-mean-token-mean (each answer's token mean, averaged),
    seq-mean-token-sum (each answer's token sum, averaged), seq-mean-token-sum-norm (the sum over
    loss_scale_tokens, averaged: Dr. GRPO)."""
    loss_scale_tokens: int | None = Field(None, ge=1)
    """seq-mean-token-sum-norm's constant; None: rollout.max_new_tokens."""
    clip_eps: float = Field(0.2, gt=0)
    clip_eps_low: float | None = Field(None, gt=0)
    """The ratio's lower clip, 1 - clip_eps_low; None: clip_eps."""
    clip_eps_high: float | None = Field(None, gt=0)
    """The ratio's upper clip, 1 + clip_eps_high; None: clip_eps. DAPO's clip-higher: 0.2 / 0.28."""
    epochs: int = Field(1, ge=1)
    """Passes over each rollout batch."""
    gamma: float = Field(1.0, ge=0, le=1)
    lam: float = Field(0.95, ge=0, le=1)
    value_clip: float = Field(0.2, gt=0)
    vf_coef: float = Field(0.5, ge=0)
    entropy_coef: float = Field(0.0, ge=0)
    normalize_std: bool = True
    """GRPO: divide group-centred rewards by the group std."""
    dynamic_sampling: DynamicSamplingConfig = DynamicSamplingConfig()

    @model_validator(mode="before")
    @classmethod
    def _paper_aggregations(cls, data: Any) -> Any:
        """The aggregation each paper defines its method with, unless loss_aggregation is given.
        Dr. GRPO (Liu et al. 2025) is two changes: no std in the advantage (the dr_grpo estimator) and
        no 1/|o_i| in the loss, so one name chooses both; GSPO averages each answer's token mean."""
        if isinstance(data, dict) and "loss_aggregation" not in data:
            if data.get("name") == "dr_grpo":
                data = {**data, "loss_aggregation": "seq-mean-token-sum-norm"}
            elif data.get("policy_loss") == "gspo":
                data = {**data, "loss_aggregation": "seq-mean-token-mean"}
        return data

    @model_validator(mode="after")
    def _consistent(self) -> AlgorithmConfig:
        if self.eps_high < self.eps_low:
            raise ValueError(f"algorithm.clip_eps_high ({self.eps_high}) must be >= clip_eps_low ({self.eps_low})")
        if self.eps_low >= 1:
            raise ValueError(f"algorithm.clip_eps_low ({self.eps_low}) must be < 1: the ratio's lower clip is 1 - it")
        if self.dynamic_sampling.enabled and not ADVANTAGE_ESTIMATORS[self.name].group_relative:
            relative = [name for name, e in ADVANTAGE_ESTIMATORS.items() if e.group_relative]
            raise ValueError(f"algorithm.dynamic_sampling needs a group-relative estimator {relative}: under "
                             f"{self.name} a group of equal rewards still has non-zero advantages")  # fmt: skip
        return self

    @property
    def eps_low(self) -> float:
        return self.clip_eps if self.clip_eps_low is None else self.clip_eps_low

    @property
    def eps_high(self) -> float:
        return self.clip_eps if self.clip_eps_high is None else self.clip_eps_high


class LearnerConfig(StrictModel):
    num_ranks: int = Field(1, ge=1)
    zero_stage: int = Field(2, ge=0, le=3)
    """Used with 2+ ranks, offload or bf16; one plain rank runs torch directly (ZeRO over one rank
    partitions nothing, it only copies), with the same update."""
    offload: bool = False
    """ZeRO CPU offload of optimizer states (and parameters at stage 3)."""
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    lr: float = Field(3e-5, gt=0)
    """Chosen for the default's short run (24 steps); see benchmarks/README.md for its 3-seed figures."""
    weight_decay: float = Field(0.0, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    micro_batch_size: int = Field(16, ge=1)
    """Rows per forward/backward: the default's 16 rows per step in one pass (faster on CPU than two
    passes of 8: benchmarks/README.md)."""
    bf16: bool = False
    on_nonfinite: Literal["stop", "skip"] = "stop"
    """A loss or gradient norm that is NaN or infinite on some rank (the ranks agree): `stop` the run
    at that step (the last finite state is saved) or `skip` that optimizer update, logging each one
    and counting them in the metric skipped_updates. Either way non-finite weights are never saved or sent.
    A resumed run may change it (e.g. to skip past the step a run stopped at)."""
    num_cpus: float = Field(0.5, gt=0)
    num_gpus: float = Field(0.0, ge=0)
    torch_threads: int = Field(2, ge=1)
    gradient_checkpointing: bool = False
    packing: bool = False
    """The learner and the reference run the model on the step's real tokens packed into rows of
    about pack_tokens, not on rows padded to the longest prompt + longest response: the same
    log-probs, loss and gradients, without compute on padding (docs/performance_packing.md). Off by
    default: on the default's short, evenly sized rows (85% real tokens) packed took 1.07x the
    time (benchmarks/README.md); it pays where lengths vary widely."""
    share_prompts: bool = False
    """The samples of a group repeat one prompt: the learner and the reference run each distinct prompt
    once in packed rows, its samples' tokens after it, each attending to the prompt and to itself
    (docs/performance_packing.md). The same log-probs, loss and gradients; with long prompts (the math
    config's worked example) most of a step's tokens are prompt. Implies packed rows of pack_tokens."""
    pack_tokens: int = Field(256, ge=1)
    """About this many tokens per packed row (ceil(step tokens / pack_tokens) rows of near-equal
    length): attention is quadratic in a row's length, so short rows keep it a small share."""
    logits_chunk: int = Field(1024, ge=1)
    """Positions per LM-head chunk: full-vocabulary logits exist for this many positions at a time
    (recomputed in the backward pass when a micro-batch has more), so memory stays flat as responses grow."""

    @model_validator(mode="after")
    def _skip_needs_an_engine_that_drops(self) -> LearnerConfig:
        if self.on_nonfinite == "skip" and self.zero_stage == 0 and self.num_ranks > 1 and not self.bf16:
            raise ValueError("learner.on_nonfinite: skip needs learner.zero_stage >= 1 with several ranks: "
                             "DeepSpeed's ZeRO-0 in fp32 applies a non-finite gradient rather than drop it "
                             "(ZeRO 1-3 and bf16 drop it; zero_stage 1 costs nothing more)")
        return self

    @property
    def packed_row_tokens(self) -> int | None:
        """What the forward passes take: pack_tokens when packing or sharing prompts, None for padded rows."""
        return self.pack_tokens if self.packing or self.share_prompts else None
