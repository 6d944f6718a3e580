"""Which engine steps the policy: DeepSpeed ZeRO across ranks (and for offload or bf16), or the
plain one-rank engine (actors/runtime/plain_engine.py) where ZeRO would have nothing to partition. Shared by
the RL learner and the supervised (SFT, reward-model) workers."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from rayrlhf.jobs.config.run import LearnerConfig


def use_plain_engine(world_size: int, learner: LearnerConfig) -> bool:
    """One rank without offload or bf16: ZeRO would partition over one rank, i.e. do nothing but
    copies, so the learner runs plain torch (PlainEngine) whatever zero_stage says."""
    return world_size == 1 and not learner.offload and not learner.bf16


def deepspeed_engine(
    module: nn.Module, optimizer, learner: LearnerConfig, world_size: int, accumulation: int, device: torch.device
):
    import deepspeed  # imported here: it picks its accelerator at import time (set_deepspeed_accelerator)

    backend = learner.backend
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    init_distributed(backend)
    engine, *_ = deepspeed.initialize(
        model=module, optimizer=optimizer, config=deepspeed_config(learner.model_dump(), world_size, accumulation)
    )
    return engine


def init_distributed(backend: str) -> None:
    """DeepSpeed's process group (gloo or nccl), for the RL learner and the Ray Train workers alike."""
    import deepspeed

    skip_shared_memory_op()
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False)


def skip_shared_memory_op() -> None:
    """DeepSpeed's CPU backend JIT-builds a shared-memory all-reduce op at its first init (about 34 s
    on a fresh machine) that only tensor-parallel inference uses, never a ZeRO step. Its build lock
    is a plain file: a rank killed mid-build (a fault test, a preemption) leaves it behind, and every
    later init on that machine waits for it forever (a clean-clone CI run hung there, 2026-12-05)."""
    import importlib

    # by module path: the attribute `deepspeed.comm.torch` is torch itself
    setattr(importlib.import_module("deepspeed.comm.torch"), "build_shm_op", lambda: None)


def deepspeed_config(learner: dict[str, Any], world_size: int, accumulation: int) -> dict[str, Any]:
    stage = learner["zero_stage"]
    zero: dict[str, Any] = {"stage": stage}
    if learner["offload"]:
        if stage == 0:
            raise ValueError("learner.offload needs learner.zero_stage >= 1")
        zero["offload_optimizer"] = {"device": "cpu"}
        if stage == 3:
            zero["offload_param"] = {"device": "cpu"}
    return {
        "train_micro_batch_size_per_gpu": learner["micro_batch_size"],
        "gradient_accumulation_steps": accumulation,
        "train_batch_size": learner["micro_batch_size"] * accumulation * world_size,
        "gradient_clipping": learner["grad_clip"],
        "zero_optimization": zero,
        "zero_force_ds_cpu_optimizer": False,  # keep torch AdamW: DeepSpeed's CPU Adam is a slow JIT build
        "bf16": {"enabled": learner["bf16"]},
        "steps_per_print": 1 << 30,
    }
