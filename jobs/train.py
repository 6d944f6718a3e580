"""`rayrlhf train`: the RL loop across rollout, reward, reference and learner actors (the step itself,
synchronous or pipelined, is jobs/run/pipeline.py).

The driver only moves ObjectRefs: trajectories go from rollout workers to reward scorers, the
reference policy and the learner ranks without passing through this process. What it does
fetch is small: reward components and learner metrics for logging, and the held-out
evaluation batches (to show examples and lengths).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import ray
import yaml

from rayrlhf.actors.rewards.embeddings import resolve_embedding_model
from rayrlhf.actors.runtime.models import resolve_policy
from rayrlhf.actors.rewards.user_functions import check_functions
from rayrlhf.actors.rewards.reward_model import check_reward_model_dir
from rayrlhf.actors.rl.trajectory import Prompt
from rayrlhf.cluster.local import init_ray, shutdown_ray
from rayrlhf.cluster.storage import Storage
from rayrlhf.jobs.run import checkpoint
from rayrlhf.jobs.config.base import ConfigError
from rayrlhf.jobs.config.run import RunConfig
from rayrlhf.jobs.data.prompts import load_task
from rayrlhf.jobs.data.sampler import PromptSampler
from rayrlhf.jobs.run.health import HealthMonitor, weighted_components
from rayrlhf.jobs.run.learner_failure import LearnerFailure
from rayrlhf.jobs.run.pipeline import Pipeline, reward_metrics, shards
from rayrlhf.jobs.run.recovery import Recovery
from rayrlhf.jobs.run.roles import Roles, launch
from rayrlhf.jobs.run.state import RunState, StopSignal, plan
from rayrlhf.jobs.run.tracking import Tracker, format_table


@dataclass
class TrainResult:
    output_dir: Path | str
    """A path when the storage is a local (or shared) path, else the storage URI."""
    final_dir: Path | str
    before: dict[str, float]
    after: dict[str, float]
    history: list[dict[str, float]] = field(default_factory=list)
    trained_samples: list[list[int]] = field(default_factory=list)
    """Per step, the sample ids (prompt id x k + j) the learner trained on."""


def save(roles: Roles, destination: Storage) -> None:
    """A Hugging Face directory of the policy (a collective: every rank joins, rank 0 writes, from its
    own node, straight to the user's storage)."""
    ray.get([learner.save.remote(destination) for learner in roles.learner])


def evaluate(
    cfg: RunConfig, roles: Roles, prompts: list[Prompt], recovery: Recovery | None = None
) -> tuple[dict[str, float], list[dict]]:
    """Greedy (or beam-search) answers on held-out prompts, scored without touching the normaliser statistics."""
    recovery = recovery or Recovery(roles, cfg.fault_tolerance)
    return recovery.run("the evaluation", lambda: _evaluate(cfg, roles, prompts, recovery))


def _evaluate(cfg: RunConfig, roles: Roles, prompts: list[Prompt], recovery: Recovery) -> tuple[dict[str, float], list[dict]]:
    max_new = cfg.eval_max_new_tokens or cfg.rollout.max_new_tokens
    traj_refs = [
        roles.rollout[i].generate.remote(
            ray.put(shard), greedy=True, max_new_tokens=max_new, num_beams=cfg.eval.num_beams
        )
        for i, shard in enumerate(shards(prompts, len(roles.rollout)))
    ]
    _, rewards = recovery.score(traj_refs, update_stats=False)
    trajectories = ray.get(traj_refs)
    metrics = reward_metrics(rewards, "eval")
    metrics.pop("eval/total")  # normalised total is not comparable across time; eval/raw is
    lengths = np.concatenate([t.response_lengths for t in trajectories])
    responses = [r for t in trajectories for r in t.responses]
    metrics["eval/length"] = float(lengths.mean())
    metrics["eval/empty_frac"] = float(np.mean([not r.strip() for r in responses]))
    examples = [
        {"prompt": p, "response": r, "reference": ref}
        for t in trajectories for p, r, ref in zip(t.prompts, t.responses, t.references)
    ]
    return metrics, examples


def runs_on_this_machine(cfg: RunConfig) -> bool:
    """A run whose actors all see this machine's files (an in-process or one-node Ray): the driver can check them."""
    if cfg.cluster.address or os.environ.get("RAY_ADDRESS"):
        return False
    return not ray.is_initialized() or sum(node["Alive"] for node in ray.nodes()) == 1


def prepare(cfg: RunConfig) -> tuple[list[Prompt], list[Prompt]]:
    """Everything that can fail on bad input, done before any cluster resource is claimed.

    Models are checked here only when the run stays on this machine; on a cluster each node resolves
    (and, for built-in names, converts) the models its roles use, and a missing one fails the launch
    with the node's name (see actors/runtime/models.py)."""
    try:
        train_set, eval_set = load_task(
            cfg.data.train, cfg.data.eval, cfg.data.num_train, cfg.data.num_eval, cfg.seed
        )
        check_functions(cfg.reward.model_dump()["functions"], {k for p in train_set + eval_set for k in p.extra})
    except ValueError as e:
        raise ConfigError(str(e)) from e
    if len(train_set) < cfg.prompts_per_step:
        raise ConfigError(f"data.train has {len(train_set)} prompts, fewer than prompts_per_step={cfg.prompts_per_step}")
    if runs_on_this_machine(cfg):
        try:
            resolve_embedding_model(cfg.reward.embedding_model)
        except ValueError as e:
            raise ConfigError(str(e)) from e
        try:
            resolve_policy(cfg.policy.model, cfg.policy.cache_dir)  # built-in ones are converted once, here
        except (ValueError, FileNotFoundError) as e:
            raise ConfigError(f"policy.model: {e}") from e
        if cfg.reward.rm_weight != 0:
            try:
                check_reward_model_dir(cfg.reward.rm_model or "")
            except ValueError as e:
                raise ConfigError(f"reward.rm_model: {e}") from e
    return train_set, eval_set


def train(
    cfg: RunConfig, on_step: Callable[[int, dict[str, float]], None] | None = None, resume: str | Path = "auto",
) -> TrainResult:
    """Run the RL loop; `on_step(step, metrics)` (optional) sees each step's metrics, eval ones included,
    after that step's checkpoint (if any) is written. `resume`: "auto" (continue from the latest
    complete checkpoint in output_dir, if any), "never" (start over) or a checkpoint path."""
    train_set, eval_set = prepare(cfg)
    storage = Storage(cfg.output_dir)
    # the driver's own files: written in place for a path; for a URI, a local copy of the stored run's
    # driver files (its checkpoints are found there), uploaded as it goes (jobs/run/checkpoint.py)
    remote = None if storage.local_path is not None else storage
    output_dir = storage.local_path or Path(tempfile.mkdtemp(prefix="rayrlhf-driver-"))
    try:
        if remote is not None:
            checkpoint.mirror(remote, output_dir)
        start = plan(cfg, output_dir, str(resume), remote)
    except BaseException:  # e.g. a config that differs from the checkpoint's: no local copy left behind
        if remote is not None:
            shutil.rmtree(output_dir, ignore_errors=True)
        raise
    if start.finished_step is not None:
        print(f"the run in {storage} already finished ({start.finished_step} steps); final policy: "
              f"{storage.join('final')} (--resume never starts it over)")
        return finished_result(output_dir, storage)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(), sort_keys=False))
    saved_state = checkpoint.read(start.checkpoint)[2] if start.checkpoint else None
    started_ray = not ray.is_initialized()
    init_ray(cfg.cluster.address, cfg.cluster.num_cpus, cfg.cluster.object_store_mb)
    try:
        roles = launch(cfg)
    except BaseException:  # e.g. a model missing on a node: leave no connection behind
        if started_ray:
            shutdown_ray()
        raise
    tracker = Tracker(
        output_dir, run_name=cfg.name, config=cfg.model_dump(), total_steps=cfg.steps,
        wandb_mode=cfg.logging.wandb, wandb_project=cfg.logging.wandb_project,
        tensorboard=cfg.logging.tensorboard, progress_bar=cfg.logging.progress_bar,
        resume=saved_state["tracker"] if saved_state else None,
    )
    monitor = HealthMonitor(cfg.monitor.model_dump(), weighted_components(cfg.reward), tracker.write)
    recovery = Recovery(roles, cfg.fault_tolerance, log=tracker.write)
    sampler = PromptSampler(train_set, cfg.seed)
    pipeline = Pipeline(cfg, roles, recovery, lambda: sampler.draw(cfg.prompts_per_step))
    run = RunState(cfg, output_dir, roles, sampler, tracker, recovery, monitor, pipeline, remote=remote)
    try:
        with StopSignal() as stop:
            if start.checkpoint:
                run.resume(start.checkpoint)
                tracker.write(f"resuming from {start.checkpoint} (step {run.step} of {cfg.steps})")
            else:
                run.before, _ = evaluate(cfg, roles, eval_set, recovery)
                tracker.log(0, run.before, advance=False)
                monitor.observe(0, dict(run.before))  # a copy: no health flags in the before/after table
                run.initial = run.driver_state()
            stopped_early = False
            while run.step < cfg.steps and not stopped_early:
                stop.checkpoint_if_asked(run)
                step = run.step + 1
                try:
                    metrics = pipeline.step(last=step == cfg.steps)
                    if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps:
                        metrics.update(evaluate(cfg, roles, eval_set, recovery)[0])
                    metrics["restarts/learner"] = float(run.learner_restarts)
                    stopped_early = monitor.observe(step, metrics)  # adds health/*; True: a monitor.stop_on check failed
                    run.step = step
                    tracker.log(step, metrics)
                    run.history.append({"step": step, **metrics})
                    if cfg.checkpoint.every and step % cfg.checkpoint.every == 0:
                        run.save()
                        storage.upload(output_dir)  # the logs so far, beside the checkpoint
                except LearnerFailure as e:
                    run.recover_learner(e)
                    continue
                if on_step is not None:
                    on_step(step, metrics)
            stop.checkpoint_if_asked(run)  # a signal during the last step: its checkpoint, not the end of the run
        after, examples = evaluate(cfg, roles, eval_set, recovery)
        monitor.observe(run.step, dict(after))
        tracker.log(run.step, after, advance=False)  # the steps run: fewer if the monitor stopped the run
        final_dir = storage.join("final")
        save(roles, storage.child("final"))
        (output_dir / "eval.json").write_text(json.dumps({"before": run.before, "after": after}, indent=2))
        (output_dir / "examples.jsonl").write_text("".join(json.dumps(e) + "\n" for e in examples))
        checkpoint.mark_finished(output_dir, cfg.steps, cfg.model_dump())  # also after a monitor stop: a rerun trains no further
        tracker.write("\n" + format_table(run.before, after) + f"\n\nfinal policy: {final_dir}")
        if cfg.monitor.plot:
            monitor.plot(output_dir / "training.png")
    finally:
        tracker.close()
        roles.shutdown()
        if started_ray:
            shutdown_ray()
        if storage.local_path is None:
            storage.upload(output_dir)
            shutil.rmtree(output_dir, ignore_errors=True)
    return TrainResult(storage.shown(), storage.shown("final"), run.before, after, run.history, recovery.trained)


def finished_result(output_dir: Path, storage: Storage) -> TrainResult:
    """What a finished run left in output_dir (the driver's copy of it, for a URI), for a rerun of the same command."""
    evaluated = json.loads((output_dir / "eval.json").read_text())
    rows = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    history = [row for row in rows[1:-1]]  # step 0 is the eval before, the last line the eval after
    if storage.local_path is None:
        shutil.rmtree(output_dir, ignore_errors=True)
    return TrainResult(storage.shown(), storage.shown("final"), evaluated["before"], evaluated["after"], history)

