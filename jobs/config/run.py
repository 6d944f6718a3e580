"""The run-config schema: the one home of every default.

YAML files in ray_configs/ are validated against `RunConfig`; a bad field fails here, with its
dotted name, before any Ray resource is claimed. Actors never import this module: the driver
hands them plain keyword arguments (`cfg.reward.model_dump()`), so the dependency stays
jobs -> actors.

This module is the top level and what ties the sections together; the sections live beside it
(policy.py: policy, data, rollout; reward.py; training.py: kl, algorithm, learner; operations.py:
cluster, logging, monitor, eval, checkpoint, pipeline, fault_tolerance; env.py), and every one of
them is importable from here.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, model_validator

from rayrlhf.actors.environments.episode import EPISODE_FIELDS
from rayrlhf.jobs.config.base import StrictModel, load_yaml, merge, parse_overrides, resolve_config_path, validate
from rayrlhf.jobs.config.env import EnvConfig
from rayrlhf.jobs.config.operations import (
    CheckpointConfig,
    ClusterConfig,
    EvalConfig,
    FaultToleranceConfig,
    LoggingConfig,
    MonitorConfig,
    PipelineConfig,
)
from rayrlhf.jobs.config.policy import BUILTIN_NUM_TRAIN, DataConfig, LoraConfig, PolicyConfig, RolloutConfig
from rayrlhf.jobs.config.reward import RemoteRewardConfig, RewardConfig, RewardFunctionConfig, function_name
from rayrlhf.jobs.config.training import AlgorithmConfig, DynamicSamplingConfig, KLConfig, LearnerConfig

__all__ = [  # the sections, importable from here: this module is the schema's entry point
    "AlgorithmConfig", "BUILTIN_NUM_TRAIN", "CheckpointConfig", "ClusterConfig", "DataConfig", "DynamicSamplingConfig",
    "EnvConfig", "EvalConfig", "FaultToleranceConfig", "KLConfig", "LearnerConfig", "LoggingConfig", "LoraConfig",
    "MonitorConfig", "PipelineConfig", "PolicyConfig", "RemoteRewardConfig", "RewardConfig", "RewardFunctionConfig",
    "RolloutConfig", "RunConfig", "function_name", "load_config",
]


class RunConfig(StrictModel):
    name: str = "rayrlhf"
    seed: int = 0
    steps: int = Field(24, ge=0)
    prompts_per_step: int = Field(4, ge=1)
    """x rollout.samples_per_prompt rows per step; 4 x 4 keeps the default's steps short on 2 CPU cores."""
    eval_every: int = Field(0, ge=0)
    """Evaluate on held-out prompts every N steps (0: only before and after training)."""
    eval_max_new_tokens: int | None = None
    output_dir: str = "outputs/rayrlhf"
    """A local path, a path on a filesystem every node mounts, or a pyarrow.fs URI (s3://, gs://, file://):
    the driver writes logs there and learner rank 0 writes policies there, from whatever node it runs on."""
    policy: PolicyConfig = PolicyConfig()
    data: DataConfig = DataConfig()
    rollout: RolloutConfig = RolloutConfig()
    reward: RewardConfig = RewardConfig()
    kl: KLConfig = KLConfig()
    algorithm: AlgorithmConfig = AlgorithmConfig()
    learner: LearnerConfig = LearnerConfig()
    cluster: ClusterConfig = ClusterConfig()
    logging: LoggingConfig = LoggingConfig()
    monitor: MonitorConfig = MonitorConfig()
    eval: EvalConfig = EvalConfig()
    """How held-out answers are decoded (eval_every and eval_max_new_tokens say when and how long)."""
    checkpoint: CheckpointConfig = CheckpointConfig()
    fault_tolerance: FaultToleranceConfig = FaultToleranceConfig()
    pipeline: PipelineConfig = PipelineConfig()
    env: EnvConfig | None = None
    """A multi-turn environment (docs/environments.md); None: one prompt, one answer."""

    @model_validator(mode="before")
    @classmethod
    def _episode_components(cls, data: object) -> object:
        """With an environment, the episode's fields are reward components: env_reward (weight 1 unless
        listed) trains, env_success / env_turns / env_tool_calls / env_invalid_calls / env_cut (weight 0) are logged."""
        if not isinstance(data, dict) or not data.get("env"):
            return data
        reward = dict(data.get("reward") or {})
        functions = list(reward.get("functions") or [])
        listed = {f.get("path") for f in functions if isinstance(f, dict)}
        functions += [{"path": name, "weight": 1.0 if name == "env_reward" else 0.0}
                      for name in EPISODE_FIELDS if name not in listed]  # fmt: skip
        return {**data, "reward": {**reward, "functions": functions}}

    @model_validator(mode="before")
    @classmethod
    def _save_every(cls, data: object) -> object:
        """`save_every: N` (the older spelling) means checkpoint.every = N."""
        if isinstance(data, dict) and "save_every" in data:
            data = dict(data)
            every = data.pop("save_every")
            section = dict(data.get("checkpoint") or {})
            if "every" in section and section["every"] != every:
                raise ValueError(f"save_every ({every}) and checkpoint.every ({section['every']}) disagree; give one")
            data["checkpoint"] = {**section, "every": every}
        return data

    @model_validator(mode="after")
    def _consistent(self) -> RunConfig:
        if self.prompts_per_step % self.rollout.num_workers:
            raise ValueError(
                f"prompts_per_step ({self.prompts_per_step}) must be a multiple of "
                f"rollout.num_workers ({self.rollout.num_workers})"
            )
        if self.rollout.num_workers % self.learner.num_ranks and self.learner.num_ranks % self.rollout.num_workers:
            raise ValueError(
                f"rollout.num_workers ({self.rollout.num_workers}) and learner.num_ranks "
                f"({self.learner.num_ranks}) must divide one another"
            )
        if self.prompts_per_step % self.learner.num_ranks:
            raise ValueError(
                f"prompts_per_step ({self.prompts_per_step}) must be a multiple of "
                f"learner.num_ranks ({self.learner.num_ranks})"
            )
        if self.algorithm.name in ("grpo", "dr_grpo") and self.rollout.samples_per_prompt < 2:
            raise ValueError(f"algorithm.name={self.algorithm.name} needs rollout.samples_per_prompt >= 2")
        if self.algorithm.dynamic_sampling.enabled and self.rollout.samples_per_prompt < 2:
            raise ValueError(
                "algorithm.dynamic_sampling needs rollout.samples_per_prompt >= 2: a group of one is constant"
            )
        remote = self.reward.remote
        if remote is not None and (remote.retries + 1) * remote.timeout_s >= self.fault_tolerance.score_timeout_s:
            raise ValueError(
                f"reward.remote: {remote.retries + 1} tries of timeout_s={remote.timeout_s:g} do not fit in "
                f"fault_tolerance.score_timeout_s={self.fault_tolerance.score_timeout_s:g}: lower them or raise it"
            )
        if self.env is not None and not self.data.use_chat_template:
            raise ValueError("env needs data.use_chat_template=true: the chat template renders environment messages")
        if self.env is not None and self.eval.num_beams > 1:
            raise ValueError("env: eval.num_beams must be 1 (beam search does not play multi-turn episodes)")
        if self.learner.backend == "nccl" and self.learner.num_gpus <= 0:
            raise ValueError("learner.backend=nccl needs learner.num_gpus > 0")
        return self


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    cfg_path = resolve_config_path(path)
    data = merge(load_yaml(cfg_path), parse_overrides(overrides or []))
    return validate(RunConfig, data, str(cfg_path))
