"""Which device and dtype a role's model uses, from what the role was given and what the process has.

Ray gives an actor with num_gpus > 0 its GPU(s) through CUDA_VISIBLE_DEVICES, so the assigned GPU is
always `cuda:0` inside it (a fractional share too). An actor with num_gpus = 0 stays on the CPU even
when the node has GPUs: it did not reserve one.
"""

from __future__ import annotations

import os
import socket

import torch


def node_description() -> str:
    """This process's node as a user can find it: host name, plus Ray's node id and IP inside Ray."""
    host = socket.gethostname()
    try:
        import ray  # only to name the node; roles never launch anything

        if ray.is_initialized():
            node_id = ray.get_runtime_context().get_node_id()
            return f"{host} (Ray node {node_id[:12]}, {ray.util.get_node_ip_address()})"
    except Exception:  # noqa: BLE001 - a name for an error message must never raise itself
        pass
    return host


def role_device(num_gpus: float) -> str:
    """The device a role with this reservation runs on: the role table passes it to the actor."""
    return "cuda" if num_gpus > 0 else "cpu"


def select_device(device: str) -> torch.device:
    """`cuda` (the GPU Ray assigned) or `cpu`; a GPU role on a process without one is a clear error."""
    if device == "cpu":
        return torch.device("cpu")
    if device != "cuda":
        raise ValueError(f"device={device!r}: expected 'cuda' or 'cpu'")
    if not torch.cuda.is_available():
        raise RuntimeError(
            f"this role reserved a GPU (num_gpus > 0) but torch sees none on node {node_description()} "
            f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}, torch {torch.__version__}, "
            f"CUDA build {torch.version.cuda})"
        )
    return torch.device("cuda", 0)


def select_dtype(name: str, device: torch.device) -> torch.dtype:
    """policy.dtype: "auto" is bfloat16 on a GPU that supports it, float32 elsewhere (bf16 is slow on CPUs)."""
    if name == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float16 if device.type == "cuda" else torch.float32
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"policy.dtype={name!r} is not a torch dtype")
    return dtype


def set_deepspeed_accelerator(device: torch.device) -> None:
    """DeepSpeed picks its accelerator when first imported: name the one this process really uses, so
    a CPU learner on a GPU node stays on the CPU and a GPU learner never inherits `cpu` from a shell."""
    os.environ["DS_ACCELERATOR"] = "cuda" if device.type == "cuda" else "cpu"
