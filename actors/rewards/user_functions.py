"""User reward functions (`reward.functions`): load, check and call Python callables over a batch.

A function is named by `path`: "my_rewards.py:exact_match" (a file), "my_pkg.rewards:exact_match"
(an importable module) or a built-in name (BUILTINS). It is called once per scored batch with
keyword lists aligned by row:

    fn(prompts=[...], completions=[...], references=[...], **extras) -> [float | None, ...]

`prompts` are the prompts as asked (a string, or chat messages), `completions` the sampled answers,
`references` the reference answers (None where a row has none), and every other field of the data
rows arrives as one more keyword list (None where a row lacks it). A function without **kwargs
gets only the keywords it names. None (or NaN) marks a row the function does not apply to: the
scorer treats it like a built-in component without a reference (left out of the statistics and
of the total).
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from rayrlhf.actors.environments.episode import EPISODE_FIELDS
from rayrlhf.actors.rewards.math_answers import math_exact_match



def _episode_field(name: str) -> Callable[..., Sequence[float | None]]:
    """The built-in function that returns a multi-turn episode's field (None for rows without one)."""

    def episode_field(completions: list[str], **fields: Any) -> Sequence[float | None]:
        return fields.get(name) or [None] * len(completions)

    return episode_field


BUILTINS: dict[str, Callable[..., Sequence[float | None]]] = {
    "math_exact_match": math_exact_match,
    **{name: _episode_field(name) for name in EPISODE_FIELDS},  # actors/environments/episode.py
}
BATCH_ARGS = ("prompts", "completions", "references")


class RewardFunctionError(ValueError):
    """A reward function that cannot be loaded, called, or whose result is unusable."""


def load_function(path: str) -> Callable[..., Any]:
    """The callable that `path` names (a built-in name, FILE.py:NAME or MODULE:NAME)."""
    if path in BUILTINS:
        return BUILTINS[path]
    if ":" not in path:
        raise RewardFunctionError(
            f"{path!r}: expected FILE.py:FUNCTION, MODULE:FUNCTION or a built-in ({', '.join(BUILTINS)})"
        )
    fn = load_attribute(path)
    if not callable(fn):
        name = path.rsplit(":", 1)[1].strip()
        raise RewardFunctionError(f"{path!r}: {name} is a {type(fn).__name__}, not a function")
    return fn


def load_attribute(path: str, kind: str = "function") -> Any:
    """What FILE.py:NAME or MODULE:NAME names (reward functions, environment classes)."""
    if ":" not in path:
        raise RewardFunctionError(f"{path!r}: expected FILE.py:NAME or MODULE:NAME")
    where, name = (part.strip() for part in path.rsplit(":", 1))
    if where.endswith(".py"):
        file = Path(where)
        if not file.is_file():
            raise RewardFunctionError(f"{path!r}: file {where} not found")
        module_name = f"rayrlhf_user_reward_{file.stem}_{abs(hash(str(file.resolve())))}"
        module = sys.modules.get(module_name)
        if module is None:
            spec = importlib.util.spec_from_file_location(module_name, file)
            module = importlib.util.module_from_spec(spec)
            try:
                spec.loader.exec_module(module)
            except Exception as e:
                raise RewardFunctionError(f"{path!r}: importing {where} failed: {type(e).__name__}: {e}") from e
            sys.modules[module_name] = module
    else:
        try:
            module = importlib.import_module(where)
        except ImportError as e:
            raise RewardFunctionError(f"{path!r}: cannot import module {where} ({e})") from e
    found = getattr(module, name, None)
    if found is None:
        raise RewardFunctionError(f"{path!r}: {where} has no {kind} {name!r}")
    return found


def check_signature(fn: Callable[..., Any], path: str, extra_fields: set[str]) -> None:
    """Every parameter without a default must be one the scorer passes: a batch list or a data field."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError) as e:
        raise RewardFunctionError(f"{path!r}: cannot read its signature ({e})") from e
    given = set(BATCH_ARGS) | extra_fields
    for p in params:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) or p.default is not p.empty:
            continue
        if p.kind == p.POSITIONAL_ONLY:
            raise RewardFunctionError(f"{path!r}: parameter {p.name!r} is positional-only; arguments come by keyword")
        if p.name not in given:
            raise RewardFunctionError(
                f"{path!r}: required parameter {p.name!r} is neither one of {BATCH_ARGS} nor a field of the "
                f"data rows (fields: {sorted(extra_fields) or 'none'})"
            )


def check_functions(specs: list[dict[str, Any]], extra_fields: set[str]) -> None:
    """Load every function and check its signature, in the driver before Ray starts; errors name
    the config entry (reward.functions[i])."""
    for i, spec in enumerate(specs):
        try:
            check_signature(load_function(spec["path"]), spec["path"], extra_fields)
        except RewardFunctionError as e:
            raise RewardFunctionError(f"reward.functions[{i}] ({spec['name']}): {e}") from None


def _accepts(fn: Callable[..., Any]) -> set[str] | None:
    """The keyword names fn takes, or None if it takes any (**kwargs)."""
    params = inspect.signature(fn).parameters.values()
    if any(p.kind == p.VAR_KEYWORD for p in params):
        return None
    return {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def batch_arguments(
    prompts: list[Any], completions: list[str], references: list[str | None], extras: list[dict[str, Any]] | None
) -> dict[str, list[Any]]:
    """The keyword lists of one batch: the three batch lists and one list per extra data field."""
    kwargs: dict[str, list[Any]] = {"prompts": prompts, "completions": completions, "references": references}
    rows = extras or [{} for _ in completions]
    for key in sorted({k for row in rows for k in row} - set(BATCH_ARGS)):
        kwargs[key] = [row.get(key) for row in rows]
    return kwargs


def call_function(fn: Callable[..., Any], name: str, kwargs: dict[str, list[Any]]) -> np.ndarray:
    """fn's scores of the batch as float32, NaN where it returned None; errors name the function."""
    accepted = _accepts(fn)
    given = kwargs if accepted is None else {k: v for k, v in kwargs.items() if k in accepted}
    n = len(kwargs["completions"])
    try:
        result = fn(**given)
    except Exception as e:
        raise RewardFunctionError(f"reward function {name!r} raised {type(e).__name__}: {e}") from e
    return as_scores(result, n, f"reward function {name!r}")


def as_scores(result: Any, n: int, who: str) -> np.ndarray:
    """A list of n floats / None (or a 1-D array) as float32 with NaN for None; anything else, a NaN or an
    infinity included, is an error naming `who` (a function returning NaN would otherwise drop out of
    the reward and the logs in silence)."""
    if isinstance(result, (str, bytes, dict)) or not hasattr(result, "__len__"):
        raise RewardFunctionError(f"{who} returned {type(result).__name__}; expected a list of {n} floats or None")
    if len(result) != n:
        raise RewardFunctionError(f"{who} returned {len(result)} scores for {n} rows")
    out = np.empty(n, dtype=np.float32)
    for i, value in enumerate(result):
        if value is None:
            out[i] = np.nan
            continue
        try:
            out[i] = float(value)
        except (TypeError, ValueError):
            raise RewardFunctionError(f"{who}: row {i} is {value!r:.40}, not a number or None") from None
        if not math.isfinite(out[i]):  # NaN is no "does not apply": that is None, said on purpose
            raise RewardFunctionError(f"{who}: row {i} is {value}; return a finite number, or None for a row "
                                      "it does not score")
    return out
