"""Moving the policy's weights from learner rank 0 to the rollout workers, in the policy's dtype.

Two paths:
- `Weights` (CPU, any cluster): the state dict as numpy arrays in the object store, zero-copy on
  the way in and out. numpy has no bfloat16, so bf16 tensors travel as their raw 16-bit words and
  are viewed back as bf16 on arrival: a bf16 policy moves half the bytes of an fp32 copy, bit-exact.
- `BroadcastGroup` (GPUs): a torch.distributed group of learner rank 0 (rank 0) and the rollout
  workers (ranks 1..n), separate from the learner's own group; the state dict is broadcast in
  flat buckets of one dtype (NCCL on GPUs; gloo works too, which is how the CPU tests check it).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import torch

from rayrlhf.actors.rl.logprobs import from_numpy

_RAW = {torch.bfloat16: torch.int16}
"""dtypes numpy cannot hold, carried as same-width integers."""


@dataclass
class Weights:
    """A full state dict (HF names) as numpy arrays, with each tensor's torch dtype."""

    arrays: dict[str, np.ndarray]
    dtypes: dict[str, str]

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor]) -> Weights:
        arrays, dtypes = {}, {}
        for name, tensor in state.items():
            tensor = tensor.detach().to("cpu").contiguous()
            dtypes[name] = str(tensor.dtype).removeprefix("torch.")
            raw = _RAW.get(tensor.dtype)
            arrays[name] = (tensor.view(raw) if raw else tensor).numpy().copy()
        return cls(arrays, dtypes)

    def tensors(self) -> dict[str, torch.Tensor]:
        """The state dict again, sharing the arrays' memory, in the dtypes it was sent in."""
        out = {}
        for name, array in self.arrays.items():
            dtype = getattr(torch, self.dtypes[name])
            tensor = from_numpy(array)
            out[name] = tensor.view(dtype) if dtype in _RAW else tensor
        return out

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays.values())


def check_names(model: torch.nn.Module, names: set[str]) -> None:
    """The sender's state dict must name exactly the receiver's tensors."""
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - names), sorted(names - expected)
    if missing or unexpected:
        raise ValueError(
            f"weights do not match the policy's state dict: missing {missing[:5]} ({len(missing)} in all), "
            f"unexpected {unexpected[:5]} ({len(unexpected)} in all)"
        )


def buckets(tensors: list[tuple[str, torch.Tensor]], bucket_bytes: int) -> list[list[tuple[str, torch.Tensor]]]:
    """Consecutive runs of one dtype, each at most `bucket_bytes` (a bigger tensor gets a bucket of its own)."""
    out: list[list[tuple[str, torch.Tensor]]] = []
    size = 0
    for name, tensor in tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if not out or out[-1][-1][1].dtype != tensor.dtype or size + nbytes > bucket_bytes:
            out.append([])
            size = 0
        out[-1].append((name, tensor))
        size += nbytes
    return out


class BroadcastGroup:
    """Rank 0 (learner rank 0) sends, ranks 1..n (rollout workers) receive, bucket by bucket.

    Both sides walk the same state dict (same architecture, same order); the receiver's tensors set
    each bucket's dtype and size, and the sender casts to them, so a bf16 rollout receives bf16.
    """

    def __init__(self, *, master_addr: str, master_port: int, rank: int, world_size: int, backend: str,
                 device: torch.device, bucket_bytes: int = 256 << 20, timeout_s: float = 600) -> None:  # fmt: skip
        timeout = timedelta(seconds=timeout_s)
        store = torch.distributed.TCPStore(master_addr, master_port, world_size, is_master=rank == 0, timeout=timeout)
        if backend == "nccl":
            self.group = torch.distributed.ProcessGroupNCCL(store, rank, world_size)
        else:
            self.group = torch.distributed.ProcessGroupGloo(store, rank, world_size, timeout)
        self.rank, self.device, self.bucket_bytes = rank, device, bucket_bytes

    def _broadcast(self, flat: torch.Tensor) -> None:
        opts = torch.distributed.BroadcastOptions()
        opts.rootRank = 0
        self.group.broadcast([flat], opts).wait()

    def send(self, state: dict[str, torch.Tensor], dtypes: dict[str, torch.dtype]) -> None:
        """Rank 0: broadcast `state`, each tensor cast to the receivers' dtype (`dtypes`, by name)."""
        cast = [(name, tensor.detach().to(self.device, dtypes[name])) for name, tensor in state.items()]
        for bucket in buckets(cast, self.bucket_bytes):
            self._broadcast(torch.cat([t.reshape(-1) for _, t in bucket]))

    @torch.no_grad()
    def receive(self, model: torch.nn.Module) -> None:
        """Ranks 1..n: overwrite the model's state dict in place with rank 0's."""
        state = list(model.state_dict().items())
        for bucket in buckets(state, self.bucket_bytes):
            flat = torch.empty(sum(t.numel() for _, t in bucket), dtype=bucket[0][1].dtype, device=self.device)
            self._broadcast(flat)
            offset = 0
            for _, tensor in bucket:
                tensor.copy_(flat[offset : offset + tensor.numel()].view_as(tensor))
                offset += tensor.numel()
