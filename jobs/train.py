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
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import ray
import yaml
from transformers import AutoTokenizer

from rayrlhf.actors.rewards.embeddings import resolve_embedding_model
from rayrlhf.actors.runtime.models import missing_lora_targets, resolve_policy
from rayrlhf.actors.rewards.remote import RemoteRewardError, env_headers
from rayrlhf.actors.environments.base import load_environment
from rayrlhf.actors.rewards.user_functions import check_functions
from rayrlhf.actors.rewards.reward_model import check_reward_model_dir
from rayrlhf.actors.rl.trajectory import Prompt
from rayrlhf.cluster import worker_logs
from rayrlhf.cluster.local import init_ray, shutdown_ray
from rayrlhf.cluster.storage import Storage
from rayrlhf.jobs.run import checkpoint
from rayrlhf.jobs.config.base import ConfigError
from rayrlhf.jobs.config.run import RunConfig
from rayrlhf.jobs.data.episodes import read_episodes
from rayrlhf.jobs.data.prompts import check_prompt_lengths, load_task
from rayrlhf.jobs.data.sampler import PromptSampler
from rayrlhf.jobs.run.health import HealthMonitor, weighted_components
from rayrlhf.jobs.run.evaluation import evaluate
from rayrlhf.jobs.run.learner_failure import LearnerFailure
from rayrlhf.jobs.run.pipeline import Pipeline
from rayrlhf.jobs.run.recovery import Recovery
from rayrlhf.jobs.run.roles import Roles, launch
from rayrlhf.jobs.run.run_lock import RunLock
from rayrlhf.jobs.run.state import RunState, plan
from rayrlhf.jobs.run.stop import StopSignal, grace_period
from rayrlhf.jobs.run.tracking import Tracker, format_table, what_you_have


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


def checkpoint_due(cfg: RunConfig, step: int, saved_at: float) -> bool:
    """Every checkpoint.every steps, and once checkpoint.every_minutes have passed since the last save."""
    every, minutes = cfg.checkpoint.every, cfg.checkpoint.every_minutes
    return bool(every and step % every == 0) or (minutes is not None and time.monotonic() - saved_at >= 60 * minutes)


def keep_if_best(run: RunState, storage: Storage, metrics: dict[str, float]) -> None:
    """Save the policy to <output_dir>/best when this evaluation beats the best one so far."""
    name, mode = run.cfg.eval.best_metric, run.cfg.eval.best_mode
    if name is None:
        return
    if name not in metrics:
        raise ConfigError(f"eval.best_metric: {name!r} is not a held-out metric of this run; "
                          f"it has {sorted(k for k in metrics if k.startswith('eval/'))}")  # fmt: skip
    value = metrics[name]
    if run.best is not None and not (value > run.best["value"] if mode == "max" else value < run.best["value"]):
        return
    save(run.roles, storage.child("best"))
    run.best = {"step": run.step, "value": value}
    storage.write_text("best.json", json.dumps({"metric": name, **run.best}))
    run.tracker.write(f"best {name} so far ({value:.4f}) at step {run.step}: policy saved to {storage.shown('best')}")


def runs_on_this_machine(cfg: RunConfig) -> bool:
    """A run whose actors all see this machine's files (an in-process or one-node Ray): the driver can check them."""
    if cfg.cluster.address or os.environ.get("RAY_ADDRESS"):
        return False
    return not ray.is_initialized() or sum(node["Alive"] for node in ray.nodes()) == 1


