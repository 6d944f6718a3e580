"""One multi-turn episode as token ids, token in and token out, and its trajectory row.

The sequence is the prompt's ids, then turn after turn: the ids the policy sampled (kept exactly as
sampled, never decoded and re-encoded) and the ids the chat template adds for the environment's
messages. Only the environment's new messages are rendered (`MessageRenderer.delta`): the template
is applied to a fixed conversation with and without them and the difference is tokenised, so the
model's own text is never re-tokenised. response_mask is 1 on sampled ids and 0 on environment
ids, so the loss and the KL skip the latter; old_logprobs are the sampling log-probs of the
sampled ids (0 elsewhere).

Rewards: each step's reward is summed into the episode's (`Episode.reward`), which reaches the
learner as the `env_reward` reward component, one scalar per row like every reward: group-relative
estimators (GRPO, RLOO) need one number per sample, and a per-turn credit split would need a value
model across environment tokens. `success`: the episode ended (done) with a positive last reward.
`cut`: the episode hit a token cap: a reply stopped at rollout.max_new_tokens or env.max_tokens without
its EOS, or no room was left for the next reply. An episode that ran out of turns is not cut (a game
lost on turns is a loss, not a token-cap problem).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from rayrlhf.actors.generation.tool_calls import parse_tool_calls
from rayrlhf.actors.rl.trajectory import Prompt, Trajectory

_BASE = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]
"""A fixed conversation ending in an assistant message: the new messages are rendered after it."""

EPISODE_FIELDS = ("env_reward", "env_success", "env_turns", "env_tool_calls", "env_invalid_calls", "env_cut")
"""Per-row fields an episode adds to its row's extras: the built-in reward functions of the same
names return them, so they are logged as reward/<name> and eval/<name> (env_reward weighted)."""


class MessageRenderer:
    """The ids the chat template adds for messages that follow an assistant reply, and the generation prompt."""

    def __init__(self, tokenizer: Any, eos_ids: list[int]) -> None:
        self.tokenizer = tokenizer
        self.base = tokenizer.apply_chat_template(_BASE, tokenize=False)
        base_ids = self._ids(self.base)
        ends = [i for i, t in enumerate(base_ids) if t in eos_ids]
        if not ends:
            raise ValueError("the chat template ends no assistant message with an EOS token: multi-turn needs one")
        self.tail = base_ids[ends[-1] + 1:]
        """What the template writes after a reply's EOS (ChatML: a newline): a sampled reply stops at its EOS."""

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False).input_ids

    def delta(self, messages: list[dict[str, Any]]) -> list[int]:
        full = self.tokenizer.apply_chat_template(_BASE + messages, add_generation_prompt=True, tokenize=False)
        if not full.startswith(self.base):
            raise ValueError("the chat template renders a conversation's start differently once messages follow it")
        return self.tail + self._ids(full[len(self.base):])


@dataclass
class Turn:
    """What a rollout worker returns for one episode's turn."""

    observation: list[int]
    """The ids added before this turn's reply (the prompt on the first turn, else the environment's messages)."""
    tokens: list[int]
    logprobs: list[float]
    text: str
    """The reply decoded (special tokens skipped), for the environment."""
    ended: bool
    """The reply ends with an EOS token (else it was cut at its token budget)."""
    prompt_text: str = ""
    """The first turn's prompt as rendered, special tokens kept (Trajectory.prompts)."""


def assistant_message(text: str) -> tuple[dict[str, Any], int, int]:
    """The message an environment's step receives, with its tool-call and invalid-call counts."""
    parsed = parse_tool_calls(text)
    message = {"role": "assistant", "content": parsed.content, "tool_calls": [c.openai() for c in parsed.calls],
               "invalid_tool_calls": parsed.invalid}  # fmt: skip
    return message, len(parsed.calls), len(parsed.invalid)


