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

import numpy as np
import ray
import yaml

from rayrlhf.actors.embeddings import resolve_embedding_model
from rayrlhf.actors.learner import Learner
from rayrlhf.actors.models import resolve_policy
from rayrlhf.actors.reference_policy import ReferencePolicy
from rayrlhf.actors.reward_functions import check_functions
from rayrlhf.actors.reward_model import check_reward_model_dir
from rayrlhf.actors.reward_scorer import RewardScorer
from rayrlhf.actors.rollout_worker import RolloutWorker
from rayrlhf.actors.trajectory import Prompt, Rewards
from rayrlhf.cluster.actor_group import ActorGroup, check_fits
from rayrlhf.cluster.local import init_ray, shutdown_ray
from rayrlhf.jobs.config.base import ConfigError
from rayrlhf.jobs.config.run import RunConfig
from rayrlhf.jobs.data.prompts import load_task
from rayrlhf.jobs.health import HealthMonitor, weighted_components
from rayrlhf.jobs.tracking import Tracker

LAUNCH_ONLY = {"num_workers", "num_scorers", "num_ranks", "num_cpus", "num_gpus"}


def _kwargs(section) -> dict:
    """A config section as actor kwargs, without the fields that only say where it runs."""
    return {k: v for k, v in section.model_dump().items() if k not in LAUNCH_ONLY}


def uses_reference(cfg: RunConfig) -> bool:
    return cfg.kl.coef > 0 or cfg.kl.adaptive


@dataclass
class Roles:
    rollout: ActorGroup
    scorers: ActorGroup
    learner: ActorGroup
    reference: ActorGroup | None

    def shutdown(self) -> None:
        for group in (self.rollout, self.scorers, self.learner, self.reference):
            if group is not None:
                group.shutdown()


@dataclass
class TrainResult:
    output_dir: Path
    final_dir: Path
    before: dict[str, float]
    after: dict[str, float]
    history: list[dict[str, float]] = field(default_factory=list)


def resource_demands(cfg: RunConfig) -> dict[str, float]:
    cpus = (
        cfg.rollout.num_workers * cfg.rollout.num_cpus
        + cfg.reward.num_scorers * cfg.reward.num_cpus
        + cfg.learner.num_ranks * cfg.learner.num_cpus
        + (cfg.kl.num_cpus if uses_reference(cfg) else 0.0)
    )
    gpus = cfg.rollout.num_workers * cfg.rollout.num_gpus + cfg.learner.num_ranks * cfg.learner.num_gpus
    return {"CPU": cpus, **({"GPU": gpus} if gpus else {})}


class RoleKwargs:
    """Constructor arguments of each role, shared by the Ray launch and in-process benchmarks."""

    def __init__(self, cfg: RunConfig, model_dir: Path) -> None:
        self.cfg = cfg
        self.model_dir = str(model_dir)

    def rollout(self, rank: int) -> dict:
        cfg = self.cfg
        return dict(
            model_dir=self.model_dir, dtype=cfg.policy.dtype, max_prompt_tokens=cfg.policy.max_prompt_tokens,
            use_chat_template=cfg.data.use_chat_template, system_prompt=cfg.data.system_prompt,
            seed=cfg.seed + 1000 * rank, **_kwargs(cfg.rollout),
        )

    def scorer(self, rank: int) -> dict:
        return _kwargs(self.cfg.reward)

    def reference(self, rank: int) -> dict:
        cfg = self.cfg
        return dict(
            model_dir=self.model_dir, dtype=cfg.policy.dtype, temperature=cfg.rollout.temperature,
            torch_threads=cfg.kl.torch_threads,
        )

    def learner(self, rank: int, master_addr: str, master_port: int) -> dict:
        cfg = self.cfg
        return dict(
            rank=rank, world_size=cfg.learner.num_ranks, master_addr=master_addr, master_port=master_port,
            model_dir=self.model_dir, seed=cfg.seed, temperature=cfg.rollout.temperature,
            rows_per_step=cfg.prompts_per_step * cfg.rollout.samples_per_prompt // cfg.learner.num_ranks,
            algorithm=cfg.algorithm.model_dump(), kl=cfg.kl.model_dump(), learner=cfg.learner.model_dump(),
        )


def launch_roles(cfg: RunConfig, model_dir: Path) -> Roles:
    check_fits(resource_demands(cfg))
    kwargs = RoleKwargs(cfg, model_dir)
    strategy = cfg.cluster.placement_strategy
    rollout = ActorGroup(
        cfg.rollout.num_workers, name="rollout", num_cpus=cfg.rollout.num_cpus, num_gpus=cfg.rollout.num_gpus,
        strategy=strategy,
    ).start(RolloutWorker, kwargs.rollout)
    scorers = ActorGroup(
        cfg.reward.num_scorers, name="reward", num_cpus=cfg.reward.num_cpus, strategy=strategy
    ).start(RewardScorer, kwargs.scorer)
    reference = None
    if uses_reference(cfg):
        reference = ActorGroup(1, name="reference", num_cpus=cfg.kl.num_cpus, strategy=strategy).start(
            ReferencePolicy, kwargs.reference
        )
    learner = ActorGroup(
        cfg.learner.num_ranks, name="learner", num_cpus=cfg.learner.num_cpus, num_gpus=cfg.learner.num_gpus,
        strategy=strategy,
    )
    master_addr, master_port = learner.rendezvous()
    learner.start(Learner, lambda rank: kwargs.learner(rank, master_addr, master_port))
    return Roles(rollout=rollout, scorers=scorers, learner=learner, reference=reference)


