"""Config schemas of the two supervised jobs, `rayrlhf train-rm` (RMConfig) and `rayrlhf sft`
(SFTConfig): the one home of their defaults, in the style (and with the helpers) of jobs/config/run.py.
Both run as a Ray Train TorchTrainer with DeepSpeed inside; `trainer` says how.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, TypeVar

from pydantic import BaseModel, Field, model_validator

from rayrlhf.jobs.config.base import (
    StrictModel,
    load_yaml,
    merge,
    parse_overrides,
    resolve_config_path,
    validate,
)
from rayrlhf.jobs.config.run import ClusterConfig, DataConfig, PolicyConfig

M = TypeVar("M", bound=BaseModel)

LossName = Literal["bradley_terry", "hinge", "triplet", "mse", "cross_entropy", "focal"]
"""actors/supervised/rm_losses.py LOSSES, written out so that validating a config never imports torch."""


class TrainerConfig(StrictModel):
    """The Ray Train workers and the DeepSpeed engine in each (keys shared with the RL learner's
    DeepSpeed config builder: zero_stage, offload, micro_batch_size, grad_clip, bf16)."""

    num_workers: int = Field(1, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0)
    zero_stage: int = Field(2, ge=0, le=3)
    offload: bool = False
    lr: float = Field(5e-5, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    micro_batch_size: int = Field(16, ge=1)
    """Per worker and step: preference pairs (train-rm) or examples (sft)."""
    accumulation: int = Field(1, ge=1)
    epochs: int = Field(1, ge=1)
    max_steps: int | None = Field(None, ge=1)
    """Stop after this many optimizer steps in all (across epochs); None: run every epoch."""
    eval_every: int = Field(0, ge=0)
    """Held-out metrics every N steps (0: only before and after training)."""
    checkpoint_every: int = Field(0, ge=0)
    """Ray Train checkpoint every N steps (0: only at the end)."""
    bf16: bool = False
    torch_threads: int = Field(1, ge=1)

    @model_validator(mode="after")
    def _consistent(self) -> TrainerConfig:
        if self.offload and self.zero_stage == 0:
            raise ValueError("trainer.offload needs trainer.zero_stage >= 1")
        return self


class RMDataConfig(StrictModel):
    train: str = "builtin"
    """"builtin" (pairs derived from the built-in task) or a JSONL/Parquet file of preference pairs
    (prompt, chosen, rejected) or rated samples (prompt, response, score and/or label)."""
    eval: str | None = None
    num_train: int = Field(1024, ge=1)
    num_eval: int = Field(256, ge=1)


class RMLossConfig(StrictModel):
    name: LossName = "bradley_terry"
    bt_margin: float = 0.0
    hinge_margin: float = Field(1.0, ge=0)
    triplet_margin: float = Field(0.5, ge=0)
    """On unit-length embeddings, whose distances lie in [0, 2]."""
    focal_gamma: float = Field(2.0, ge=0)
    focal_alpha: float | None = Field(None, ge=0, le=1)


class RMConfig(StrictModel):
    name: str = "rm"
    seed: int = 0
    output_dir: str = "outputs/rm"
    model: str = "all-minilm-l6-v2"
    """Backbone: all-minilm-l6-v2 (the embedded default), a built-in policy name, an HF directory or hub id."""
    cache_dir: str | None = None
    max_length: int = Field(96, ge=8)
    score_batch_size: int = Field(64, ge=1)
    """Rows per forward pass when scoring held-out data."""
    resume: bool = True
    """Continue from the latest Ray Train checkpoint under output_dir if one exists; false: start over."""
    data: RMDataConfig = RMDataConfig()
    loss: RMLossConfig = RMLossConfig()
    trainer: TrainerConfig = TrainerConfig(lr=5e-5, micro_batch_size=16, num_workers=2)
    cluster: ClusterConfig = ClusterConfig()


class SFTConfig(StrictModel):
    name: str = "sft"
    seed: int = 0
    output_dir: str = "outputs/sft"
    max_response_tokens: int = Field(64, ge=1)
    resume: bool = True
    policy: PolicyConfig = PolicyConfig()
    data: DataConfig = DataConfig()
    """train "builtin" fine-tunes on the built-in task's references; a file has prompt + response."""
    trainer: TrainerConfig = TrainerConfig(lr=1e-5, micro_batch_size=8)
    cluster: ClusterConfig = ClusterConfig()


def load_job_config(model: type[M], path: str | Path | None, overrides: list[str] | None, default: str) -> M:
    """A YAML file (or a name in ray_configs/) plus `a.b=value` overrides, validated against `model`."""
    cfg_path = resolve_config_path(path, default)
    data = merge(load_yaml(cfg_path), parse_overrides(overrides or []))
    return validate(model, data, str(cfg_path))
