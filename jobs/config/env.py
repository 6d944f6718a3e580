"""The `env` section of a run config: a multi-turn environment (docs/environments.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field, model_validator

from rayrlhf.jobs.config.base import StrictModel


class EnvConfig(StrictModel):
    """Set it to make rollouts multi-turn: generation alternates with the environment's steps."""

    path: str = Field(min_length=1)
    """FILE.py:CLASS (relative to the config file or the working directory), MODULE:CLASS or a built-in
    (calculator, guess_number)."""
    options: dict[str, Any] = {}
    """Keyword arguments of the environment's constructor (one instance per episode), checked against
    it before Ray starts (one instance is built): e.g. a tool server's address, a game's difficulty."""
    num_workers: int = Field(1, ge=1)
    """Environment actors; episode i plays on actor i % num_workers."""
    num_cpus: float = Field(0.25, gt=0)
    max_turns: int = Field(4, ge=1)
    """Replies per episode at most; an episode still going after the last is cut (truncated)."""
    max_tokens: int = Field(256, ge=1)
    """Ids after the prompt (sampled and environment's) per episode; each reply also stays within
    rollout.max_new_tokens. An episode that would pass it ends there (truncated)."""
    timeout_s: float = Field(60.0, gt=0)
    """Wall-clock limit on one batch of environment steps (or resets); an environment actor past it
    is restarted and the rollout redone, like a reward scorer past fault_tolerance.score_timeout_s."""

    @model_validator(mode="before")
    @classmethod
    def _absolute(cls, data: Any) -> Any:
        """A file path made absolute, so that actors (any working directory) find it."""
        if isinstance(data, dict) and isinstance(data.get("path"), str):
            where, colon, name = data["path"].rpartition(":")
            if colon and where.endswith(".py"):
                data = {**data, "path": f"{Path(where).expanduser().resolve()}:{name}"}
        return data
