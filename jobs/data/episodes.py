"""Episodes recorded through the Serve gateway: the off-policy data `rayrlhf train` takes (`data.episodes`).

One JSON object per line:

    {"prompt_ids": [...], "completion_ids": [...], "logprobs": [...], "loss_mask": [...],
     "policy_version": 0, "reward": 1.0, "requests": ["cmpl-..."], "model": "B"}

`completion_ids` is everything after the first prompt: the policy's sampled tokens (loss_mask 1,
with the log-prob the serving policy gave each) and, in a multi-turn episode, the tokens the agent
program added between turns (tool results, the template's turn markers: loss_mask 0, log-prob 0).
The ids are exactly those the server sampled and was sent, never re-tokenised text: each turn's
prompt must extend the previous turn's prompt and completion (`from_turns` checks it). The recorded
log-probs are the behaviour policy's; the learner corrects for the gap to its own weights with the
pipeline's truncated importance weights (actors/rl/offpolicy.py). `reward` is the caller's.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from rayrlhf.actors.rl.trajectory import Rewards, Trajectory


@dataclass(frozen=True)
class Episode:
    prompt_ids: list[int]
    completion_ids: list[int]
    logprobs: list[float]
    loss_mask: list[int]
    policy_version: int
    reward: float
    requests: list[str] = field(default_factory=list)
    """The gateway requests it was made of (for the record; training ignores them)."""
    model: str | None = None
    """The served model that answered them (on a versioned endpoint, the version's name); for the record."""

    def check(self) -> None:
        """ValueError naming what is wrong."""
        for name in ("prompt_ids", "completion_ids"):
            ids = getattr(self, name)
            if not ids or not all(type(i) is int and i >= 0 for i in ids):
                raise ValueError(f"{name} must be a non-empty list of token ids (integers >= 0)")
        n = len(self.completion_ids)
        if len(self.logprobs) != n or len(self.loss_mask) != n:
            raise ValueError(f"logprobs ({len(self.logprobs)}) and loss_mask ({len(self.loss_mask)}) must have one "
                             f"entry per completion id ({n})")  # fmt: skip
        if not all(isinstance(x, (int, float)) and not isinstance(x, bool) and x <= 0 and math.isfinite(x)
                   for x in self.logprobs):  # fmt: skip
            raise ValueError("logprobs must be finite numbers <= 0")
        if any(m not in (0, 1) or isinstance(m, bool) for m in self.loss_mask) or not any(self.loss_mask):
            raise ValueError("loss_mask must be 0/1 with at least one 1 (a sampled token)")
        if type(self.policy_version) is not int or self.policy_version < 0:
            raise ValueError("policy_version must be an integer >= 0")
        if isinstance(self.reward, bool) or not isinstance(self.reward, (int, float)) or not math.isfinite(self.reward):
            raise ValueError("reward must be a finite number")
        if self.model is not None and not isinstance(self.model, str):
            raise ValueError("model must be a string (the served model's name) or null")


def from_turns(turns: list[dict[str, Any]], reward: float, policy_version: int, requests: list[str],
               model: str | None = None) -> Episode:
    """One episode from the gateway's records of its turns, in order (each {prompt_ids, completion_ids,
    logprobs}). ValueError if a turn's prompt does not extend everything before it token for token."""
    prompt = list(turns[0]["prompt_ids"])
    ids: list[int] = []
    logprobs: list[float] = []
    mask: list[int] = []
    for k, turn in enumerate(turns):
        if k:
            so_far = prompt + ids
            if turn["prompt_ids"][:len(so_far)] != so_far:
                raise ValueError(
                    f"the prompt of {requests[k]} does not start with the tokens of {requests[k - 1]} (its prompt "
                    "and completion): send the next turn as token ids (the completions API) so nothing is re-tokenised"
                )
            added = turn["prompt_ids"][len(so_far):]
            ids += added
            logprobs += [0.0] * len(added)
            mask += [0] * len(added)
        ids += turn["completion_ids"]
        logprobs += turn["logprobs"]
        mask += [1] * len(turn["completion_ids"])
    episode = Episode(prompt, ids, logprobs, mask, policy_version, float(reward), list(requests), model)
    episode.check()
    return episode


def append_episode(path: str | Path, episode: Episode) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(asdict(episode)) + "\n")


def read_episodes(path: str | Path) -> list[Episode]:
    """Every episode of a file; ValueError naming the file and line of the first bad one."""
    episodes = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                if not isinstance(row, dict):
                    raise ValueError("not a JSON object")
                episode = Episode(**row)
                episode.check()
            except (ValueError, TypeError) as e:
                raise ValueError(f"{path}, line {number}: {e}") from None
            episodes.append(episode)
    if not episodes:
        raise ValueError(f"{path}: no episodes")
    return episodes


def step_episodes(episodes: list[Episode], step_index: int, per_step: int) -> list[Episode]:
    """The episodes of one step: the file read in order, again from its start when it runs out."""
    start = step_index * per_step
    return [episodes[(start + j) % len(episodes)] for j in range(per_step)]


def trajectory(episodes: list[Episode], group_size: int, version: int, first_group: int) -> tuple[Trajectory, Rewards]:
    """Episodes as a trajectory batch (left-padded prompts, right-padded completions, the loss mask as
    response mask, recorded log-probs as old_logprobs) and their rewards; every `group_size`
    consecutive episodes form one group (GRPO's). `version`: the learner's, so its staleness check
    passes (the importance weights, not the version, account for the recorded policy)."""
    width_p = max(len(e.prompt_ids) for e in episodes)
    width_c = max(len(e.completion_ids) for e in episodes)
    rows, width = len(episodes), width_p + width_c
    input_ids = np.zeros((rows, width), np.int64)
    attention = np.zeros((rows, width), np.int64)
    response = np.zeros((rows, width), np.float32)
    old = np.zeros((rows, width), np.float32)
    for r, e in enumerate(episodes):
        p, c = len(e.prompt_ids), len(e.completion_ids)
        input_ids[r, width_p - p:width_p], input_ids[r, width_p:width_p + c] = e.prompt_ids, e.completion_ids
        attention[r, width_p - p:width_p + c] = 1
        response[r, width_p:width_p + c] = e.loss_mask
        old[r, width_p:width_p + c] = np.asarray(e.logprobs) * np.asarray(e.loss_mask)
    groups = first_group + np.arange(rows, dtype=np.int64) // group_size
    traj = Trajectory(
        input_ids=input_ids, attention_mask=attention, response_mask=response, old_logprobs=old,
        group_ids=groups, sample_ids=groups * group_size + np.arange(rows, dtype=np.int64) % group_size,
        policy_version=version, prompts=[""] * rows, responses=[""] * rows, references=[None] * rows,
        prompt_texts=[""] * rows, extras=[{} for _ in range(rows)], truncated=np.zeros(rows, bool),
        max_new_tokens=width_c,
    )
    reward = np.array([e.reward for e in episodes], np.float32)
    return traj, Rewards(total=reward, raw_total=reward, components={"episode": reward.copy()})
