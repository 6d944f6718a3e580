"""The run-config schema: the one home of every default.

YAML files in ray_configs/ are validated against `RunConfig`; a bad field fails here, with its
dotted name, before any Ray resource is claimed. Actors never import this module: the driver
hands them plain keyword arguments (`cfg.reward.model_dump()`), so the dependency stays
jobs -> actors.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from rayrlhf.jobs.config.base import (
    StrictModel,
    load_yaml,
    merge,
    parse_overrides,
    resolve_config_path,
    validate,
)


class LoraConfig(StrictModel):
    """Low-rank adapters (peft): the learner trains only these; rollout and saved models get them
    merged into the weights, so everything downstream still loads a plain HF directory."""

    rank: int = Field(16, ge=1)
    alpha: float = Field(32.0, gt=0)
    """Scale of the adapters' output is alpha / rank."""
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    """Names (or name suffixes) of the linear layers that get adapters; Llama's attention by default."""


class PolicyConfig(StrictModel):
    model: str = "smollm2-135m-instruct"
    """A built-in name (smollm2-135m-instruct, tiny-gpt2), a local HF directory or a hub id."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    max_prompt_tokens: int = Field(256, ge=8)
    cache_dir: str | None = None
    """Where converted built-in models are kept; default ~/.cache/rayrlhf."""
    lora: LoraConfig | None = None
    """None: full fine-tuning. Set any field (e.g. policy.lora.rank=16) to train LoRA adapters."""


class DataConfig(StrictModel):
    train: str = "builtin"
    """"builtin" or a JSONL/Parquet file with `prompt` and optional `reference` fields."""
    eval: str | None = None
    """Held-out file; with train="builtin" the built-in held-out split is used."""
    num_train: int = Field(512, ge=1)
    num_eval: int = Field(100, ge=1)
    use_chat_template: bool = True
    system_prompt: str | None = None


class RolloutConfig(StrictModel):
    num_workers: int = Field(1, ge=1)
    samples_per_prompt: int = Field(4, ge=1)
    max_new_tokens: int = Field(32, ge=1)
    """The base SmolLM2 answers the built-in task in ~14 tokens; 32 truncates few answers."""
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    num_cpus: float = Field(0.5, gt=0)
    num_gpus: float = Field(0.0, ge=0)
    torch_threads: int = Field(2, ge=1)


class RewardConfig(StrictModel):
    alpha: float = 1.0
    """Weight of r_freq, the word-frequency fluency reward."""
    beta: float = 1.0
    """Weight of r_sim, embedding cosine similarity to the reference answer."""
    bleu: float = 0.0
    rouge_l: float = 0.0
    freq_mode: Literal["mean", "sum"] = "mean"
    """mean: average log10 frequency per word; sum: the seed's literal sum (favours short answers)."""
    empty_reward: float = -1.0
    """Total reward of an answer with no words (empty, blank, punctuation): the degenerate optimum."""
    embedding_model: str = "all-minilm-l6-v2"
    normalize: Literal["none", "total", "components"] = "components"
    """Running mean/std z-score of the total, or of each component before weighting."""
    num_scorers: int = Field(1, ge=1)
    num_cpus: float = Field(0.25, gt=0)
    torch_threads: int = Field(1, ge=1)
    rm_weight: float = 0.0
    """Weight γ of r_rm(x, y), a learned reward model; 0: no reward model is loaded."""
    rm_model: str | None = None
    """Directory written by `rayrlhf train-rm` (its final/ folder); needed when rm_weight != 0."""
    rm_batch_size: int = Field(32, ge=1)
    """Rows per reward-model forward pass inside a reward scorer."""

    @model_validator(mode="after")
    def _rm_needs_model(self) -> RewardConfig:
        if self.rm_weight != 0 and not self.rm_model:
            raise ValueError("reward.rm_weight != 0 needs reward.rm_model (a directory from `rayrlhf train-rm`)")
        return self