@dataclass
class Episode:
    prompt: Prompt
    sample: int
    seed: int
    prompt_ids: list[int] = field(default_factory=list)
    prompt_text: str = ""
    ids: list[int] = field(default_factory=list)
    """After the prompt: sampled and environment ids, in order."""
    sampled: list[float] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    rewards: list[float] = field(default_factory=list)
    replies: list[str] = field(default_factory=list)
    tool_calls: int = 0
    invalid_calls: int = 0
    cut: bool = False
    """It hit a token cap: a reply stopped without its EOS, or no room for the next one."""
    done: bool = False
    """The environment ended it."""
    over: bool = False
    """No more turns: done, or out of turns or tokens, or a reply cut without EOS."""

    def row(self) -> dict[str, Any]:
        """The data row an environment's reset reads."""
        p = self.prompt
        return {**p.extra, "id": p.id, "prompt": p.text, "reference": p.reference}

    def add_turn(self, turn: Turn) -> None:
        """A reply and the ids before it; a turn without tokens (no room left) ends the episode unchanged."""
        if not turn.tokens:
            self.over = self.cut = True
            return
        if not self.replies:
            self.prompt_ids, self.prompt_text = list(turn.observation), turn.prompt_text
        else:
            self.add_ids(turn.observation, sampled=False)
        self.add_ids(turn.tokens, sampled=True, logprobs=turn.logprobs)
        self.replies.append(turn.text)
        self.cut = not turn.ended
        self.over = self.over or self.cut

    def add_ids(self, ids: list[int], sampled: bool, logprobs: list[float] | None = None) -> None:
        self.ids += ids
        self.sampled += [float(sampled)] * len(ids)
        self.logprobs += logprobs if logprobs is not None else [0.0] * len(ids)

    @property
    def reward(self) -> float:
        return float(sum(self.rewards))

    @property
    def success(self) -> bool:
        return self.done and bool(self.rewards) and self.rewards[-1] > 0

    def fields(self) -> dict[str, float]:
        values = (self.reward, float(self.success), float(len(self.replies)), float(self.tool_calls),
                  float(self.invalid_calls), float(self.cut))  # fmt: skip
        return dict(zip(EPISODE_FIELDS, values))


def to_trajectory(episodes: list[Episode], k: int, version: int, pad_id: int, budget: int) -> Trajectory:
    """The episodes as one batch: left-padded prompts, then each episode's turns, right-padded.
    `responses` holds each episode's last reply (what reward functions read as the answer)."""
    width_p = max(len(e.prompt_ids) for e in episodes)
    width_r = max(len(e.ids) for e in episodes)
    n = len(episodes)
    input_ids = np.full((n, width_p + width_r), pad_id, dtype=np.int64)
    attention = np.zeros((n, width_p + width_r), dtype=np.int64)
    response_mask = np.zeros((n, width_p + width_r), dtype=np.float32)
    old_logprobs = np.zeros((n, width_p + width_r), dtype=np.float32)
    for i, e in enumerate(episodes):
        start, end = width_p - len(e.prompt_ids), width_p + len(e.ids)
        input_ids[i, start:end] = e.prompt_ids + e.ids
        attention[i, start:end] = 1
        response_mask[i, width_p:end] = e.sampled
        old_logprobs[i, width_p:end] = e.logprobs
    group_ids = np.array([e.prompt.id for e in episodes], dtype=np.int64)
    return Trajectory(
        input_ids=input_ids, attention_mask=attention, response_mask=response_mask,
        old_logprobs=old_logprobs * response_mask, group_ids=group_ids,
        sample_ids=group_ids * k + np.array([e.sample for e in episodes], dtype=np.int64),
        policy_version=version,
        prompts=[e.prompt_text for e in episodes],
        responses=[e.replies[-1] if e.replies else "" for e in episodes],
        references=[e.prompt.reference for e in episodes],
        prompt_texts=[e.prompt.text for e in episodes],
        extras=[{**e.prompt.extra, **e.fields()} for e in episodes],
        truncated=np.array([not e.done for e in episodes], dtype=bool),
        max_new_tokens=budget,
    )
