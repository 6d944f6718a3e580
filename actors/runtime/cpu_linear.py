"""The linear layers of a model that only infers, on oneDNN's GEMM with each weight packed once (CPU).

On the CPU, `F.linear` calls MKL's sgemm. On the AMD EPYC hosts we measure on (torch 2.13, MKL 2024.2)
it runs at ~200 GFLOP/s with 2 threads on 1,024 rows and slower still on the few rows of a decode
step, while oneDNN's inner product, with the weight reordered once into its own blocked layout, runs
1.6-2.4x faster from 1 row to 1,024 (`python benchmarks/cpu_linear.py`). Same fp32 arithmetic summed
in another order: outputs agree to float rounding.

Each layer keeps its packed copy beside its weight (its weights' memory doubles) and packs again when
the weight changes: a weight sync or a checkpoint load writes in place, which moves the tensor's
version. While autograd records through a layer (a learner), the layer takes the plain path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

PACK_MIN_WIDTH = 256
"""Input widths from which packing pays; toy models (tests' widths of 2-64) are left as they are."""

PACK_ROWS_HINT = 64
"""The row count oneDNN lays the packed weight out for (any count runs; 16-64 measured best)."""


class _Pack:
    """One layer's packed weight and the (pointer, version) of the weight it was packed from. A copy or
    pickle of the model starts empty: a packed (opaque) tensor has no storage to copy."""

    def __init__(self) -> None:
        self.key: tuple[int, int] | None = None
        self.weight: torch.Tensor | None = None

    def __reduce__(self):
        return _Pack, ()


def onednn_available() -> bool:
    return torch.backends.mkldnn.enabled and torch.backends.mkldnn.is_available()


def pack_linears(model: torch.nn.Module) -> int:
    """Route every CPU fp32 nn.Linear of `model` at least PACK_MIN_WIDTH wide through a packed oneDNN
    weight; returns how many. Leaves the model as it is on a GPU or without oneDNN."""
    if not onednn_available():
        return 0
    count = 0
    for layer in model.modules():
        weight = getattr(layer, "weight", None)
        if type(layer) is not torch.nn.Linear or weight is None or weight.device.type != "cpu":
            continue
        if weight.dtype != torch.float32 or layer.in_features < PACK_MIN_WIDTH:
            continue
        layer.__class__ = PackedLinear
        layer._pack = _Pack()
        count += 1
    return count


class PackedLinear(torch.nn.Linear):
    """An nn.Linear (same parameters, state dict and isinstance) whose inference runs on the packed weight."""

    _pack: _Pack

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight
        recording = torch.is_grad_enabled() and (weight.requires_grad or x.requires_grad)
        if recording or x.dtype != weight.dtype or x.device != weight.device:
            return F.linear(x, weight, self.bias)
        pack, key = self._pack, (weight.data_ptr(), weight._version)
        if pack.key != key:
            pack.key, pack.weight = key, torch.ops.mkldnn._reorder_linear_weight(weight.detach(), PACK_ROWS_HINT)
        rows = x.reshape(-1, x.shape[-1]).contiguous()
        out = torch.ops.mkldnn._linear_pointwise(rows, pack.weight, self.bias, "none", [], "")
        return out.reshape(*x.shape[:-1], out.shape[-1])