class KLConfig(StrictModel):
    coef: float = Field(0.05, ge=0)
    estimator: Literal["k1", "k3"] = "k3"
    adaptive: bool = False
    target: float = Field(0.1, gt=0)
    """Target KL per token for the adaptive controller."""
    horizon: int = Field(1000, ge=1)
    num_cpus: float = Field(0.25, gt=0)
    """Launch options of the reference-policy actor, which exists only when the KL term is on."""
    torch_threads: int = Field(2, ge=1)
    """It overlaps the reward scorers, but they finish in a second or two; then it runs alone."""


class AlgorithmConfig(StrictModel):
    name: Literal["grpo", "ppo", "reinforce"] = "grpo"
    clip_eps: float = Field(0.2, gt=0)
    epochs: int = Field(1, ge=1)
    """Passes over each rollout batch."""
    gamma: float = Field(1.0, ge=0, le=1)
    lam: float = Field(0.95, ge=0, le=1)
    value_clip: float = Field(0.2, gt=0)
    vf_coef: float = Field(0.5, ge=0)
    entropy_coef: float = Field(0.0, ge=0)
    normalize_std: bool = True
    """GRPO: divide group-centred rewards by the group std."""


class LearnerConfig(StrictModel):
    num_ranks: int = Field(1, ge=1)
    zero_stage: int = Field(2, ge=0, le=3)
    """Used with 2+ ranks, offload or bf16; one plain rank runs torch directly (ZeRO over one rank
    partitions nothing, it only copies), with the same update."""
    offload: bool = False
    """ZeRO CPU offload of optimizer states (and parameters at stage 3)."""
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    lr: float = Field(3e-5, gt=0)
    """Chosen for the default's short run (12 steps); see benchmarks/README.md for its 3-seed figures."""
    weight_decay: float = Field(0.0, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    micro_batch_size: int = Field(8, ge=1)
    bf16: bool = False
    num_cpus: float = Field(0.5, gt=0)
    num_gpus: float = Field(0.0, ge=0)
    torch_threads: int = Field(2, ge=1)
    gradient_checkpointing: bool = False


class ClusterConfig(StrictModel):
    address: str | None = None
    """None: start Ray in-process on loopback (or attach to $RAY_ADDRESS)."""
    num_cpus: int | None = Field(None, ge=1)
    object_store_mb: int = Field(1024, ge=64)
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"


class LoggingConfig(StrictModel):
    wandb: Literal["offline", "online", "disabled"] = "offline"
    wandb_project: str = "rayrlhf"
    tensorboard: bool = True
    progress_bar: bool = True


class RunConfig(StrictModel):
    name: str = "rayrlhf"
    seed: int = 0
    steps: int = Field(12, ge=0)
    prompts_per_step: int = Field(4, ge=1)
    """x rollout.samples_per_prompt rows per step; 4 x 4 keeps the default at ~45 s per step on 2 cores."""
    eval_every: int = Field(0, ge=0)
    """Evaluate on held-out prompts every N steps (0: only before and after training)."""
    eval_max_new_tokens: int | None = None
    save_every: int = Field(0, ge=0)
    output_dir: str = "outputs/rayrlhf"
    policy: PolicyConfig = PolicyConfig()
    data: DataConfig = DataConfig()
    rollout: RolloutConfig = RolloutConfig()
    reward: RewardConfig = RewardConfig()
    kl: KLConfig = KLConfig()
    algorithm: AlgorithmConfig = AlgorithmConfig()
    learner: LearnerConfig = LearnerConfig()
    cluster: ClusterConfig = ClusterConfig()
    logging: LoggingConfig = LoggingConfig()

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
        if self.algorithm.name == "grpo" and self.rollout.samples_per_prompt < 2:
            raise ValueError("algorithm.name=grpo needs rollout.samples_per_prompt >= 2")
        if self.learner.backend == "nccl" and self.learner.num_gpus <= 0:
            raise ValueError("learner.backend=nccl needs learner.num_gpus > 0")
        return self


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    cfg_path = resolve_config_path(path)
    data = merge(load_yaml(cfg_path), parse_overrides(overrides or []))
    return validate(RunConfig, data, str(cfg_path))
