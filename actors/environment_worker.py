"""The environment role: plays the environment's side of a batch of episodes (one instance each).

A plain class; the driver makes it a Ray actor (a pool of env.num_workers), so a slow tool runs
beside generation, never inside it, and a hung or dead one is restarted by the driver's recovery
(jobs/run/recovery.py) like a reward scorer. It holds the episodes of one rollout at a time.
"""

from __future__ import annotations

from typing import Any

from rayrlhf.actors.environments.base import load_environment
from rayrlhf.actors.environments.episode import assistant_message

Key = tuple[int, int]
"""(prompt id, sample index): an episode's identity."""


class EnvironmentWorker:
    def __init__(self, *, path: str, options: dict[str, Any] | None = None) -> None:
        self.cls = load_environment(path, options)
        self.options = options or {}
        self.episodes: dict[Key, Any] = {}

    def reset(self, keys: list[Key], rows: list[dict[str, Any]], seeds: list[int]) -> list[list[dict[str, Any]]]:
        """New episodes (the previous rollout's are dropped); returns each one's first messages."""
        self.episodes = {(key[0], key[1]): self.cls(**self.options) for key in keys}
        return [self.episodes[(key[0], key[1])].reset(row, seed) for key, row, seed in zip(keys, rows, seeds)]

    def step(self, keys: list[Key], replies: list[str]) -> list[tuple[list[dict[str, Any]], float, bool, int, int]]:
        """Each episode's step on its reply: (messages, reward, done, tool calls, invalid calls)."""
        out = []
        for key, reply in zip(keys, replies):
            message, calls, invalid = assistant_message(reply)
            messages, reward, done = self.episodes[(key[0], key[1])].step(message)
            out.append((list(messages), float(reward), bool(done), calls, invalid))
        return out
