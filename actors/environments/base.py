"""The environment interface, how a config names an environment, and its check before Ray starts.

An environment is a plain class, constructed with `env.options` as keyword arguments (none by
default); one instance plays one episode:

    reset(row: dict, seed: int) -> list[message]
        row: the data row ({"id", "prompt", "reference", **its other fields}); seed: the episode's
        (from the run's seed and the episode's identity, jobs/run/episodes.py). Returns the first
        messages ([{"role": ..., "content": ...}]), which the chat template renders as the prompt.
    step(assistant: message) -> (messages, reward, done)
        assistant: {"role": "assistant", "content": the reply's text outside tool-call blocks,
        "tool_calls": OpenAI-shaped calls parsed from it, "invalid_tool_calls": why each malformed
        block is not a call} (actors/generation/tool_calls.py). Returns the messages to append (tool
        results, feedback), this turn's reward and whether the episode is over.

`env.path` names it like a reward function: FILE.py:CLASS, MODULE:CLASS or a built-in (BUILTINS).
"""

from __future__ import annotations

import importlib
from typing import Any, Protocol

from rayrlhf.actors.rewards.user_functions import RewardFunctionError, load_attribute

Message = dict[str, Any]

BUILTINS = {
    "calculator": "rayrlhf.actors.environments.calculator:Calculator",
    "guess_number": "rayrlhf.actors.environments.guess_number:GuessNumber",
}


class Environment(Protocol):
    def reset(self, row: dict[str, Any], seed: int) -> list[Message]: ...

    def step(self, assistant: Message) -> tuple[list[Message], float, bool]: ...


class EnvironmentLoadError(ValueError):
    """An environment class that cannot be loaded or lacks the interface (names env.path)."""


def load_environment(path: str, options: dict[str, Any] | None = None) -> type:
    """The class `path` names, checked: a class with callable reset and step, constructible with `options`."""
    where = BUILTINS.get(path, path)
    try:
        if path in BUILTINS:
            module, name = where.split(":")
            cls = getattr(importlib.import_module(module), name)
        else:
            cls = load_attribute(where, kind="class")
    except RewardFunctionError as e:
        raise EnvironmentLoadError(f"env.path: {e} (or a built-in: {', '.join(BUILTINS)})") from None
    if not isinstance(cls, type):
        raise EnvironmentLoadError(f"env.path: {path!r} is a {type(cls).__name__}, not a class")
    missing = [m for m in ("reset", "step") if not callable(getattr(cls, m, None))]
    if missing:
        raise EnvironmentLoadError(f"env.path: class {cls.__name__} of {path!r} has no method {' or '.join(missing)}")
    try:  # one instance per episode, so a constructor is cheap: build one to check the options' names and values
        cls(**(options or {}))
    except Exception as e:
        raise EnvironmentLoadError(f"env.options: {cls.__name__}(**{options or {}}) failed: {e}") from None
    return cls