def check_episodes(cfg: RunConfig, path: str) -> None:
    """data.episodes: readable, every line valid, and a step's share divides into the learner ranks' groups."""
    try:
        read_episodes(path)
    except (OSError, ValueError) as e:
        raise ConfigError(f"data.episodes: {e}") from e
    if cfg.prompts_per_step % cfg.learner.num_ranks:
        raise ConfigError(f"data.episodes: prompts_per_step ({cfg.prompts_per_step}) must be a multiple of "
                          f"learner.num_ranks ({cfg.learner.num_ranks}), so each rank trains whole groups")  # fmt: skip
    if cfg.pipeline.max_staleness:
        raise ConfigError("data.episodes: recorded episodes are trained synchronously; set pipeline.max_staleness: 0")


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
        if cfg.env is not None:
            load_environment(cfg.env.path, cfg.env.options)  # file, class, methods, options, before Ray starts
        if cfg.reward.remote is not None:
            env_headers(cfg.reward.remote.headers_env)  # set where the run starts, not only on some node
    except (ValueError, RemoteRewardError) as e:
        raise ConfigError(str(e)) from e
    if cfg.data.episodes:
        check_episodes(cfg, cfg.data.episodes)
    if len(train_set) < cfg.prompts_per_step:
        raise ConfigError(f"data.train has {len(train_set)} prompts, fewer than prompts_per_step={cfg.prompts_per_step}")
    if runs_on_this_machine(cfg):
        try:
            resolve_embedding_model(cfg.reward.embedding_model)
        except ValueError as e:
            raise ConfigError(str(e)) from e
        try:
            policy_dir = resolve_policy(cfg.policy.model, cfg.policy.cache_dir)  # built-in ones: converted once, here
        except (ValueError, FileNotFoundError) as e:
            raise ConfigError(f"policy.model: {e}") from e
        try:
            cut = check_prompt_lengths(AutoTokenizer.from_pretrained(policy_dir), train_set + eval_set, cfg.data,
                                       cfg.policy.max_prompt_tokens)
        except ValueError as e:
            raise ConfigError(f"data: {e}") from e
        if cut:
            print(f"data: {cut} prompts are longer than policy.max_prompt_tokens={cfg.policy.max_prompt_tokens}; "
                  "they are cut from the left (data.overlong_prompts=truncate)", file=sys.stderr)
        if cfg.policy.lora and (missing := missing_lora_targets(policy_dir, cfg.policy.lora.target_modules)):
            raise ConfigError(f"policy.lora.target_modules: {missing} match no layer of {cfg.policy.model}; "
                              'name its layers (e.g. c_attn for GPT-2, q_proj for Llama) or use "all-linear"')
        if cfg.reward.rm_weight != 0:
            try:
                check_reward_model_dir(cfg.reward.rm_model or "")
            except ValueError as e:
                raise ConfigError(f"reward.rm_model: {e}") from e
    return train_set, eval_set


def train(
    cfg: RunConfig, on_step: Callable[[int, dict[str, float]], None] | None = None, resume: str | Path = "auto",
    retune: bool = False,
) -> TrainResult:
    """Run the RL loop; `on_step(step, metrics)` (optional) sees each step's metrics, eval ones included,
    after that step's checkpoint (if any) is written. `resume`: "auto" (continue from the latest
    complete checkpoint in output_dir, if any), "never" (start over) or a checkpoint path. `retune`:
    the config may differ from the checkpoint's in the fields PBT changes (jobs/run/pbt.py)."""
    with RunLock(Storage(cfg.output_dir), cfg.name):  # one driver per output_dir: a second is refused here
        return _train(cfg, on_step, resume, retune)