class PromptSampler:
    """Epochs over the training prompts in a seeded order; position = prompts drawn so far."""

    def __init__(self, prompts: list[Prompt], seed: int) -> None:
        self.prompts = prompts
        self.rng = random.Random(seed)
        self.order: list[int] = []
        self.position = 0

    def draw(self, n: int) -> list[Prompt]:
        batch = []
        for _ in range(n):
            if not self.order:
                self.order = list(range(len(self.prompts)))
                self.rng.shuffle(self.order)
            batch.append(self.prompts[self.order.pop()])
            self.position += 1
        return batch


def _shards(items: list, n: int) -> list[list]:
    size = -(-len(items) // n)
    return [items[i * size:(i + 1) * size] for i in range(n) if items[i * size:(i + 1) * size]]


def _wait(refs: list) -> None:
    ray.wait(refs, num_returns=len(refs), fetch_local=False)


def reward_metrics(rewards: list[Rewards], prefix: str) -> dict[str, float]:
    out = {f"{prefix}/total": float(np.mean(np.concatenate([r.total for r in rewards])))}
    out[f"{prefix}/raw"] = float(np.mean(np.concatenate([r.raw_total for r in rewards])))
    for name in (*rewards[0].components, *rewards[0].info):  # info: truncated_frac, length_penalty, length_ratio
        values = np.concatenate([r.components.get(name, r.info.get(name)) for r in rewards])
        if np.isfinite(values).any():
            out[f"{prefix}/{name}"] = float(np.nanmean(values))
    return out


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
    parts: list[list] = [[] for _ in range(len(roles.learner))]
    for i, triple in enumerate(zip(traj_refs, reward_refs, ref_refs)):
        parts[i % len(roles.learner)].extend(triple)
    learn_metrics = ray.get([roles.learner[r].learn.remote(*parts[r]) for r in range(len(roles.learner))])
    t4 = time.perf_counter()
    weights = roles.learner.call("get_weights")
    version = int(learn_metrics[0]["version"])
    rollout_versions = ray.get(roles.rollout.call("load_weights", version, weights[0]))
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


def evaluate(cfg: RunConfig, roles: Roles, prompts: list[Prompt]) -> tuple[dict[str, float], list[dict]]:
    """Greedy (or beam-search) answers on held-out prompts, scored without touching the normaliser statistics."""
    max_new = cfg.eval_max_new_tokens or cfg.rollout.max_new_tokens
    traj_refs = [
        roles.rollout[i].generate.remote(
            ray.put(shard), greedy=True, max_new_tokens=max_new, num_beams=cfg.eval.num_beams
        )
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
        check_functions(cfg.reward.model_dump()["functions"], {k for p in train_set + eval_set for k in p.extra})
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


def train(cfg: RunConfig, on_step: Callable[[int, dict[str, float]], None] | None = None) -> TrainResult:
    """Run the RL loop; `on_step(step, metrics)` (optional) sees each step's metrics, eval ones included."""
    model_dir, train_set, eval_set = prepare(cfg)
    output_dir = Path(cfg.output_dir).resolve()
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(), sort_keys=False))
    started_ray = not ray.is_initialized()
    init_ray(cfg.cluster.address, cfg.cluster.num_cpus, cfg.cluster.object_store_mb)
    roles = launch_roles(cfg, model_dir)
    tracker = Tracker(
        output_dir, run_name=cfg.name, config=cfg.model_dump(), total_steps=cfg.steps,
        wandb_mode=cfg.logging.wandb, wandb_project=cfg.logging.wandb_project,
        tensorboard=cfg.logging.tensorboard, progress_bar=cfg.logging.progress_bar,
    )
    monitor = HealthMonitor(cfg.monitor.model_dump(), weighted_components(cfg.reward), tracker.write)
    try:
        before, _ = evaluate(cfg, roles, eval_set)
        monitor.observe(0, dict(before))  # a copy: no health flags in the before/after table
        tracker.log(0, before, advance=False)
        sampler = PromptSampler(train_set, cfg.seed)
        history = []
        for step in range(1, cfg.steps + 1):
            metrics = rl_step(cfg, roles, sampler.draw(cfg.prompts_per_step))
            if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps:
                metrics.update(evaluate(cfg, roles, eval_set)[0])
            stop = monitor.observe(step, metrics)  # adds health/* flags; True: a monitor.stop_on check failed
            if cfg.save_every and step % cfg.save_every == 0:
                ray.get(roles.learner.call("save", str(output_dir / f"step_{step}")))
            tracker.log(step, metrics)
            history.append({"step": step, **metrics})
            if on_step is not None:
                on_step(step, metrics)
            if stop:
                break
        after, examples = evaluate(cfg, roles, eval_set)
        monitor.observe(len(history), dict(after))
        tracker.log(len(history), after, advance=False)  # the steps run: fewer if the monitor stopped
        final_dir = output_dir / "final"
        ray.get(roles.learner.call("save", str(final_dir)))
        (output_dir / "eval.json").write_text(json.dumps({"before": before, "after": after}, indent=2))
        (output_dir / "examples.jsonl").write_text("".join(json.dumps(e) + "\n" for e in examples))
        tracker.write("\n" + format_table(before, after) + f"\n\nfinal policy: {final_dir}")
        if cfg.monitor.plot:
            monitor.plot(output_dir / "training.png")
    finally:
        tracker.close()
        roles.shutdown()
        if started_ray:
            shutdown_ray()
    return TrainResult(output_dir, final_dir, before, after, history)


if __name__ == "__main__":  # the same as `rayrlhf train ...`
    from rayrlhf.jobs.cli import main

    sys.exit(main(["train", *sys.argv[1:]]))
