"""The batch a pipelined run holds ahead of its learner, in a run checkpoint: arrays and JSON, no pickle.

Two files in the checkpoint's folder: ahead.npz holds every array (written and read with
allow_pickle=False), ahead.json the rest (texts, ids, versions, timings) and which array is which.
A batch owed instead (its collect failed, jobs/run/pipeline.py) is the weights that are to sample it:
ahead_weights.safetensors, with each tensor's dtype in its metadata.
A checkpoint is data that a later rayrlhf reads: nothing in it names a Python class or module, so
moving code cannot break it and reading it runs no code.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from rayrlhf.actors.rl.trajectory import Rewards, Trajectory
from rayrlhf.actors.runtime.weight_sync import Weights

ARRAYS = "ahead.npz"
META = "ahead.json"
WEIGHTS = "ahead_weights.safetensors"


@dataclass
class Ahead:
    """One entry per shard, in the order the driver collected them."""

    trajectories: list[Trajectory]
    rewards: list[Rewards]
    ref_logprobs: list[np.ndarray | None]
    times: dict[str, float]


def save(folder: Path, ahead: Ahead) -> None:
    arrays: dict[str, np.ndarray] = {}
    shards = []
    for i, (traj, rewards, ref) in enumerate(zip(ahead.trajectories, ahead.rewards, ahead.ref_logprobs, strict=True)):
        if ref is not None:
            arrays[f"{i}.ref_logprobs"] = ref
        shards.append({"trajectory": _split(traj, f"{i}.trajectory", arrays),
                       "rewards": _split(rewards, f"{i}.rewards", arrays), "ref_logprobs": ref is not None})  # fmt: skip
    meta = json.dumps({"times": ahead.times, "shards": shards}, default=_plain)  # fails before anything is written
    with open(folder / ARRAYS, "wb") as f:
        np.savez(f, allow_pickle=False, **arrays)
        f.flush()
        os.fsync(f.fileno())
    with open(folder / META, "w") as f:
        f.write(meta)
        f.flush()
        os.fsync(f.fileno())


def load(folder: Path) -> Ahead | None:
    """The checkpoint's batch ahead; None when it has none."""
    if not (folder / META).is_file():
        return None
    meta = json.loads((folder / META).read_text())
    with np.load(folder / ARRAYS, allow_pickle=False) as arrays:
        shards = [(_join(Trajectory, s["trajectory"], f"{i}.trajectory", arrays),
                   _join(Rewards, s["rewards"], f"{i}.rewards", arrays),
                   arrays[f"{i}.ref_logprobs"] if s["ref_logprobs"] else None)
                  for i, s in enumerate(meta["shards"])]  # fmt: skip
    trajectories, rewards, ref_logprobs = (list(column) for column in zip(*shards)) if shards else ([], [], [])
    return Ahead(trajectories, rewards, ref_logprobs, meta["times"])


def save_weights(folder: Path, weights: Weights) -> None:
    save_file(weights.arrays, str(folder / WEIGHTS), metadata={"dtypes": json.dumps(weights.dtypes)})


def load_weights(folder: Path) -> Weights | None:
    """The weights of the checkpoint's owed batch; None when it owes none."""
    path = folder / WEIGHTS
    if not path.is_file():
        return None
    with safe_open(str(path), "np") as f:
        dtypes = json.loads(f.metadata()["dtypes"])
    return Weights(load_file(str(path)), dtypes)


def _split(obj: Any, prefix: str, arrays: dict[str, np.ndarray]) -> dict[str, Any]:
    """A dataclass's fields: its arrays (and dicts of arrays) into `arrays` under prefix.field[.key],
    the rest as JSON values."""
    out: dict[str, Any] = {"values": {}, "arrays": [], "array_dicts": {}}
    for f in fields(obj):
        value = getattr(obj, f.name)
        if isinstance(value, np.ndarray):
            out["arrays"].append(f.name)
            arrays[f"{prefix}.{f.name}"] = value
        elif isinstance(value, dict) and value and all(isinstance(v, np.ndarray) for v in value.values()):
            out["array_dicts"][f.name] = list(value)
            arrays.update({f"{prefix}.{f.name}.{key}": v for key, v in value.items()})
        else:
            out["values"][f.name] = value
    return out


def _join(cls: type, meta: dict[str, Any], prefix: str, arrays: Any) -> Any:
    kwargs = dict(meta["values"])
    kwargs.update({name: arrays[f"{prefix}.{name}"] for name in meta["arrays"]})
    for name, keys in meta["array_dicts"].items():
        kwargs[name] = {key: arrays[f"{prefix}.{name}.{key}"] for key in keys}
    return cls(**kwargs)


def _plain(value: Any) -> Any:
    """JSON for the numpy values a data row's extra fields may hold (Parquet rows): their Python equivalents."""
    if isinstance(value, (np.generic, np.ndarray)):
        return value.tolist()
    raise TypeError(f"a value of type {type(value).__name__} in the batch ahead cannot be saved as JSON: {value!r:.80}")
