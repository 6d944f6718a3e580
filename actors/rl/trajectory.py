"""The batch that flows rollout -> reward/reference -> learner through the object store.

Arrays are numpy so that Ray hands them over zero-copy. One row is one sampled response;
the k samples of a prompt share a group id and always travel in the same batch, so
group-relative advantages never need another shard.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class Prompt:
    """One task item: what the rollout worker is asked, and what a good answer looks like."""

    id: int
    text: str | list[dict[str, str]]
    """Plain text, or chat messages [{"role": ..., "content": ...}] for the chat template."""
    reference: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    """The data row's other fields (e.g. a GSM8K row's numeric answer): user reward functions get them."""


@dataclass
class Trajectory:
    input_ids: np.ndarray
    """[B, T] int64: left-padded prompt followed by the right-padded response."""
    attention_mask: np.ndarray
    """[B, T] int64: 1 on real prompt and response tokens."""
    response_mask: np.ndarray
    """[B, T] float32: 1 on generated tokens (EOS included), 0 on prompt and padding."""
    old_logprobs: np.ndarray
    """[B, T] float32: log p(token_t | tokens_<t) under the policy that sampled it."""
    group_ids: np.ndarray
    """[B] int64: the prompt's index in the data set; the k samples of a prompt share it."""
    sample_ids: np.ndarray
    """[B] int64: unique per row within a step (group_id * k + j)."""
    policy_version: int
    prompts: list[str] = field(default_factory=list)
    responses: list[str] = field(default_factory=list)
    references: list[str | None] = field(default_factory=list)
    prompt_texts: list[str | list[dict[str, str]]] = field(default_factory=list)
    """Each row's prompt as asked (Prompt.text, before any chat template): what a learned reward
    model reads as x in r_rm(x, y)."""
    extras: list[dict[str, Any]] = field(default_factory=list)
    """Each row's Prompt.extra: the data fields a user reward function may read."""
    truncated: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))
    """[B] bool: cut at max_new_tokens without EOS (empty when the producer does not say)."""
    max_new_tokens: int = 0
    """The token budget the responses were sampled with (0: unknown)."""

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def response_lengths(self) -> np.ndarray:
        return self.response_mask.sum(axis=1)


@dataclass
class Rewards:
    """What a reward scorer returns for one trajectory batch."""

    total: np.ndarray
    """[B] float32: the weighted sum the learner optimises (normalised if configured)."""
    raw_total: np.ndarray
    """[B] float32: the weighted sum of the raw components; comparable across steps and runs."""
    components: dict[str, np.ndarray]
    """Raw, unweighted per-row values of each component, for logging."""
    loss_mask: np.ndarray | None = None
    """[B] float32, 0 for rows the policy loss drops (reward.truncation: mask); None: every row."""
    info: dict[str, np.ndarray] = field(default_factory=dict)
    """Per-row diagnostics that are not reward components (truncated, length penalty, length
    ratio); logged as batch means."""


def concat(batches: list[Trajectory]) -> Trajectory:
    """Join trajectory batches; shorter ones are right-padded to the longest sequence."""
    if len(batches) == 1:
        return batches[0]
    versions = {b.policy_version for b in batches}
    if len(versions) != 1:
        raise ValueError(f"cannot join trajectories of different policy versions {sorted(versions)}")
    width = max(b.input_ids.shape[1] for b in batches)

    def pad(name: str) -> np.ndarray:
        arrays = [getattr(b, name) for b in batches]
        return np.concatenate([np.pad(a, ((0, 0), (0, width - a.shape[1]))) for a in arrays])

    return Trajectory(
        input_ids=pad("input_ids"),
        attention_mask=pad("attention_mask"),
        response_mask=pad("response_mask"),
        old_logprobs=pad("old_logprobs"),
        group_ids=np.concatenate([b.group_ids for b in batches]),
        sample_ids=np.concatenate([b.sample_ids for b in batches]),
        policy_version=versions.pop(),
        prompts=[p for b in batches for p in b.prompts],
        responses=[r for b in batches for r in b.responses],
        references=[r for b in batches for r in b.references],
        prompt_texts=[p for b in batches for p in b.prompt_texts],
        extras=[e for b in batches for e in b.extras],
        truncated=np.concatenate([b.truncated for b in batches]),
        max_new_tokens=max(b.max_new_tokens for b in batches),
    )


def loss_rows(rewards: list[Rewards], n: int) -> np.ndarray:
    """[n] float32: the rows of a learner's batch that enter the loss (Rewards.loss_mask joined;
    reward.truncation: mask drops cut answers, actors/rewards/length_control.py)."""
    if all(r.loss_mask is None for r in rewards):
        return np.ones(n, dtype=np.float32)
    out = np.concatenate([np.ones(len(r.total), np.float32) if r.loss_mask is None else r.loss_mask for r in rewards])
    if len(out) != n:
        raise ValueError(f"loss masks cover {len(out)} rows, the batch has {n}")
    return out


@dataclass
class LearnerBatch:
    """One learner rank's share of a step, joined and checked in one place: whole prompt groups,
    their rewards, and the reference log-probs (None when the run has no KL term)."""

    trajectory: Trajectory
    scores: np.ndarray
    """[B] float32: the totals the learner optimises (normalised if configured)."""
    raw_scores: np.ndarray
    """[B] float32: unnormalised totals, comparable across steps (for logging)."""
    ref_logprobs: np.ndarray | None
    """[B, T] float32, aligned with trajectory.input_ids; None without a reference policy."""
    loss_mask: np.ndarray
    """[B] float32: 1 for rows that enter the loss, 0 for rows the reward drops (truncation: mask)."""

    @classmethod
    def join(
        cls, trajectories: list[Trajectory], rewards: list[Rewards], ref_logprobs: list[np.ndarray | None]
    ) -> LearnerBatch:
        if not trajectories or not len(trajectories) == len(rewards) == len(ref_logprobs):
            raise ValueError(
                f"a learner batch needs one reward and one reference entry per trajectory: got "
                f"{len(trajectories)} trajectories, {len(rewards)} rewards, {len(ref_logprobs)} reference log-probs"
            )
        no_reference = all(r is None for r in ref_logprobs)
        for traj, reward, ref in zip(trajectories, rewards, ref_logprobs):
            ref_shape = traj.input_ids.shape if no_reference else getattr(ref, "shape", None)
            if ref_shape != traj.input_ids.shape or reward.total.shape != (len(traj),):
                raise ValueError(
                    f"mismatched part: trajectory {traj.input_ids.shape}, ref_logprobs {ref_shape}, "
                    f"rewards {reward.total.shape}"
                )
        batch = concat(trajectories)
        width = batch.input_ids.shape[1]
        ref = None
        if not no_reference:
            ref = np.concatenate([np.pad(r, ((0, 0), (0, width - r.shape[1]))) for r in ref_logprobs])
        return cls(
            trajectory=batch,
            scores=np.concatenate([r.total for r in rewards]).astype(np.float32),
            raw_scores=np.concatenate([r.raw_total for r in rewards]).astype(np.float32),
            ref_logprobs=ref,
            loss_mask=loss_rows(rewards, len(batch)),
        )

    def __len__(self) -> int:
        return len(self.trajectory)
