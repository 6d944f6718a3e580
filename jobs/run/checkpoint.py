"""The run checkpoint on disk: layout, manifest, atomic write, keep-last-N, lookup, config check.

Every file of a run checkpoint is written through this module (the learner ranks write their
DeepSpeed state into the folder `write` hands them). Layout under the run's output_dir:

    checkpoints/step_000004/      one complete checkpoint (a folder appears only once whole)
        manifest.json             step, policy version, learner ranks, ZeRO stage, format, time
        config.yaml               the run config that wrote it
        driver.json               sampler, normaliser statistics, rollout counters, tracker, ...
        learner/state/            every learner rank's DeepSpeed engine state (engine.save_checkpoint)
    checkpoints/.tmp-step_000004/ a checkpoint being written: renamed to step_000004 when whole
    checkpoints/.old-step_000004/ the previous copy of a step written again, until the new one is in place
    checkpoints/.new-step_000004/ in a bucket: the new copy of a step written again, until it is in place
    checkpoints/finished.json     written when the run finished: its step and config

Durable on a path: every file and folder of a new checkpoint (the learner ranks' included, as the
driver sees them) is fsynced before the rename that completes it, and the parent folder after it.
Writing a step that exists moves the old copy aside, renames the new one in, then deletes the old
one, so a crash at any moment leaves a complete copy of it; a lookup takes a lone aside copy for
its step, and the next write removes what a crash left.

When output_dir is a pyarrow.fs URI (cluster/storage.py) the driver works on a local copy of the
run's driver files (`mirror`: logs and checkpoints without their learner state), so every lookup
here reads local files; `write` then has the learner ranks upload their state straight to
`checkpoints/step_N/learner/` in the bucket from their own nodes, and puts the driver's files beside
it, the manifest last: an object store has no rename, so there a checkpoint is complete when its
manifest exists, and one without it (a crash while saving) is never taken and is removed later. A
step written again there goes to `.new-step_N` first, whole; then the old copy goes (its manifest
first), the new one is copied into its place (the store copies it, the manifest last) and the `.new-`
one goes: a crash at any moment leaves a complete copy of the step, which a lookup takes.

Light to import (no Ray, no torch, no pyarrow): the CLI uses `Interrupted` and the lookups; a URI's
`Storage` is handed in by the caller.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from rayrlhf.cluster.durable import fsync_path, fsync_tree, write_atomic
from rayrlhf.jobs.config.base import ConfigError

if TYPE_CHECKING:  # pyarrow stays unimported for the CLI's lookups
    from rayrlhf.cluster.storage import Storage

FORMAT = 2
MANIFEST = "manifest.json"
DRIVER_STATE = "driver.json"
LEARNER_DIR = "learner"
FINISHED = "finished.json"
OTHER_COPY = (".old-", ".new-")
"""Prefixes of a step's second copy while it is written again: locally the old one, moved aside; in a
bucket the new one, written beside the old (module docstring). Either is taken when it is the only one."""

FREE_FIELDS = (
    "name", "steps", "output_dir", "eval_every", "eval_max_new_tokens", "eval", "monitor", "checkpoint",
    "fault_tolerance", "cluster", "logging", "data.eval", "data.num_eval", "reward.rm_batch_size",
    "rollout.num_cpus", "rollout.num_gpus", "rollout.torch_threads", "reward.num_cpus", "reward.torch_threads",
    "kl.num_cpus", "kl.torch_threads", "learner.num_cpus", "learner.num_gpus", "learner.torch_threads",
    "learner.backend", "data.overlong_prompts", "learner.on_nonfinite",
)
"""Config fields a resumed run may change: where and how it runs, how long, what it logs and
evaluates; not what the training steps compute. Every other field must match the checkpoint's."""


