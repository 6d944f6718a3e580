"""Prompt sets for a run: a built-in task (text or math), or the user's JSONL / Parquet files.

A user row has a `prompt` (a string, or chat messages [{"role", "content"}, ...]) and an optional
`reference` string, or GSM8K's `question` and `answer`; its other fields travel with it
(Prompt.extra) to the user reward functions. Bad input fails before any Ray resource is claimed,
with the file and the line (JSONL, counted from 1) or row (Parquet, counted from 0) named.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from rayrlhf.actors.rl.trajectory import Prompt
from rayrlhf.jobs.config.run import BUILTIN_NUM_TRAIN, DataConfig
from rayrlhf.jobs.data.math_task import math_task
from rayrlhf.jobs.data.guess_task import guess_number_task
from rayrlhf.jobs.data.task import builtin_task

JSONL_SUFFIXES = (".jsonl", ".json")
PARQUET_SUFFIXES = (".parquet",)
T = TypeVar("T")


class DataError(ValueError):
    """A prompt file that cannot be used; the message names the file and the line or row."""


def _check_messages(value: list[Any], where: str) -> list[dict[str, str]]:
    if not value:
        raise DataError(f"{where}: 'prompt' is an empty list of messages")
    for i, msg in enumerate(value):
        if not (isinstance(msg, dict) and isinstance(msg.get("role"), str) and isinstance(msg.get("content"), str)):
            raise DataError(
                f"{where}: prompt message {i} must be an object with string 'role' and 'content', got {msg!r:.80}"
            )
    return [{"role": m["role"], "content": m["content"]} for m in value]


def to_prompt(row: Any, index: int, where: str) -> Prompt:
    """One validated Prompt from a parsed row."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected an object with a 'prompt' field, got {type(row).__name__}")
    if "prompt" not in row and "question" in row:  # GSM8K's own fields: question, answer ("... #### N")
        row = {"prompt": row["question"], "reference": row.get("answer"),
               **{k: v for k, v in row.items() if k not in ("question", "answer")}}  # fmt: skip
    if "prompt" not in row or row["prompt"] is None:
        raise DataError(f"{where}: missing 'prompt' field")
    prompt = row["prompt"]
    if isinstance(prompt, str):
        if not prompt.strip():
            raise DataError(f"{where}: 'prompt' is empty")
    elif isinstance(prompt, list):
        prompt = _check_messages(prompt, where)
    else:
        kind = type(prompt).__name__
        raise DataError(f"{where}: 'prompt' must be a string or a list of chat messages, got {kind}")
    reference = row.get("reference")
    if _is_nan(reference):
        reference = None
    if reference is not None and not isinstance(reference, str):
        raise DataError(f"{where}: 'reference' must be a string, got {type(reference).__name__}")
    extra = {k: None if _is_nan(v) else v for k, v in row.items() if k not in ("prompt", "reference")}
    return Prompt(id=index, text=prompt, reference=reference, extra=extra)


def _is_nan(value: Any) -> bool:
    return isinstance(value, float) and math.isnan(value)  # pandas' marker for a missing value


