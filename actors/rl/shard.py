"""A learner rank's shard as one flat argument list: the driver packs it, the rank unpacks it.

Ray resolves an ObjectRef only when it is a top-level argument of a call, so the driver hands rank r
its trajectories, their rewards and their reference log-probs as one flat list
(`learner.learn_parts.remote(*parts[r])`): Ray then fetches each into the rank's process, never into
the driver's. Both sides of that layout are here. Shard i of a step goes to rank i % ranks.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

T = TypeVar("T")


def pack(trajectories: Sequence[T], rewards: Sequence[T], ref_logprobs: Sequence[T], ranks: int) -> list[list[T]]:
    """Per rank, its shards' trajectories, then their rewards, then their reference log-probs
    (None entries without a reference policy)."""
    if not len(trajectories) == len(rewards) == len(ref_logprobs):
        raise ValueError(
            f"one reward and one reference entry per trajectory: got {len(trajectories)} trajectories, "
            f"{len(rewards)} rewards, {len(ref_logprobs)} reference log-probs"
        )
    mine = [slice(rank, None, ranks) for rank in range(ranks)]
    return [[*trajectories[s], *rewards[s], *ref_logprobs[s]] for s in mine]


def unpack(parts: Sequence[T]) -> tuple[list[T], list[T], list[T]]:
    """A rank's (trajectories, rewards, reference log-probs), as `pack` laid them out."""
    if len(parts) % 3:
        raise ValueError(f"a shard is three lists of equal length; got {len(parts)} parts")
    n = len(parts) // 3
    return list(parts[:n]), list(parts[n : 2 * n]), list(parts[2 * n :])