class Interrupted(Exception):
    """The driver got SIGINT/SIGTERM and wrote a checkpoint; the process exits with 128 + signal."""

    def __init__(self, signum: int, checkpoint: Path | None) -> None:
        super().__init__(f"interrupted by signal {signum}; checkpoint: {checkpoint}")
        self.exit_code = 128 + signum
        self.checkpoint = checkpoint


def root(output_dir: Path) -> Path:
    return Path(output_dir) / "checkpoints"


def step_of(path: Path) -> int:
    return int(path.name.rsplit("step_", 1)[1])


def complete(output_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first: a folder named step_N with its manifest, or its other copy
    (OTHER_COPY) when a crash during a rewrite of step N left only that one."""
    folder = root(output_dir)
    if not folder.is_dir():
        return []
    found = {step_of(p): p for prefix in OTHER_COPY for p in folder.glob(f"{prefix}step_*")
             if p.name[10:].isdigit() and (p / MANIFEST).is_file()}  # fmt: skip
    found |= {step_of(p): p for p in folder.glob("step_*") if p.name[5:].isdigit() and (p / MANIFEST).is_file()}
    return [found[step] for step in sorted(found)]


def latest(output_dir: Path) -> Path | None:
    found = complete(output_dir)
    return found[-1] if found else None


def at_step(output_dir: Path, step: int) -> Path | None:
    return next((path for path in complete(output_dir) if step_of(path) == step), None)


def resolve(path: str | Path) -> Path:
    """A checkpoint folder, or the latest complete one of an output_dir."""
    path = Path(path).expanduser().resolve()
    if (path / MANIFEST).is_file():
        return path
    found = latest(path)
    if found is None:
        raise FileNotFoundError(f"no complete checkpoint at {path} (a checkpoint folder or an output_dir holding checkpoints/)")
    return found


def write(
    output_dir: Path, step: int, config: dict[str, Any], driver_state: dict[str, Any],
    write_learner: Callable[[str], None], manifest: dict[str, Any], keep: int, remote: Storage | None = None,
    write_extra: Callable[[Path], None] | None = None,
) -> Path:
    """Write a checkpoint into a temporary folder, then rename it into place; keep the last `keep`.

    `write_learner(location)` has the learner ranks save their engines to `location` (a collective):
    a folder inside the temporary one, or with `remote` (the Storage of a URI output_dir) the
    checkpoint's learner folder in the bucket. `write_extra(folder)` adds the driver's other files
    (the pipeline's batch ahead). A crash at any point leaves either the previous
    checkpoints or the new one whole, never half of one, and always a complete copy of a step
    written again (module docstring).
    """
    folder = root(output_dir)
    name = f"step_{step:06d}"
    final = folder / name
    tmp = folder / f".tmp-{name}"
    for stale in folder.glob(".*-step_*"):  # left by a crash while saving: not a copy lookups take
        if stale.name.startswith(".tmp-") or (folder / stale.name.split("-", 1)[1] / MANIFEST).is_file():
            shutil.rmtree(stale, ignore_errors=True)
    tmp.mkdir(parents=True)
    target = name  # where the bucket's copy is written: beside a complete one of the same step
    if remote is not None:
        target = f".new-{name}" if remote.exists(f"checkpoints/{name}/{MANIFEST}") else name
        remote.remove(f"checkpoints/{target}")  # an incomplete copy a crash left there
        write_learner(remote.join("checkpoints", target, LEARNER_DIR))
    else:
        write_learner(str(tmp / LEARNER_DIR))
    (tmp / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    _write_json(tmp / DRIVER_STATE, driver_state)
    if write_extra is not None:
        write_extra(tmp)
    _write_json(tmp / MANIFEST, {"format": FORMAT, "step": step, "time": time.time(), **manifest})
    # the learner ranks' files as this machine sees them: on a shared filesystem, a rank on another
    # node has closed them, which (NFS: close-to-open) hands their data to the server; the driver's
    # fsync then covers the server's copy only as far as the filesystem lets one client flush another's
    fsync_tree(tmp)
    _move_in(tmp, final)
    for old in complete(output_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    if remote is not None:
        _publish(final, remote, target, {step_of(p) for p in complete(output_dir)})
    return final


def _move_in(tmp: Path, final: Path) -> None:
    """Rename a written checkpoint into place; an existing copy of the step (written again after a
    learner restart or a resume from an earlier step) goes aside first and is deleted last."""
    aside = final.with_name(f".old-{final.name}")
    if (final / MANIFEST).is_file():
        shutil.rmtree(aside, ignore_errors=True)  # a crash's leftover: `final` is the complete copy
        os.replace(final, aside)
        fsync_path(final.parent)
    else:  # one without its manifest, mirrored from a bucket where a crash cut it off: no copy at all
        shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    fsync_path(final.parent)
    shutil.rmtree(aside, ignore_errors=True)


def _publish(final: Path, remote: Storage, target: str, kept: set[int]) -> None:
    """The driver's files of a checkpoint whose learner state is in the bucket's folder `target`, the
    manifest last; for a step written again (target `.new-step_N`), then the swap of the module
    docstring. Then every other folder there goes: steps not `kept` (older ones past `keep`, any never
    completed), a `.new-` copy whose step is complete, and a `.tmp-` folder the driver's logs carried
    up after a crash while saving. On a file:// URI everything is fsynced before a manifest is
    written, and the manifest after."""
    files = sorted(p.name for p in final.iterdir() if p.is_file() and p.name != MANIFEST)
    for file in files:
        remote.write_bytes(f"checkpoints/{target}/{file}", (final / file).read_bytes())
    remote.sync(f"checkpoints/{target}")
    remote.write_bytes(f"checkpoints/{target}/{MANIFEST}", (final / MANIFEST).read_bytes())
    remote.sync(f"checkpoints/{target}/{MANIFEST}")
    if target != final.name:  # the new copy is whole: the old one goes, the new one takes its place
        remote.remove(f"checkpoints/{final.name}/{MANIFEST}")
        remote.remove(f"checkpoints/{final.name}")
        remote.copy(f"checkpoints/{target}", f"checkpoints/{final.name}", keep=lambda file: file != MANIFEST)
        remote.sync(f"checkpoints/{final.name}")
        remote.copy(f"checkpoints/{target}", f"checkpoints/{final.name}", keep=lambda file: file == MANIFEST)
        remote.sync(f"checkpoints/{final.name}/{MANIFEST}")
    for other in remote.list_dir("checkpoints"):
        step = other.rsplit("step_", 1)[-1]
        kept_step = step.isdigit() and int(step) in kept
        if other.startswith(".tmp-") or (other.startswith("step_") and not kept_step):
            remote.remove(f"checkpoints/{other}")
        elif other.startswith(".new-") and (not kept_step or remote.exists(f"checkpoints/{other[5:]}/{MANIFEST}")):
            remote.remove(f"checkpoints/{other}")


def mirror(remote: Storage, output_dir: Path) -> None:
    """A URI run's driver files (logs, tracker state, checkpoints without their learner state) into the
    driver's local copy `output_dir`, so a rerun finds, checks and rewinds to its checkpoints."""
    def driver_part(relative: str) -> bool:
        parts = relative.split("/")
        if parts[0] == "final" or parts[0].startswith("step_"):  # policies: the learner writes them
            return False
        if parts[0].startswith(".rayrlhf"):  # the run lock (jobs/run/run_lock.py): the bucket's alone
            return False
        return not (parts[0] == "checkpoints" and parts[2:3] == [LEARNER_DIR])

    remote.download(output_dir, keep=driver_part)


def learner_location(path: Path, output_dir: Path, remote: Storage | None = None) -> str:
    """Where a checkpoint's learner state is: beside it, or in the bucket for a URI run's own checkpoint."""
    if remote is not None and path.parent == root(output_dir):
        return remote.join("checkpoints", path.name, LEARNER_DIR)
    return str(learner_dir(path))


def remove(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def read(path: Path) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """(manifest, config, driver state) of a checkpoint folder."""
    manifest = json.loads((path / MANIFEST).read_text())
    found = manifest.get("format")
    if found != FORMAT:
        by = "an older" if isinstance(found, int) and found < FORMAT else "another"
        raise ConfigError(
            f"{path}: checkpoint format {found} was written by {by} rayrlhf; this version reads format {FORMAT}. "
            "Resume it with the rayrlhf version that wrote it, or start over with --resume never (or another output_dir)"
        )
    config = yaml.safe_load((path / "config.yaml").read_text())
    return manifest, config, json.loads((path / DRIVER_STATE).read_text())


def learner_dir(path: Path) -> Path:
    return path / LEARNER_DIR


_PARTITION = re.compile(r"(?:bf16_)?zero_pp_rank_(\d+)_")


@dataclass(frozen=True)
class RankFiles:
    """Which files of a checkpoint's learner state learner rank `rank` loads (Storage.only: what it
    downloads from a bucket). DeepSpeed names each rank's ZeRO partition
    `[bf16_]zero_pp_rank_<rank>_mp_rank_00_{optim,model}_states.pt` (the optimizer's on stages 1-3,
    the weights' too on stage 3) and writes the rest once (`mp_rank_00_model_states.pt` on stages
    0-2, which every rank loads; PlainEngine's one file); a rank reads no other rank's partition as
    long as ZeRO's elastic_checkpoint is off (never set: actors/runtime/deepspeed_engine.py)."""

    rank: int

    def __call__(self, relative: str) -> bool:
        partition = _PARTITION.match(relative.rsplit("/", 1)[-1])
        return partition is None or int(partition[1]) == self.rank


def mark_finished(output_dir: Path, step: int, config: dict[str, Any]) -> None:
    _write_json(root(output_dir) / FINISHED, {"step": step, "config": config})


def finished(output_dir: Path) -> dict[str, Any] | None:
    path = root(output_dir) / FINISHED
    return json.loads(path.read_text()) if path.is_file() else None


def clear(output_dir: Path, remote: Storage | None = None) -> None:
    """Forget a previous run in this output_dir (`--resume never`): its checkpoints and finished mark."""
    shutil.rmtree(root(output_dir), ignore_errors=True)
    if remote is not None:
        remote.remove("checkpoints")


def changed_fields(
    saved: dict[str, Any], current: dict[str, Any], prefix: str = "", free: Callable[[str], bool] = lambda _: False
) -> list[str]:
    """Dotted names of the fields that differ and would make a resume wrong (FREE_FIELDS, and those
    `free` accepts, may differ). Lists of named entries of the same names (reward.functions) are
    compared entry by entry: reward.functions.<name>.weight."""
    out = []
    for key in sorted(set(saved) | set(current)):
        name = prefix + key
        if name in FREE_FIELDS or free(name):
            continue
        a, b = saved.get(key), current.get(key)
        if isinstance(a, list) and isinstance(b, list) and a != b:
            named_a, named_b = _by_name(a), _by_name(b)
            if named_a and named_a.keys() == named_b.keys():
                a, b = named_a, named_b
        if isinstance(a, dict) and isinstance(b, dict):
            out += changed_fields(a, b, f"{name}.", free)
        elif a != b:
            out.append(name)
    return out


def _by_name(entries: list[Any]) -> dict[str, Any]:
    """Entries with a `name` (empty: their function's) by name; {} unless every entry has its own."""
    from rayrlhf.jobs.config.run import function_name

    if not all(isinstance(e, dict) and "path" in e for e in entries):
        return {}
    named = {e.get("name") or function_name(str(e["path"])): e for e in entries}
    return named if len(named) == len(entries) else {}


def _write_json(path: Path, data: dict[str, Any]) -> None:
    """Write-then-rename, so a reader never sees half a file."""
    write_atomic(path, json.dumps(data, indent=1).encode())
