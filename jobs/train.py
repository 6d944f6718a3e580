"""`rayrlhf train`: the synchronous RL loop across rollout, reward, reference and learner actors.

The driver only moves ObjectRefs: trajectories go from rollout workers to reward scorers, the
reference policy and the learner ranks without passing through this process. What it does
fetch is small: reward components and learner metrics for logging, and the held-out
evaluation batches (to show examples and lengths).
"""

from __future__ import annotations

import json
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import ray
import yaml

from rayrlhf.actors.embeddings import resolve_embedding_model
from rayrlhf.actors.models import resolve_policy
from rayrlhf.actors.reward_model import check_reward_model_dir
from rayrlhf.actors.trajectory import LearnerBatch, Prompt, Rewards
from rayrlhf.cluster.actor_group import ActorGroup
from rayrlhf.cluster.local import init_ray, shutdown_ray
from rayrlhf.jobs import checkpoint
from rayrlhf.jobs.checkpoint import Interrupted
from rayrlhf.jobs.config.base import ConfigError
from rayrlhf.jobs.config.run import RunConfig
from rayrlhf.jobs.data.prompts import load_task
from rayrlhf.jobs.roles import Roles, launch
from rayrlhf.jobs.run_state import LearnerFailure, RunState, StopSignal, get_all, is_learner_failure, plan
from rayrlhf.jobs.tracking import Tracker


@dataclass
class TrainResult:
    output_dir: Path
    final_dir: Path
    before: dict[str, float]
    after: dict[str, float]
    history: list[dict[str, float]] = field(default_factory=list)