def _train(
    cfg: RunConfig, on_step: Callable[[int, dict[str, float]], None] | None, resume: str | Path, retune: bool
) -> TrainResult:
    train_set, eval_set = prepare(cfg)
    storage = Storage(cfg.output_dir)
    # the driver's own files: written in place for a path; for a URI, a local copy of the stored run's
    # driver files (its checkpoints are found there), uploaded as it goes (jobs/run/checkpoint.py)
    remote = None if storage.local_path is not None else storage
    output_dir = storage.local_path or Path(tempfile.mkdtemp(prefix="rayrlhf-driver-"))
    try:
        if remote is not None:
            checkpoint.mirror(remote, output_dir)
        start = plan(cfg, output_dir, str(resume), remote, retune)
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
    worker_logs.write_to(output_dir / "workers.log")
    monitor = HealthMonitor(cfg.monitor.model_dump(), weighted_components(cfg.reward), tracker.write,
                            truncation=cfg.reward.truncation, episodes=cfg.env is not None)  # fmt: skip
    recovery = Recovery(roles, cfg.fault_tolerance, log=tracker.write)
    sampler = PromptSampler(train_set, cfg.seed)
    episodes = read_episodes(cfg.data.episodes) if cfg.data.episodes else None  # checked in prepare()
    pipeline = Pipeline(cfg, roles, recovery, sampler, episodes)
    run = RunState(cfg, output_dir, roles, sampler, tracker, recovery, monitor, pipeline, remote=remote)
    try:
        with StopSignal(grace_period(cfg.checkpoint.stop_grace_s)) as stop:
            if start.checkpoint:
                run.resume(start.checkpoint)
                tracker.write(f"resuming from {start.checkpoint} (step {run.step} of {cfg.steps})")
            else:
                run.before, _ = evaluate(cfg, roles, eval_set, recovery)
                keep_if_best(run, storage, run.before)
                tracker.log(0, run.before, advance=False)
                monitor.observe(0, dict(run.before))  # a copy: no health flags in the before/after table
                run.initial = run.driver_state()
            stopped_early = False
            while run.step < cfg.steps and not stopped_early:
                stop.checkpoint_if_asked(run)
                step = run.step + 1
                before_step = run.driver_state(live=False)  # what a checkpoint needs if this step fails
                try:
                    metrics = pipeline.step(last=step == cfg.steps, collecting=lambda: stop.collecting(run))
                    evaluated = cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps
                    if evaluated:
                        metrics.update(evaluate(cfg, roles, eval_set, recovery)[0])
                    metrics["restarts/learner"] = float(run.learner_restarts)
                    if metrics.get("skipped_updates"):
                        tracker.write(f"step {step}: {metrics['skipped_updates']:.0f} update(s) skipped, with a "
                                      "non-finite loss or gradient norm (learner.on_nonfinite: skip; workers.log "
                                      "names the rank and the quantity)")
                    stopped_early = monitor.observe(step, metrics)  # adds health/*; True: a monitor.stop_on check failed
                    run.step = step
                    if evaluated:
                        keep_if_best(run, storage, metrics)
                    tracker.log(step, metrics)
                    run.history.append({"step": step, **metrics})
                    if checkpoint_due(cfg, step, run.saved_at):
                        run.save()
                        storage.upload(output_dir)  # the logs so far, beside the checkpoint
                except LearnerFailure as e:
                    run.recover_learner(e)
                    continue
                except KeyboardInterrupt:
                    if stop.abandoned is None:
                        raise  # a second signal: at once
                    stop.save_abandoned(run, before_step)  # a SIGTERM whose grace cannot cover this step
                except Exception as e:  # bad data, a reward failing every retry, recovery giving up, ...
                    run.save_after_error(before_step, e)
                    raise
                if on_step is not None:
                    on_step(step, metrics)
            stop.checkpoint_if_asked(run)  # a signal during the last step: its checkpoint, not the end of the run
        after, examples = evaluate(cfg, roles, eval_set, recovery)
        monitor.observe(run.step, dict(after))
        keep_if_best(run, storage, after)
        tracker.log(run.step, after, advance=False)  # the steps run: fewer if the monitor stopped the run
        final_dir = storage.join("final")
        save(roles, storage.child("final"))
        (output_dir / "eval.json").write_text(json.dumps({"before": run.before, "after": after}, indent=2))
        (output_dir / "examples.jsonl").write_text("".join(json.dumps(e) + "\n" for e in examples))
        checkpoint.mark_finished(output_dir, cfg.steps, cfg.model_dump())  # also after a monitor stop: a rerun trains no further
        if cfg.monitor.plot:
            monitor.plot(output_dir / "training.png")
        tracker.summary("\n" + format_table(run.before, after) + "\n\n" + what_you_have(run_places(cfg, storage, run.best), final_dir))
    finally:
        tracker.close()
        roles.shutdown()
        if started_ray:
            shutdown_ray()
        if storage.local_path is None:
            storage.upload(output_dir)
            shutil.rmtree(output_dir, ignore_errors=True)
    return TrainResult(storage.shown(), storage.shown("final"), run.before, after, run.history, recovery.trained)


def run_places(cfg: RunConfig, storage: Storage, best: dict | None) -> dict[str, object]:
    """A finished run's files and the commands that open them, for the console's closing block."""
    places: dict[str, object] = {"final policy": storage.shown("final")}
    if best:
        places["best policy"] = f"{storage.shown('best')} ({cfg.eval.best_metric} at step {best['step']})"
    places["checkpoints"] = storage.shown("checkpoints")
    places["metrics"] = storage.shown("metrics.jsonl")
    if cfg.monitor.plot:
        places["plot"] = storage.shown("training.png")
    places["worker logs"] = storage.shown("workers.log")
    if cfg.logging.tensorboard:
        places["TensorBoard"] = f"tensorboard --logdir {storage.shown('tensorboard')}"
    return places


def finished_result(output_dir: Path, storage: Storage) -> TrainResult:
    """What a finished run left in output_dir (the driver's copy of it, for a URI), for a rerun of the same command."""
    evaluated = json.loads((output_dir / "eval.json").read_text())
    rows = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    history = [row for row in rows[1:-1]]  # step 0 is the eval before, the last line the eval after
    if storage.local_path is None:
        shutil.rmtree(output_dir, ignore_errors=True)
    return TrainResult(storage.shown(), storage.shown("final"), evaluated["before"], evaluated["after"], history)

