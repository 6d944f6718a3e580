"""A model's linear layers on oneDNN's GEMM with each weight packed once (CPU, fp32).

On the CPU, `F.linear` calls MKL's sgemm. On the AMD EPYC hosts we measure on (torch 2.13, MKL 2024.2)
it runs at ~200 GFLOP/s with 2 threads on 1,024 rows and slower still on the few rows of a decode
step, while oneDNN's inner product, with the weight reordered once into its own blocked layout, runs
2-3.2x faster from 1 row to 1,024 (`python benchmarks/cpu_linear.py`). Same fp32 arithmetic summed
in another order: outputs agree to float rounding.

Each layer keeps its packed copy beside its weight (its weights' memory doubles) and packs again when
the weight changes: a weight sync or a checkpoint load writes in place, which moves the tensor's
version. A fused optimizer step writes without moving it (torch 2.13's fused AdamW), so the optimizer
of a packed model that trains is named, and each of its steps drops the packs. Under autograd (the
one-rank learner) the forward runs packed and the backward on torch's matmul: packing the transpose
for the input's gradient cost about what it saved (benchmarks/README.md).
"""

from __future__ import annotations

from typing import cast

import torch
import torch.nn.functional as F

PACK_MIN_WIDTH = 256
"""Input widths from which packing pays; toy models (tests' widths of 2-64) are left as they are."""

PACK_ROWS_HINT = 64
"""The row count oneDNN lays the packed weight out for (any count runs; 16-64 measured best)."""


class _Pack:
    """A packed copy of a weight, made again when the weight's pointer or version moves. A copy or
    pickle of the model starts empty: a packed (opaque) tensor has no storage to copy."""

    def __init__(self) -> None:
        self.key: tuple[int, int] | None = None
        self.weight: torch.Tensor | None = None

    def __reduce__(self):
        return _Pack, ()

    def of(self, weight: torch.Tensor) -> torch.Tensor:
        key = (weight.data_ptr(), weight._version)
        if self.weight is None or self.key != key:
            self.key, self.weight = key, torch.ops.mkldnn._reorder_linear_weight(weight.detach(), PACK_ROWS_HINT)
        return self.weight


def onednn_available() -> bool:
    return bool(torch.backends.mkldnn.enabled) and torch.backends.mkldnn.is_available()


def pack_linears(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None) -> int:
    """Route every CPU fp32 nn.Linear of `model` at least PACK_MIN_WIDTH wide through a packed oneDNN
    weight; returns how many. Leaves the model as it is on a GPU or without oneDNN. `optimizer`: the
    one that trains the model, whose steps then drop the packs."""
    if not onednn_available():
        return 0
    if optimizer is not None:
        optimizer.register_step_post_hook(lambda *_: drop_packs(model))
    count = 0
    for layer in model.modules():
        weight = getattr(layer, "weight", None)
        if type(layer) is not torch.nn.Linear or weight is None or weight.device.type != "cpu":
            continue
        if weight.dtype != torch.float32 or layer.in_features < PACK_MIN_WIDTH:
            continue
        layer.__class__ = PackedLinear
        cast(PackedLinear, layer)._pack = _Pack()
        count += 1
    return count


def drop_packs(model: torch.nn.Module) -> None:
    """Forget every packed weight of the model: the next products pack the weights as they are now."""
    for layer in model.modules():
        if isinstance(layer, PackedLinear):
            layer._pack = _Pack()


def _packed_product(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x @ W^T (+ bias) over x's last dimension, W packed."""
    rows = x.reshape(-1, x.shape[-1]).contiguous()
    out = torch.ops.mkldnn._linear_pointwise(rows, packed, bias, "none", [], "")
    return out.reshape(*x.shape[:-1], out.shape[-1])


class PackedLinear(torch.nn.Linear):
    """An nn.Linear (same parameters, state dict and isinstance) whose products run on packed weights."""

    _pack: _Pack

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.weight, self.bias
        if x.dtype != weight.dtype or x.device != weight.device:  # autocast, a moved input: torch's way
            return F.linear(x, weight, bias)
        packed = self._pack.of(weight)
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias)):
            return _PackedFunction.apply(x, weight, bias, packed)
        return _packed_product(x, packed, bias)


class _PackedFunction(torch.autograd.Function):
    """F.linear's forward on the packed weight, its backward as torch computes it."""

    @staticmethod
    def forward(ctx, x, weight, bias, packed):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _packed_product(x, packed, bias)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = grad @ weight
        rows = grad.reshape(-1, grad.shape[-1])
        if ctx.needs_input_grad[1]:
            grad_w = rows.T @ x.reshape(-1, x.shape[-1])
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = rows.sum(0)
        return grad_x, grad_w, grad_b, None
