"""The RL step across the roles, synchronous or pipelined (`pipeline.max_staleness`).

Synchronous (max_staleness 0), one step: generate, score and take reference log-probs (`collect`),
learn, sync the weights, in turn. Pipelined (max_staleness k >= 1): the driver keeps one scored batch
ahead. A step hands the learner the batch collected during the previous step and, while the learner
trains it, collects the next one with the weights the rollout workers hold; then it syncs the new
weights. Generation, scoring and the reference overlap learning; a batch is trained one version after
the one that sampled it (the first batch: none), and the loss corrects for that (actors/rl/offpolicy.py).

Admission control, as AReaL and SkyRL do it: the driver starts a batch ahead only if it will be at
most k versions old when trained, else it syncs first and collects after the update. Running one
batch ahead and syncing after every update keeps every batch within 1, so the check never fails
here; it states the invariant the learner enforces (StaleTrajectoryError).

The batch ahead is part of the run's state: a checkpoint holds it whole (jobs/run/ahead.py: trajectories,
rewards, reference log-probs as arrays and JSON, a few hundred KB), beside the sampler, scorer
statistics and rollout counters that already account for it, so a resumed run trains it next: no
batch in flight is lost or trained twice. A learner restart rewinds it with the rest of the checkpoint.

When collecting the batch ahead fails (a reward failing every retry, a bad data row, recovery giving
up), the learner is already making the step's update: the step ends as usual and the batch is owed
(`Owed`). The error is raised when the next step begins, and a checkpoint then holds the state from
before the failed collect (sampler, rollout counters, scorer statistics) and the weights that were to
sample it (the rollout workers', one version behind the learner's). A resumed run collects the owed
batch first with those weights, then gives the rollout workers the learner's and goes on: it trains
what the run without the error would have.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import ray

from rayrlhf.actors.rl.offpolicy import admitted
from rayrlhf.actors.rl.shard import pack
from rayrlhf.actors.rl.trajectory import Prompt, Rewards
from rayrlhf.actors.runtime.weight_sync import Weights
from rayrlhf.jobs.config.run import RunConfig
from rayrlhf.jobs.data.episodes import Episode, step_episodes, trajectory
from rayrlhf.jobs.data.sampler import PromptSampler
from rayrlhf.jobs.run import ahead as ahead_file
from rayrlhf.jobs.run.dynamic_sampling import refill
from rayrlhf.jobs.run.recovery import Recovery
from rayrlhf.jobs.run.roles import Roles
from rayrlhf.jobs.run.learner_failure import get_all, learner_error

T = TypeVar("T")


def shards(items: list[T], n: int) -> list[list[T]]:
    size = -(-len(items) // n)
    return [items[i * size:(i + 1) * size] for i in range(n) if items[i * size:(i + 1) * size]]


def _wait(refs: list[ray.ObjectRef]) -> None:
    ray.wait(refs, num_returns=len(refs), fetch_local=False)


def reward_metrics(rewards: list[Rewards], prefix: str) -> dict[str, float]:
    out = {f"{prefix}/total": float(np.mean(np.concatenate([r.total for r in rewards])))}
    out[f"{prefix}/raw"] = float(np.mean(np.concatenate([r.raw_total for r in rewards])))
    for name in (*rewards[0].components, *rewards[0].info):  # info: truncated_frac, length_penalty, length_ratio
        values = np.concatenate([r.components.get(name, r.info.get(name)) for r in rewards])
        if np.isfinite(values).any():
            out[f"{prefix}/{name}"] = float(np.nanmean(values))
    return out


@dataclass
class Experience:
    """A step's scored samples: everything the learner needs, made by the stateless roles (and redone
    whole if one of them dies), as refs of finished objects; one entry per shard. Shard i goes to
    learner rank i % ranks (actors/rl/shard.py), which resolves the refs itself."""

    trajectories: list[ray.ObjectRef]
    reward_refs: list[ray.ObjectRef]
    rewards: list[Rewards]
    """The values of reward_refs (the driver logs them)."""
    ref_logprobs: list[ray.ObjectRef | None]
    """None without a reference policy."""
    times: dict[str, float]
    """The collect's timings (and algorithm.dynamic_sampling's counts), logged with the step that trains it."""


def collect(roles: Roles, prompts: list[Prompt], recovery: Recovery) -> Experience:
    """Generate, score and take reference log-probs; returns once every part exists."""
    n_shards = max(len(roles.rollout), len(roles.learner))
    t0 = time.perf_counter()
    parts = shards(prompts, n_shards)
    if roles.episodes is not None:  # multi-turn, with an environment (jobs/run/episodes.py)
        traj_refs = roles.episodes.play(roles.rollout, roles.envs, parts, recovery.version, recovery.environment)
    else:
        workers = roles.rollout
        traj_refs = [workers[i % len(workers)].generate.remote(ray.put(shard)) for i, shard in enumerate(parts)]
    _wait(traj_refs)
    t1 = time.perf_counter()
    ref_refs = [roles.reference[0].logprobs.remote(t) for t in traj_refs] if roles.reference else [None] * len(traj_refs)
    reward_refs, rewards = recovery.score(traj_refs)
    t2 = time.perf_counter()
    if roles.reference:
        _wait([ref for ref in ref_refs if ref is not None])
    t3 = time.perf_counter()
    times = {"time/generate": t1 - t0, "time/score": t2 - t1, "time/reference": t3 - t1}
    return Experience(traj_refs, reward_refs, rewards, ref_refs, times)


def episode_experience(cfg: RunConfig, roles: Roles, episodes: list[Episode], version: int) -> Experience:
    """A step's share of recorded episodes (data.episodes) as the learner's experience: their recorded
    rewards, and the reference's log-probs when the run has a KL term. Nothing is generated or scored."""
    t0 = time.perf_counter()
    k, ranks = cfg.rollout.samples_per_prompt, len(roles.learner)
    batch = step_episodes(episodes, version, cfg.prompts_per_step * k)
    size = len(batch) // ranks  # whole groups per rank: the learner's rows_per_step
    parts = [trajectory(batch[i * size:(i + 1) * size], k, version, (version * len(batch) + i * size) // k)
             for i in range(ranks)]  # fmt: skip
    traj_refs = [ray.put(traj) for traj, _ in parts]
    rewards = [reward for _, reward in parts]
    ref_refs = [roles.reference[0].logprobs.remote(t) for t in traj_refs] if roles.reference else [None] * ranks
    _wait([ref for ref in ref_refs if ref is not None])
    t1 = time.perf_counter()
    times = {"time/generate": 0.0, "time/score": 0.0, "time/reference": t1 - t0}
    return Experience(traj_refs, [ray.put(r) for r in rewards], rewards, ref_refs, times)


def rl_step(cfg: RunConfig, roles: Roles, prompts: list[Prompt], recovery: Recovery | None = None) -> dict[str, float]:
    """One synchronous step: generate, score, take reference log-probs, learn and sync weights; returns metrics.

    `recovery` (jobs/run/recovery.py) redoes the step's rollout if a stateless role dies during it; a
    run passes its own, one call alone (tests, benchmarks) may leave it to a fresh one.
    """
    recovery = recovery or Recovery(roles, cfg.fault_tolerance)
    t0 = time.perf_counter()
    experience = recovery.run("the rollout", lambda: collect(roles, prompts, recovery))
    return learn_and_sync(roles, experience, recovery, t0, lambda: None)[0]


def learn_and_sync(
    roles: Roles, experience: Experience, recovery: Recovery, t0: float, meanwhile: Callable[[], T]
) -> tuple[dict[str, float], T]:
    """Train `experience` on the learner ranks, run `meanwhile()` while they do, then sync the new
    weights to the rollout workers; returns the step's metrics (timed from `t0`) and meanwhile's result."""
    t3 = time.perf_counter()
    try:  # a learner rank's death becomes a LearnerFailure: the run restarts the group from its checkpoint
        parts = pack(experience.trajectories, experience.reward_refs, experience.ref_logprobs, len(roles.learner))
        learning = [learner.learn_parts.remote(*p) for learner, p in zip(roles.learner, parts)]
        result = meanwhile()
        results = get_all(learning)
        learn_metrics = [metrics for metrics, _ in results]
        sample_ids = [i for _, rank_ids in results for i in rank_ids]
        recovery.trained.append(sample_ids)
        t4 = time.perf_counter()
        rollout_versions = sync_weights(roles, int(learn_metrics[0]["version"]), recovery)
    except ray.exceptions.RayError as e:
        meaning = learner_error(e, roles.learner)
        if meaning is e:
            raise
        raise meaning from e
    t5 = time.perf_counter()

    # every rank returns the same all-reduced metrics ("tokens" is already the total over ranks)
    metrics = {k: float(np.mean([m[k] for m in learn_metrics])) for k in learn_metrics[0]}
    metrics["rollout/version"] = float(min(rollout_versions))
    metrics.update(reward_metrics(experience.rewards, "reward"))
    metrics.update(experience.times)  # the trained batch's (pipelined: collected during the step before)
    metrics.update({"time/learn": t4 - t3, "time/sync": t5 - t4, "time/step": t5 - t0})
    metrics["tokens_per_s"] = metrics["tokens"] / metrics["time/step"]
    metrics["samples/trained"] = float(len(sample_ids))
    metrics.update(recovery.metrics())
    return metrics, result


def sync_weights(roles: Roles, version: int, recovery: Recovery) -> list[int]:
    """Learner rank 0's weights to every rollout worker, in the policy's dtype; returns their versions.

    GPUs: a NCCL broadcast in buckets (roles.broadcast_dtypes is set at launch; a rollout worker that
    restarts cannot rejoin that group, so there a rollout death fails the step). Otherwise rank 0 puts
    the state dict once in the object store, and the recovery keeps its ref for workers that restart
    later. Both are collectives over the learner ranks (ZeRO-3 gathers the full weights on every rank)."""
    if roles.broadcast_dtypes is not None:
        sends = [learner.broadcast_weights.remote(roles.broadcast_dtypes) for learner in roles.learner]
        versions = [worker.receive_weights.remote(version) for worker in roles.rollout]
        ray.get(sends)
        return ray.get(versions)
    # get_weights is a collective: rank 0 returns the weights, the others None
    return recovery.sync(version, lambda: [learner.get_weights.remote() for learner in roles.learner][0])


@dataclass
class Owed:
    """A pipelined run's batch ahead whose collect failed (module docstring): what collecting it again needs."""

    weights: ray.ObjectRef[Weights]
    """The weights the rollout workers held to sample it."""
    error: Exception | None = None
    """Why the collect failed; None in a resumed run, which collects the batch first."""
    sampler: dict[str, Any] | None = None
    states: dict[tuple[str, int], dict[str, Any]] | None = None
    """The sampler's and the stateless roles' state (Recovery.states) before the failed collect, for
    a checkpoint written before the next step; None in a resumed run (its live state is that one)."""


class Pipeline:
    """The run's steps: synchronous ones (collect, learn, sync, as `rl_step`), or one scored batch ahead of
    the learner (module docstring)."""

    def __init__(self, cfg: RunConfig, roles: Roles, recovery: Recovery, sampler: PromptSampler,
                 episodes: list[Episode] | None = None) -> None:  # fmt: skip
        self.cfg, self.roles, self.recovery, self.sampler = cfg, roles, recovery, sampler
        self.episodes = episodes
        """Recorded episodes (data.episodes): trained instead of generated, the step's share chosen by
        the policy version, so a resumed run trains what the lost one would have."""
        self.max_staleness = cfg.pipeline.max_staleness
        self.ahead: Experience | None = None
        """The next step's batch, collected (pipelined runs, between steps)."""
        self.owed: Owed | None = None
        """The next step's batch, not collected: its collect failed, or the checkpoint resumed from owes it."""

    def _collect(self) -> Experience:
        if self.cfg.algorithm.dynamic_sampling.enabled:  # draws until the batch has groups that teach
            return refill(self._draw_and_collect, self.cfg, len(self.roles.learner), self.recovery.log)
        return self._draw_and_collect()

    def _draw_and_collect(self) -> Experience:
        prompts = self.sampler.draw(self.cfg.prompts_per_step)
        return self.recovery.run("the rollout", lambda: collect(self.roles, prompts, self.recovery))

    def _collect_ahead(self) -> Experience | None:
        """The next step's batch, while the learner makes this step's update. If that fails, the step
        still ends, and the batch is owed: None, and the error waits in self.owed."""
        weights, sampler, states = self.recovery.weights, self.sampler.state_dict(), dict(self.recovery.states)
        try:
            return self._collect()
        except Exception as error:
            if weights is None:  # the initial ones (on the NCCL path, all): ask a worker, before this
                weights = self.roles.rollout[0].get_weights.remote()  # step's sync replaces them (calls run in order)
            self.owed = Owed(weights, error, sampler, states)
            return None

    def _collect_owed(self, collecting: Callable[[], AbstractContextManager[None]]) -> None:
        """A step after a failed collect: that error. In a resumed run: collect the owed batch with the
        weights the rollout workers hold (those it was to be sampled with), then sync the learner's,
        one version newer."""
        assert self.owed is not None
        if self.owed.error is not None:
            raise self.owed.error
        with collecting():
            ahead = self._collect()
        sync_weights(self.roles, self.recovery.version + 1, self.recovery)
        self.ahead, self.owed = ahead, None

    def step(
        self, last: bool, collecting: Callable[[], AbstractContextManager[None]] = contextlib.nullcontext
    ) -> dict[str, float]:
        """One step; `last`: no step follows in this run (so nothing is collected ahead). `collecting()`
        is around each collect the learner waits for (jobs/run/stop.py may abandon the step there)."""
        if (episodes := self.episodes) is not None:
            t0 = time.perf_counter()
            version = self.recovery.version
            experience = self.recovery.run(
                "the episodes", lambda: episode_experience(self.cfg, self.roles, episodes, version)
            )
            return learn_and_sync(self.roles, experience, self.recovery, t0, lambda: None)[0]
        t0 = time.perf_counter()
        if self.max_staleness == 0:
            with collecting():
                experience = self._collect()
            return learn_and_sync(self.roles, experience, self.recovery, t0, lambda: None)[0]
        if self.owed is not None:
            self._collect_owed(collecting)
        if self.ahead is None:
            with collecting():
                self.ahead = self._collect()
        experience, self.ahead = self.ahead, None
        # the learner trains one batch per step and every step ends with a sync: it trains the next
        # batch at the version the rollout workers will hold after this step's sync
        overlap = not last and admitted(self.recovery.version + 1, self.recovery.version, self.max_staleness)
        metrics, ahead = learn_and_sync(
            self.roles, experience, self.recovery, t0, self._collect_ahead if overlap else lambda: None
        )
        if not last and not overlap:  # too stale if started now: after the update instead
            ahead = self._collect()
        self.ahead = ahead
        return metrics

    def save_ahead(self, folder: Path) -> None:
        """The batch ahead, whole, into a checkpoint folder being written; an owed one as its weights."""
        if self.ahead is not None:
            refs = self.ahead.ref_logprobs
            ref_logprobs = [ray.get(ref) if ref is not None else None for ref in refs]
            saved = ahead_file.Ahead(ray.get(self.ahead.trajectories), self.ahead.rewards, ref_logprobs, self.ahead.times)
            ahead_file.save(folder, saved)
        if self.owed is not None:
            ahead_file.save_weights(folder, ray.get(self.owed.weights))

    def load_ahead(self, folder: Path | None) -> ray.ObjectRef[Weights] | None:
        """The checkpoint's batch ahead, if it has one (None: a run's start). Returns the weights of an
        owed batch: the rollout workers must hold them, not the learner's."""
        saved = ahead_file.load(folder) if folder is not None else None
        self.ahead = None
        if saved is not None:
            refs = [ray.put(x) if x is not None else None for x in saved.ref_logprobs]
            self.ahead = Experience([ray.put(t) for t in saved.trajectories], [ray.put(r) for r in saved.rewards],
                                    saved.rewards, refs, saved.times)  # fmt: skip
        weights = ahead_file.load_weights(folder) if folder is not None else None
        self.owed = Owed(ray.put(weights)) if weights is not None else None
        return self.owed.weights if self.owed is not None else None
