"""Padding-free forward passes: a batch's real tokens packed into a few rows, and back.

A step's rows are padded to its longest prompt plus its longest response, so a padded forward pass
spends compute on padding. Packing concatenates the sequences' real tokens into rows of about
`budget` tokens, with position ids that restart at 0 for each sequence
and no attention mask: transformers 5 then infers each sequence's bounds from the position ids and
builds a block-diagonal causal mask (masking_utils.find_packed_sequence_indices; the "padding-free
training" page of its docs), so no token attends across sequences and every token sees the positions
it sees in its padded row. A packed row's tail is padded up to the longest packed row as a sequence
of its own that nothing reads. A budget keeps each row's attention (quadratic in its length) small.

Shared prompts (`shared_prompt_layout`): the samples of a group repeat one prompt, and in a
verifiable-reward step the prompt is most of the tokens (math: ~100 of ~130 a row). Rows whose tokens
before a column are the same run those tokens once; each row's own tokens follow that one copy with
the positions they have in their own row and attend to it and to themselves, never to a sibling
(an explicit 4D mask). A causal model's state over a prefix depends on the prefix alone, so every
log-prob is the one the padded row gives, and the gradient through the shared copy is the sum over
the rows that read it, as the padded batch's is.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Layout:
    """Where the model input comes from and where each of its tokens came from, as flat indices.

    The model sees `input_ids` [R, L] with `position_ids` and `attention_mask` (None when packed,
    [R, 1, L, L] bool, True where a query may attend, when prompts are shared); `source[i]` is the flat
    index into the padded [B, T] batch of the token at flat index `target[i]` of the model's [R, L]
    rows, for every real token (several sources may share a target)."""

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


def shared_prompt_layout(input_ids: Tensor, attention_mask: Tensor, prefix_end: int, budget: int) -> Layout:
    """Rows whose real tokens before column `prefix_end` are the same (a group's prompt) run them once:
    a segment is that prefix then each row's remaining tokens in turn; segments are packed into rows
    of about `budget` tokens as `packed_layout` packs sequences."""
    batch, width = input_ids.shape
    real = attention_mask.bool()
    groups: dict[tuple[int, ...], list[int]] = {}
    for row in range(batch):
        groups.setdefault(tuple(input_ids[row, :prefix_end][real[row, :prefix_end]].tolist()), []).append(row)
    segments = list(groups.values())
    columns = torch.arange(width, device=input_ids.device)
    head = [columns[:prefix_end][real[row, :prefix_end]] for row in range(batch)]
    tail = [columns[prefix_end:][real[row, prefix_end:]] for row in range(batch)]
    lengths = [len(head[rows[0]]) + sum(len(tail[r]) for r in rows) for rows in segments]
    packed = bins(lengths, budget)
    packed_width = max(sum(lengths[s] for s in members) for members in packed)
    ids = input_ids.new_zeros(len(packed), packed_width)
    positions, segment, branch = torch.zeros_like(ids), torch.full_like(ids, -1), torch.zeros_like(ids)
    source, target = [], []
    for r, members in enumerate(packed):
        start = 0
        for s in members:
            rows = segments[s]
            n = len(head[rows[0]])
            span = torch.arange(start, start + n, device=ids.device)
            ids[r, span], positions[r, span], segment[r, span] = input_ids[rows[0], head[rows[0]]], span - start, s
            for row_index in rows:  # every row's prefix tokens read the one copy
                source.append(row_index * width + head[row_index])
                target.append(r * packed_width + span)
            start += n
            for b, row_index in enumerate(rows, start=1):
                m = len(tail[row_index])
                own = torch.arange(start, start + m, device=ids.device)
                ids[r, own], positions[r, own] = input_ids[row_index, tail[row_index]], own - start + n
                segment[r, own], branch[r, own] = s, b
                source.append(row_index * width + tail[row_index])
                target.append(r * packed_width + own)
                start += m
        segment[r, start:] = len(segments) + r  # the tail: a causal sequence of its own, read by nothing
        positions[r, start:] = torch.arange(packed_width - start, device=ids.device)
    order = torch.arange(packed_width, device=ids.device)
    mask = (
        (segment.unsqueeze(2) == segment.unsqueeze(1))  # [R, query, key]: same segment
        & (order.view(1, 1, -1) <= order.view(1, -1, 1))  # causal
        & ((branch.unsqueeze(1) == 0) | (branch.unsqueeze(1) == branch.unsqueeze(2)))  # the prefix or its own
    )
    return Layout(ids, positions, mask.unsqueeze(1), torch.cat(source), torch.cat(target))