class PromptSampler:
    """Epochs over the training prompts in a seeded order; its state is the rest of the epoch and the RNG."""

    def __init__(self, prompts: list[Prompt], seed: int) -> None:
        self.prompts = prompts
        self.rng = random.Random(seed)
        self.order: list[int] = []

    def draw(self, n: int) -> list[Prompt]:
        batch = []
        for _ in range(n):
            if not self.order:
                self.order = list(range(len(self.prompts)))
                self.rng.shuffle(self.order)
            batch.append(self.prompts[self.order.pop()])
        return batch

    def state_dict(self) -> dict[str, Any]:
        version, internal, gauss = self.rng.getstate()
        return {"order": list(self.order), "rng": [version, list(internal), gauss]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        version, internal, gauss = state["rng"]
        self.rng.setstate((version, tuple(internal), gauss))
        self.order = list(state["order"])


def _shards(items: list, n: int) -> list[list]:
    size = -(-len(items) // n)
    return [items[i * size:(i + 1) * size] for i in range(n) if items[i * size:(i + 1) * size]]


def _wait(refs: list) -> None:
    ray.wait(refs, num_returns=len(refs), fetch_local=False)


def reward_metrics(rewards: list[Rewards], prefix: str) -> dict[str, float]:
    out = {f"{prefix}/total": float(np.mean(np.concatenate([r.total for r in rewards])))}
    out[f"{prefix}/raw"] = float(np.mean(np.concatenate([r.raw_total for r in rewards])))
    for name in rewards[0].components:
        values = np.concatenate([r.components[name] for r in rewards])
        if np.isfinite(values).any():
            out[f"{prefix}/{name}"] = float(np.nanmean(values))
    return out


def learner_batch(learner: ActorGroup, rank: int, trajectories: list, rewards: list, ref_logprobs: list) -> ray.ObjectRef:
    """A rank's LearnerBatch, joined by a task in that rank's bundle: Ray resolves the parts there, so
    the trajectories never pass through the driver."""
    n = len(trajectories)
    join = ray.remote(_join_parts).options(num_cpus=0, scheduling_strategy=learner.scheduling(rank))
    return join.remote(n, *trajectories, *rewards, *ref_logprobs)


def _join_parts(n: int, *parts: Any) -> LearnerBatch:
    return LearnerBatch.join(list(parts[:n]), list(parts[n : 2 * n]), list(parts[2 * n :]))


def rl_step(cfg: RunConfig, roles: Roles, prompts: list[Prompt]) -> dict[str, float]:
    """Generate, score, take reference log-probs, learn and sync weights; returns metrics."""
    n_shards = max(len(roles.rollout), len(roles.learner))
    t0 = time.perf_counter()
    traj_refs = [
        roles.rollout[i % len(roles.rollout)].generate.remote(ray.put(shard))
        for i, shard in enumerate(_shards(prompts, n_shards))
    ]
    _wait(traj_refs)
    t1 = time.perf_counter()
    reward_refs = [roles.scorers[i % len(roles.scorers)].score.remote(t) for i, t in enumerate(traj_refs)]
    ref_refs = [roles.reference[0].logprobs.remote(t) for t in traj_refs] if roles.reference else [None] * n_shards
    _wait(reward_refs)
    t2 = time.perf_counter()
    if roles.reference:
        _wait(ref_refs)
    t3 = time.perf_counter()
    ranks = len(roles.learner)  # shard i goes to rank i % ranks
    batches = [
        learner_batch(roles.learner, rank, traj_refs[rank::ranks], reward_refs[rank::ranks], ref_refs[rank::ranks])
        for rank in range(ranks)
    ]
    try:
        learn_metrics = get_all([learner.learn.remote(batch) for learner, batch in zip(roles.learner, batches)])
        t4 = time.perf_counter()
        weights = [learner.get_weights.remote() for learner in roles.learner]  # a collective: rank 0 returns them
        version = int(learn_metrics[0]["version"])
        rollout_versions = ray.get([worker.load_weights.remote(version, weights[0]) for worker in roles.rollout])
    except ray.exceptions.RayError as e:
        if is_learner_failure(e, roles.learner):
            raise LearnerFailure(str(e)) from e
        raise
    t5 = time.perf_counter()

    # every rank returns the same all-reduced metrics ("tokens" is already the total over ranks)
    metrics = {k: float(np.mean([m[k] for m in learn_metrics])) for k in learn_metrics[0]}
    metrics["rollout/version"] = float(min(rollout_versions))
    metrics.update(reward_metrics(ray.get(reward_refs), "reward"))
    metrics.update({
        "time/generate": t1 - t0, "time/score": t2 - t1, "time/reference": t3 - t1,
        "time/learn": t4 - t3, "time/sync": t5 - t4, "time/step": t5 - t0,
    })
    metrics["tokens_per_s"] = metrics["tokens"] / metrics["time/step"]
    return metrics


def save(roles: Roles, path: Path) -> None:
    """A Hugging Face directory of the policy (a collective: every rank joins, rank 0 writes)."""
    ray.get([learner.save.remote(str(path)) for learner in roles.learner])


def evaluate(cfg: RunConfig, roles: Roles, prompts: list[Prompt]) -> tuple[dict[str, float], list[dict]]:
    """Greedy answers on held-out prompts, scored without touching the normaliser statistics."""
    max_new = cfg.eval_max_new_tokens or cfg.rollout.max_new_tokens
    traj_refs = [
        roles.rollout[i].generate.remote(ray.put(shard), greedy=True, max_new_tokens=max_new)
        for i, shard in enumerate(_shards(prompts, len(roles.rollout)))
    ]
    reward_refs = [
        roles.scorers[i % len(roles.scorers)].score.remote(t, update_stats=False) for i, t in enumerate(traj_refs)
    ]
    rewards = ray.get(reward_refs)
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


def format_table(before: dict[str, float], after: dict[str, float]) -> str:
    rows = [f"{'held-out metric':<18}{'before':>10}{'after':>10}{'change':>10}"]
    for key in before:
        name = key.removeprefix("eval/")
        rows.append(f"{name:<18}{before[key]:>10.4f}{after[key]:>10.4f}{after[key] - before[key]:>+10.4f}")
    return "\n".join(rows)


def prepare(cfg: RunConfig) -> tuple[Path, list[Prompt], list[Prompt]]:
    """Everything that can fail on bad input, done before any cluster resource is claimed."""
    try:
        train_set, eval_set = load_task(
            cfg.data.train, cfg.data.eval, cfg.data.num_train, cfg.data.num_eval, cfg.seed
        )
        resolve_embedding_model(cfg.reward.embedding_model)
    except ValueError as e:
        raise ConfigError(str(e)) from e
    if len(train_set) < cfg.prompts_per_step:
        raise ConfigError(f"data.train has {len(train_set)} prompts, fewer than prompts_per_step={cfg.prompts_per_step}")
    try:
        model_dir = resolve_policy(cfg.policy.model, cfg.policy.cache_dir)
    except (ValueError, FileNotFoundError) as e:
        raise ConfigError(f"policy.model: {e}") from e
    if cfg.reward.rm_weight != 0:
        try:
            check_reward_model_dir(cfg.reward.rm_model or "")
        except ValueError as e:
            raise ConfigError(f"reward.rm_model: {e}") from e
    return model_dir, train_set, eval_set


def train(
    cfg: RunConfig, on_step: Callable[[int, dict[str, float]], None] | None = None, resume: str | Path = "auto",
) -> TrainResult:
    """Run the RL loop; `on_step(step, metrics)` (optional) sees each step's metrics, eval ones included,
    after that step's checkpoint (if any) is written. `resume`: "auto" (continue from the latest
    complete checkpoint in output_dir, if any), "never" (start over) or a checkpoint path."""
    model_dir, train_set, eval_set = prepare(cfg)
    output_dir = Path(cfg.output_dir).resolve()
    start = plan(cfg, output_dir, str(resume))
    if start.finished_step is not None:
        print(f"the run in {output_dir} already finished ({start.finished_step} steps); final policy: "
              f"{output_dir / 'final'} (--resume never starts it over)")
        return finished_result(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(), sort_keys=False))
    saved_state = checkpoint.read(start.checkpoint)[2] if start.checkpoint else None
    started_ray = not ray.is_initialized()
    init_ray(cfg.cluster.address, cfg.cluster.num_cpus, cfg.cluster.object_store_mb)
    roles = launch(cfg, model_dir)
    tracker = Tracker(
        output_dir, run_name=cfg.name, config=cfg.model_dump(), total_steps=cfg.steps,
        wandb_mode=cfg.logging.wandb, wandb_project=cfg.logging.wandb_project,
        tensorboard=cfg.logging.tensorboard, progress_bar=cfg.logging.progress_bar,
        resume=saved_state["tracker"] if saved_state else None,
    )
    run = RunState(cfg, output_dir, model_dir, roles, PromptSampler(train_set, cfg.seed), tracker)
    try:
        with StopSignal() as stop:
            if start.checkpoint:
                run.resume(start.checkpoint)
                tracker.write(f"resuming from {start.checkpoint} (step {run.step} of {cfg.steps})")
            else:
                run.before, _ = evaluate(cfg, roles, eval_set)
                tracker.log(0, run.before, advance=False)
                run.initial = run.driver_state()
            while run.step < cfg.steps:
                if stop.signum is not None:
                    path = checkpoint.at_step(output_dir, run.step) if run.saved_step == run.step else run.save()
                    tracker.write(f"stopped after step {run.step}; checkpoint: {path} (run the same command to resume)")
                    raise Interrupted(stop.signum, path)
                step = run.step + 1
                try:
                    metrics = rl_step(cfg, roles, run.sampler.draw(cfg.prompts_per_step))
                    if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps:
                        metrics.update(evaluate(cfg, roles, eval_set)[0])
                    metrics["restarts/learner"] = float(run.learner_restarts)
                    run.step = step
                    tracker.log(step, metrics)
                    run.history.append({"step": step, **metrics})
                    if cfg.checkpoint.every and step % cfg.checkpoint.every == 0:
                        run.save()
                except LearnerFailure as e:
                    run.recover_learner(e)
                    continue
                if on_step is not None:
                    on_step(step, metrics)
        after, examples = evaluate(cfg, roles, eval_set)
        tracker.log(cfg.steps, after, advance=False)
        final_dir = output_dir / "final"
        save(roles, final_dir)
        (output_dir / "eval.json").write_text(json.dumps({"before": run.before, "after": after}, indent=2))
        (output_dir / "examples.jsonl").write_text("".join(json.dumps(e) + "\n" for e in examples))
        checkpoint.mark_finished(output_dir, cfg.steps, cfg.model_dump())
        tracker.write("\n" + format_table(run.before, after) + f"\n\nfinal policy: {final_dir}")
    finally:
        tracker.close()
        roles.shutdown()
        if started_ray:
            shutdown_ray()
    return TrainResult(output_dir, final_dir, run.before, after, run.history)


def finished_result(output_dir: Path) -> TrainResult:
    """What a finished run left in output_dir, for a rerun of the same command."""
    evaluated = json.loads((output_dir / "eval.json").read_text())
    rows = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    history = [row for row in rows[1:-1]]  # step 0 is the eval before, the last line the eval after
    return TrainResult(output_dir, output_dir / "final", evaluated["before"], evaluated["after"], history)


if __name__ == "__main__":  # the same as `rayrlhf train ...`
    from rayrlhf.jobs.cli import main

    sys.exit(main(["train", *sys.argv[1:]]))