def _read_jsonl(path: Path, limit: int | None, convert: Callable[[Any, int, str], T]) -> list[T]:
    prompts: list[T] = []
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if limit is not None and len(prompts) >= limit:
                break
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}: line {lineno}: not UTF-8 (byte {e.start}: {raw[e.start:e.start + 1]!r}); "
                                "save the file as UTF-8") from None
            if not line.strip():
                continue
            where = f"{path}: line {lineno}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                hint = "; expected one JSON object per line" if line.lstrip().startswith("[") else ""
                raise DataError(f"{where}: not valid JSON ({e.msg}{hint})") from None
            prompts.append(convert(row, len(prompts), where))
    return prompts


def _plain(value: Any) -> Any:
    """Parquet list columns arrive as numpy arrays; turn them (and nested ones) into lists."""
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        value = value.tolist()
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _read_parquet(path: Path, limit: int | None, convert: Callable[[Any, int, str], T]) -> list[T]:
    import pandas as pd

    try:
        frame = pd.read_parquet(path)
    except Exception as e:  # pyarrow raises several types for a damaged file
        raise DataError(f"{path}: not a readable Parquet file ({e})") from None
    if "prompt" not in frame.columns:
        raise DataError(f"{path}: no 'prompt' column (columns: {', '.join(map(str, frame.columns))})")
    if limit is not None:
        frame = frame.head(limit)
    rows = frame.to_dict(orient="records")
    return [convert(_plain(row), i, f"{path}: row {i}") for i, row in enumerate(rows)]


def load_prompts(path: str, limit: int | None = None) -> list[Prompt]:
    """Prompts from a JSONL or Parquet file, in file order, ids 0..n-1; at most `limit` of them."""
    prompts = read_records(path, to_prompt, limit)
    if not prompts:
        raise DataError(f"{path}: no prompts in the file")
    return prompts


def read_records(path: str, convert: Callable[[Any, int, str], T], limit: int | None = None) -> list[T]:
    """Rows of a JSONL or Parquet file (which must have a `prompt` column), each passed through
    `convert(row, index, where)`; `where` names the file and line or row for error messages."""
    p = Path(path)
    if limit is not None and limit < 1:
        raise DataError(f"{path}: limit must be >= 1, got {limit}")
    if not p.is_file():
        raise DataError(f"{path}: file not found")
    suffix = p.suffix.lower()
    if suffix in JSONL_SUFFIXES:
        return _read_jsonl(p, limit, convert)
    if suffix in PARQUET_SUFFIXES:
        return _read_parquet(p, limit, convert)
    known = ", ".join(JSONL_SUFFIXES + PARQUET_SUFFIXES)
    raise DataError(f"{path}: unknown file type '{p.suffix}' (expected one of {known})")


def _renumber(prompts: list[Prompt], start: int) -> list[Prompt]:
    return [Prompt(id=start + i, text=p.text, reference=p.reference, extra=p.extra) for i, p in enumerate(prompts)]


BUILTIN_TASKS = {"builtin": builtin_task, "builtin_math": math_task, "builtin_guess_number": guess_number_task}
"""data.train names that code generates instead of a file."""


def load_task(
    train: str, eval: str | None, num_train: int | None, num_eval: int, seed: int
) -> tuple[list[Prompt], list[Prompt]]:
    """Train and held-out prompts for the `data` config section; ids: train 0.., held-out after.

    A user train file without an eval file is shuffled by seed and its last 10% (at least one
    prompt) held out. num_train / num_eval cap the counts; num_train None takes every row of a file
    and BUILTIN_NUM_TRAIN items of a built-in task.
    """
    if train in BUILTIN_TASKS:
        make = BUILTIN_TASKS[train]
        train_set, eval_set = make(num_train or BUILTIN_NUM_TRAIN, 0 if eval else num_eval, seed)
        if eval:
            eval_set = load_prompts(eval, limit=num_eval)
    elif eval:
        train_set, eval_set = load_prompts(train, limit=num_train), load_prompts(eval, limit=num_eval)
    else:
        rows = load_prompts(train)
        if len(rows) < 2:
            raise DataError(f"{train}: needs at least 2 prompts to hold one out (or give data.eval)")
        random.Random(seed).shuffle(rows)
        held = max(1, len(rows) // 10)
        train_set, eval_set = rows[:-held][:num_train], rows[-held:][:num_eval]
    return _renumber(train_set, 0), _renumber(eval_set, len(train_set))


def check_prompt_lengths(tokenizer: Any, prompts: list[Prompt], data: DataConfig, max_prompt_tokens: int) -> int:
    """Render every prompt as the rollout will (chat template, system prompt) and count those over
    max_prompt_tokens; under data.overlong_prompts=error the first one is an error naming it."""
    from rayrlhf.actors.generation.tokens import prompt_token_ids

    over = []
    for p in prompts:
        n = len(prompt_token_ids(tokenizer, p, use_chat_template=data.use_chat_template,
                                 system_prompt=data.system_prompt, max_prompt_tokens=1 << 30))  # fmt: skip
        if n > max_prompt_tokens:
            over.append((p, n))
    if over and data.overlong_prompts == "error":
        p, n = over[0]
        raise DataError(
            f"{len(over)} of {len(prompts)} prompts are longer than policy.max_prompt_tokens={max_prompt_tokens} "
            f"once rendered; the first: prompt {p.id} ({n} tokens): {str(p.text)[:60]!r}...; raise "
            "policy.max_prompt_tokens, shorten them, or set data.overlong_prompts=truncate (cut from the left)"
        )
    return len(over)
