"""Population-based training's rules, without Ray: which run-config fields PBT may change between two
segments of a run, which of them the learner must take over from a restored checkpoint, and the record
of every change (an events file per trial) from which the best trial's schedule is rebuilt.

A PBT exploit restarts a weak trial from a strong trial's run checkpoint under perturbed settings.
The resume is exact except for these fields: the reward weights (read from the config when the
reward scorers start; the normalisers' statistics are restored as they were), the KL coefficient
and the learning rate (both restored from the checkpoint by the learner, so the perturbed values are
put back over them after the load).
"""

from __future__ import annotations

import fnmatch
import json
import math
from pathlib import Path
from typing import Any

from rayrlhf.jobs.config.run import function_name

PBT_FIELDS = (
    "reward.alpha", "reward.beta", "reward.bleu", "reward.rouge_l", "reward.rm_weight", "reward.remote.weight",
    "reward.functions.*.weight", "kl.coef", "learner.lr",
)
"""Run-config fields a PBT trial may change when it resumes from a checkpoint (fnmatch patterns)."""

NONZERO_FIELDS = ("reward.rm_weight", "kl.coef")
"""Fields whose zero removes a role (the reward model, the reference policy): PBT keeps them above 0."""

LEARNER_SETTINGS = {"learner.lr": "lr", "kl.coef": "kl_coef"}
"""Fields the learner restores from a checkpoint -> the name under which it takes the new value."""

EVENTS = "pbt_events.jsonl"
"""In each trial's folder: one line per start, exploit or perturbation."""


def perturbable(field: str) -> bool:
    return any(fnmatch.fnmatchcase(field, pattern) for pattern in PBT_FIELDS)


def check_space(bounds: dict[str, list[float]]) -> None:
    """A PBT search space: perturbable fields only, and no zero where a zero would remove a role."""
    wrong = sorted(f for f in bounds if not perturbable(f))
    if wrong:
        raise ValueError(f"search.algorithm=pbt can change only {', '.join(PBT_FIELDS)} during a run; not {wrong}")
    for field in NONZERO_FIELDS:
        if field in bounds and min(bounds[field]) <= 0:
            raise ValueError(f"search.algorithm=pbt: {field} must stay above 0 (its zero removes a role)")


def learner_overrides(saved: dict[str, Any], current: dict[str, Any]) -> dict[str, float]:
    """The learner's settings to put over what it restores from a checkpoint written under the config
    `saved`: those the current config changed (a PBT perturbation), by the learner's name for them."""
    return {name: float(get_field(current, field)) for field, name in LEARNER_SETTINGS.items()
            if get_field(saved, field) != get_field(current, field)}


def get_field(tree: dict[str, Any], dotted: str) -> Any:
    """A config value by dotted name; a list of named entries is entered by name (reward.functions.<name>)."""
    node: Any = tree
    for key in dotted.split("."):
        if isinstance(node, list):
            node = next(e for e in node if (e.get("name") or function_name(str(e.get("path", "")))) == key)
        else:
            node = node[key]
    return node


def clip(point: dict[str, Any], bounds: dict[str, list[float]]) -> dict[str, Any]:
    """A perturbed point back inside its ranges (PBT multiplies by 0.8 or 1.2, which can leave them)."""
    return {k: min(max(v, bounds[k][0]), bounds[k][1]) if k in bounds else v for k, v in point.items()}


def settings_of(config: dict[str, Any], fields: list[str]) -> dict[str, float]:
    return {field: get_field(config, field) for field in fields}


def change_event(
    step: int, trial: str, donor: str, before: dict[str, float], after: dict[str, float]
) -> dict[str, Any] | None:
    """The record of a trial that starts from `donor`'s checkpoint of `step` with settings `after`
    (the checkpoint's: `before`); None when nothing changed (a retry or a pause/resume)."""
    if donor == trial and before == after:
        return None
    return {"step": step, "kind": "exploit" if donor != trial else "perturb", "trial": trial, "donor": donor,
            "before": before, "after": after}


def append_event(trial_dir: Path, event: dict[str, Any]) -> bool:
    """Add an event to the trial's file, once (a retry of the same start writes it again); True if new."""
    path = Path(trial_dir) / EVENTS
    if event in read_events(trial_dir):
        return False
    with open(path, "a") as f:
        f.write(json.dumps(event) + "\n")
    return True


def read_events(trial_dir: Path) -> list[dict[str, Any]]:
    path = Path(trial_dir) / EVENTS
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def schedule(events: dict[str, list[dict[str, Any]]], trial: str, until: float = math.inf) -> list[dict[str, Any]]:
    """The settings that trained `trial`'s policy up to step `until` (its final one by default), as
    [{"step", "trial", **settings}] from step 0: its own segments after its last exploit, and before that
    its donor's schedule up to that step (recursively). `events`: trial -> its events, "start" first."""
    own = sorted((e for e in events.get(trial, []) if e["step"] < until), key=lambda e: e["step"])
    exploits = [e for e in own if e["kind"] == "exploit"]
    lineage: list[dict[str, Any]] = []
    if exploits:
        last = exploits[-1]
        lineage = schedule(events, last["donor"], last["step"])
        own = own[own.index(last):]
    return lineage + [{"step": e["step"], "trial": trial, **e["after"]} for e in own]
