"""The policy sections of a run config: the model trained (policy), its prompts (data) and how the
rollout samples from it (rollout). Part of the run-config schema (jobs/config/run.py)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from rayrlhf.jobs.config.base import StrictModel


class LoraConfig(StrictModel):
    """Low-rank adapters (peft): the learner trains only these; rollout and saved models get them
    merged into the weights, so everything downstream still loads a plain HF directory."""

    rank: int = Field(16, ge=1)
    alpha: float = Field(32.0, gt=0)
    """Scale of the adapters' output is alpha / rank."""
    target_modules: list[str] | Literal["all-linear"] = "all-linear"
    """Names (or name suffixes) of the layers that get adapters, or "all-linear" (peft: every linear
    layer but the output head), which fits any architecture."""


class PolicyConfig(StrictModel):
    model: str = "smollm2-135m-instruct"
    """A built-in name (smollm2-135m-instruct, tiny-gpt2), a local HF directory or a hub id."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Of the rollout and reference models (and of the weights sent to them): auto is bfloat16 on a GPU,
    float32 on a CPU. The learner keeps fp32 master weights; learner.bf16 makes it compute in bf16."""
    max_prompt_tokens: int = Field(256, ge=8)
    cache_dir: str | None = None
    """Where each node keeps converted built-in models; default $RAYRLHF_CACHE, else ~/.cache/rayrlhf (on that node)."""
    lora: LoraConfig | None = None
    """None: full fine-tuning. Set any field (e.g. policy.lora.rank=16) to train LoRA adapters."""


BUILTIN_NUM_TRAIN = 512
"""Training items drawn from a built-in task when data.num_train is not set."""


class DataConfig(StrictModel):
    train: str = "builtin"
    """"builtin" (short factual questions), "builtin_math" (arithmetic word problems in GSM8K's
    format), "builtin_guess_number" (games for env.path=guess_number), or a JSONL/Parquet file with
    `prompt` and optional `reference` fields (or GSM8K's `question` and `answer`)."""
    eval: str | None = None
    """Held-out file; with a built-in train task its own held-out split is used."""
    num_train: int | None = Field(None, ge=1)
    """At most this many training prompts; unset: every row of a file, BUILTIN_NUM_TRAIN of a built-in task."""
    num_eval: int = Field(100, ge=1)
    use_chat_template: bool = True
    system_prompt: str | None = None
    overlong_prompts: Literal["error", "truncate"] = "error"
    """A prompt longer than policy.max_prompt_tokens once rendered (chat template, system prompt):
    "error" stops before Ray starts, naming it; "truncate" cuts it from the left and says how many were."""
    episodes: str | None = None
    """A JSONL file of episodes recorded through the Serve gateway (jobs/data/episodes.py): the steps train
    them instead of generating, prompts_per_step x rollout.samples_per_prompt per step in file order (each
    samples_per_prompt consecutive episodes a group), with the importance correction of pipeline.is_cap.
    data.train still gives the held-out evaluation."""


class RolloutConfig(StrictModel):
    num_workers: int = Field(1, ge=1)
    samples_per_prompt: int = Field(4, ge=1)
    max_new_tokens: int = Field(32, ge=1)
    """The base SmolLM2 answers the built-in task in ~14 tokens; 32 truncates few answers."""
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    num_cpus: float = Field(0.5, gt=0)
    num_gpus: float = Field(0.0, ge=0)
    """>0 puts the rollout model on the GPU Ray assigns; a fraction lets roles share one GPU."""
    torch_threads: int = Field(2, ge=1)
    max_batch_rows: int = Field(256, ge=1)
    """Rows (prompts x samples) one rollout worker decodes at once; a larger call, such as an
    evaluation with eval.samples_per_prompt, runs its prompts through the batch as rows free up, so
    its KV cache stays bounded (800 rows of SmolLM2 held ~10 GB)."""
