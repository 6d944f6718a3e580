"""Padding-free forward passes: a batch's real tokens packed into a few rows, and back.

A step's rows are padded to its longest prompt plus its longest response, so a padded forward pass
spends compute on padding. Packing concatenates the sequences' real tokens into rows of about
`budget` tokens, with position ids that restart at 0 for each sequence
and no attention mask: transformers 5 then infers each sequence's bounds from the position ids and
builds a block-diagonal causal mask (masking_utils.find_packed_sequence_indices; the "padding-free
training" page of its docs), so no token attends across sequences and every token sees the positions
it sees in its padded row. A packed row's tail is padded up to the longest packed row as a sequence
of its own that nothing reads. A budget keeps each row's attention (quadratic in its length) small.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Layout:
    """Where the model input comes from and where each of its tokens came from, as flat indices.

    The model sees `input_ids` [R, L] with `position_ids` and `attention_mask` (None when packed);
    `source[i]` is the flat index into the padded [B, T] batch of the token at flat index
    `target[i]` of the model's [R, L] rows, for every real token."""

    input_ids: Tensor
    position_ids: Tensor
    attention_mask: Tensor | None
    source: Tensor
    target: Tensor


def padded_layout(input_ids: Tensor, attention_mask: Tensor, positions: Tensor) -> Layout:
    """The batch as it is: every real token stays where it is."""
    flat = attention_mask.reshape(-1).nonzero().squeeze(-1)
    return Layout(input_ids, positions, attention_mask, flat, flat)


def bins(lengths: list[int], budget: int) -> list[list[int]]:
    """Row indices in ceil(total / budget) groups of near-equal token sums (each packed row is padded
    to the longest): longest first, each into the group with the fewest tokens so far. A group then
    holds at most `budget` tokens plus its last sequence."""
    count = max(1, math.ceil(sum(lengths) / budget))
    groups: list[list[int]] = [[] for _ in range(count)]
    load = [0] * count
    for row in sorted(range(len(lengths)), key=lambda r: -lengths[r]):
        emptiest = load.index(min(load))
        groups[emptiest].append(row)
        load[emptiest] += lengths[row]
    return [group for group in groups if group]


def packed_layout(input_ids: Tensor, attention_mask: Tensor, budget: int) -> Layout:
    """The real tokens of each row (wherever its padding is), packed into rows of about `budget`."""
    batch, width = input_ids.shape
    real = attention_mask.bool()
    lengths = real.sum(-1).tolist()
    groups = bins(lengths, budget)
    packed_width = max(sum(lengths[r] for r in group) for group in groups)
    ids = input_ids.new_zeros(len(groups), packed_width)
    positions = torch.zeros_like(ids)
    source, target = [], []
    columns = torch.arange(width, device=input_ids.device)
    for g, group in enumerate(groups):
        start = 0
        for row in group:
            n = lengths[row]
            cols = columns[real[row]]
            ids[g, start : start + n] = input_ids[row, cols]
            positions[g, start : start + n] = torch.arange(n, device=ids.device)
            source.append(row * width + cols)
            target.append(g * packed_width + start + torch.arange(n, device=ids.device))
            start += n
        # the tail: a sequence of its own (positions restart), attended by nothing real
        positions[g, start:] = torch.arange(packed_width - start, device=ids.device)
    return Layout(ids, positions, None, torch.cat(source), torch.cat(target))
