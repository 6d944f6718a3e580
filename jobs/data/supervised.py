"""Data for the supervised jobs: preference pairs or rated samples (train-rm), prompt/response (sft).

File rows (JSONL or Parquet, read by jobs/data.py, errors name the file and line or row):
- preference pair: `prompt`, `chosen`, `rejected` (optional `kind`);
- rated sample: `prompt`, `response`, and `score` (a number) and/or `label` (0 or 1);
- SFT example: `prompt` (a string or chat messages) and `response` (or `reference`).
One RM file holds one row type. Without an eval file, 10% of the train file (at least one row),
drawn by seed, is held out.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any, TypeVar

from rayrlhf.actors.rewards.reward_model import prompt_as_text
from rayrlhf.actors.rl.trajectory import Prompt
from rayrlhf.jobs.data.preferences import PreferencePair, builtin_preferences
from rayrlhf.jobs.data.prompts import DataError, load_task, read_records, to_prompt

T = TypeVar("T")


@dataclass(frozen=True)
class RatedSample:
    prompt: str
    response: str
    score: float | None = None
    label: int | None = None


RMRow = PreferencePair | RatedSample


def _text(row: dict[str, Any], key: str, where: str) -> str:
    value = row.get(key)
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{where}: '{key}' must be a non-empty string, got {value!r:.60}")
    return value


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _to_rm_row(row: Any, index: int, where: str) -> RMRow:
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected an object, got {type(row).__name__}")
    prompt = prompt_as_text(to_prompt(row, index, where).text)
    if "chosen" in row or "rejected" in row:
        kind = row.get("kind")
        return PreferencePair(prompt, _text(row, "chosen", where), _text(row, "rejected", where),
                              None if _missing(kind) else str(kind))
    response = _text(row, "response", where)
    score, label = row.get("score"), row.get("label")
    score, label = (None if _missing(score) else score), (None if _missing(label) else label)
    if score is None and label is None:
        raise DataError(f"{where}: a row needs 'chosen' and 'rejected', or 'response' with 'score' or 'label'")
    if score is not None and (isinstance(score, bool) or not isinstance(score, (int, float))):
        raise DataError(f"{where}: 'score' must be a number, got {score!r:.40}")
    if label is not None and label not in (0, 1):
        raise DataError(f"{where}: 'label' must be 0 or 1, got {label!r:.40}")
    return RatedSample(prompt, response, None if score is None else float(score), None if label is None else int(label))


def _load_rm_file(path: str, limit: int | None = None) -> list[RMRow]:
    rows = read_records(path, _to_rm_row, limit)
    if not rows:
        raise DataError(f"{path}: no rows in the file")
    if len({type(r) for r in rows}) > 1:
        raise DataError(f"{path}: mixes preference pairs and rated samples; use one kind per file")
    return rows


def _split(rows: list[T], seed: int, path: str) -> tuple[list[T], list[T]]:
    """Seeded shuffle, then the last 10% (at least one row) held out."""
    if len(rows) < 2:
        raise DataError(f"{path}: needs at least 2 rows to hold one out (or give data.eval)")
    rows = rows[:]
    random.Random(seed).shuffle(rows)
    held = max(1, len(rows) // 10)
    return rows[:-held], rows[-held:]


def load_rm_data(train: str, eval: str | None, num_train: int, num_eval: int, seed: int) -> tuple[list[RMRow], list[RMRow]]:
    """Train and held-out rows for the RM job's `data` section."""
    if train == "builtin":  # pairs derived from the task; an eval file replaces their held-out part
        pairs, held_out = builtin_preferences(num_train, 1 if eval else num_eval, seed)
        rows: list[RMRow] = [*pairs]
        return rows, _load_rm_file(eval, num_eval) if eval else [*held_out]
    if eval:
        train_rows, eval_rows = _load_rm_file(train, num_train), _load_rm_file(eval, num_eval)
    else:
        train_rows, eval_rows = _split(_load_rm_file(train), seed, train)
        train_rows, eval_rows = train_rows[:num_train], eval_rows[:num_eval]
    if type(train_rows[0]) is not type(eval_rows[0]):
        raise DataError(f"{train} and {eval}: one holds preference pairs, the other rated samples")
    return train_rows, eval_rows


def is_pairs(rows: list[RMRow]) -> bool:
    return isinstance(rows[0], PreferencePair)


def _to_sft(row: Any, index: int, where: str) -> Prompt:
    """A Prompt whose `reference` is the target response."""
    if isinstance(row, dict) and "response" in row:
        row = {**row, "reference": row["response"]}
    prompt = to_prompt(row, index, where)
    if not prompt.reference or not prompt.reference.strip():
        raise DataError(f"{where}: an SFT row needs a non-empty 'response' (or 'reference')")
    return prompt


def load_sft_data(train: str, eval: str | None, num_train: int | None, num_eval: int, seed: int) -> tuple[list[Prompt], list[Prompt]]:
    """Prompts with their target responses (in `reference`); built-in: the task's references."""
    def load(path: str, limit: int | None = None) -> list[Prompt]:
        rows = read_records(path, _to_sft, limit)
        if not rows:
            raise DataError(f"{path}: no rows in the file")
        return rows

    if train == "builtin":
        if not eval:
            return load_task(train, eval, num_train, num_eval, seed)
        return load_task(train, None, num_train, 1, seed)[0], load(eval, num_eval)
    if eval:
        return load(train, num_train), load(eval, num_eval)
    train_rows, eval_rows = _split(load(train), seed, train)
    return train_rows[:num_train], eval_rows[:num_eval]
