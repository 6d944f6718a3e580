"""`rayrlhf eval`: the held-out evaluation of a training run, on any policy and any data.

It runs the evaluation that `rayrlhf train` runs before and after training (jobs/run/evaluation.py),
on Ray, with the rollout workers and reward scorers a training run of the same config starts (no
learner, no reference), so its figures are the run's own: `rayrlhf eval --config math --model
outputs/math/final` gives the run's final held-out figures again. The policy is any Hugging Face
directory (a run's final/ or best/) or built-in name; the data is the config's held-out split or
any prompt file (--data); the rewards are the config's. The metrics go to a JSON file.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import ray

from rayrlhf.cluster.local import init_ray, shutdown_ray
from rayrlhf.cluster.storage import Storage, is_uri
from rayrlhf.jobs.config.base import ConfigError
from rayrlhf.jobs.config.run import RunConfig
from rayrlhf.jobs.run.checkpoint import MANIFEST
from rayrlhf.jobs.run.evaluation import evaluate
from rayrlhf.jobs.run.roles import launch
from rayrlhf.jobs.train import prepare

EVALUATION_ROLES = ("rollout", "reward", "env")


@dataclass
class EvalResult:
    metrics: dict[str, float]
    output: str
    """Where the JSON with the metrics and the examples was written."""


def default_output(cfg: RunConfig) -> str:
    """<output_dir>/eval_<policy name>.json: beside the run's own eval.json, never over it."""
    name = Path(cfg.policy.model.rstrip("/")).name or "policy"
    return Storage(cfg.output_dir).join(f"eval_{name}.json")


def check_policy(model: str) -> None:
    """A run checkpoint (checkpoints/step_N) holds DeepSpeed state, not a policy: say what to give instead."""
    if (Path(model) / MANIFEST).is_file():
        raise ConfigError(
            f"policy.model: {model} is a run checkpoint (DeepSpeed state); evaluate a policy directory: "
            "the run's final/ or best/, or resume the run"
        )


def check_output(output: str) -> None:
    """A folder the metrics cannot be written to fails now, not after the evaluation (a URI is not probed)."""
    folder = output.rsplit("/", 1)[0] if "/" in output else "."
    if is_uri(folder):
        return
    try:
        Path(folder).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"--output: cannot create the folder of {output} ({e.strerror}); give a path in a "
                          "writable folder") from e  # fmt: skip
    if not os.access(folder, os.W_OK):
        raise ConfigError(f"--output: the folder of {output} is not writable; give a path in a writable folder")


def run_eval(cfg: RunConfig, output: str | None = None) -> EvalResult:
    check_policy(cfg.policy.model)
    _, eval_set = prepare(cfg)
    output = output or default_output(cfg)
    check_output(output)
    started_ray = not ray.is_initialized()
    init_ray(cfg.cluster.address, cfg.cluster.num_cpus, cfg.cluster.object_store_mb)
    try:
        roles = launch(cfg, only=EVALUATION_ROLES)
        try:
            metrics, examples = evaluate(cfg, roles, eval_set)
        finally:
            roles.shutdown()
    finally:
        if started_ray:
            shutdown_ray()
    report = {"policy": cfg.policy.model, "data": cfg.data.eval or cfg.data.train, "prompts": len(eval_set),
              "metrics": metrics, "examples": examples}  # fmt: skip
    folder, name = output.rsplit("/", 1) if "/" in output else (".", output)
    Storage(folder).write_text(name, json.dumps(report, indent=2))  # a path or a pyarrow.fs URI
    width = max(len(k) for k in metrics) + 2
    print("\n".join(f"{k.removeprefix('eval/'):<{width}}{v:>10.4f}" for k, v in metrics.items()))
    print(f"\n{len(eval_set)} held-out prompts; metrics and answers: {output}")
    return EvalResult(metrics, output)
