"""The driver's side of a run checkpoint: what is collected from the actors, and how it is put back.

`RunState` is the run between steps: the step, the prompt sampler, the held-out metrics before
training and the history, plus the actors that hold the rest (learner ranks: DeepSpeed state,
policy version, KL controller; rollout workers: version and sampling counter; reward scorers:
normaliser statistics; the tracker: metrics lines, TensorBoard step, wandb run id). `save` writes a
checkpoint through jobs/run/checkpoint.py, `restore` puts one back, in a fresh run or (after a learner
rank died) in a running one; `plan` decides at start-up whether and from where a run resumes.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray

from rayrlhf.cluster.errors import PlacementError
from rayrlhf.cluster.storage import Storage
from rayrlhf.jobs.run import checkpoint, pbt
from rayrlhf.jobs.config.base import ConfigError
from rayrlhf.jobs.config.run import RunConfig
from rayrlhf.jobs.data.sampler import PromptSampler
from rayrlhf.jobs.run.health import HealthMonitor
from rayrlhf.jobs.run.learner_failure import get_all, learner_get
from rayrlhf.jobs.run.nodes import node_lost
from rayrlhf.jobs.run.pipeline import Pipeline
from rayrlhf.jobs.run.recovery import Recovery
from rayrlhf.jobs.run.roles import Roles, restart_learner
from rayrlhf.jobs.run.tracking import Tracker


@dataclass
class Start:
    """Where a run starts: from a checkpoint, from scratch (None), or nowhere (it already finished)."""

    checkpoint: Path | None = None
    finished_step: int | None = None


def plan(
    cfg: RunConfig, output_dir: Path, resume: str, remote: Storage | None = None, retune: bool = False
) -> Start:
    """`resume`: "auto" (the latest complete checkpoint of output_dir, if any), "never" (start over,
    forgetting earlier checkpoints, in `remote` too: a URI output_dir's storage) or a checkpoint path.
    Refuses a config that changed in a field that would make the resume wrong, naming the fields;
    `retune` (a PBT trial taking over a checkpoint) lets the fields of jobs/run/pbt.py differ."""
    free = pbt.perturbable if retune else (lambda _: False)
    current = cfg.model_dump()
    if resume == "never":
        checkpoint.clear(output_dir, remote)
        return Start()
    if resume != "auto":
        try:
            path = checkpoint.resolve(resume)
        except FileNotFoundError as e:
            raise ConfigError(f"--resume: {e}") from None
    else:
        done = checkpoint.finished(output_dir)
        if done is not None and done["step"] >= cfg.steps and not checkpoint.changed_fields(
            done["config"], current, free=free
        ):
            return Start(finished_step=done["step"])
        latest = checkpoint.latest(output_dir)
        if latest is None:
            return Start()
        path = latest
    _, saved, _ = checkpoint.read(path)
    changed = checkpoint.changed_fields(saved, current, free=free)
    if changed:
        raise ConfigError(
            f"cannot resume from {path}: the config differs from the checkpoint's in {', '.join(changed)} "
            f"(restore them, or start over with --resume never or another output_dir)"
        )
    return Start(checkpoint=path)


@dataclass
class RunState:
    cfg: RunConfig
    output_dir: Path
    roles: Roles
    sampler: PromptSampler
    tracker: Tracker
    recovery: Recovery
    """The stateless roles' recovery (jobs/run/recovery.py): it keeps the weights' ref and the trained sample ids."""
    monitor: HealthMonitor
    pipeline: Pipeline
    """The batch it holds ahead of the learner is part of a checkpoint."""
    step: int = 0
    before: dict[str, float] = field(default_factory=dict)
    history: list[dict[str, float]] = field(default_factory=list)
    learner_restarts: int = 0
    """In this job (a resumed job starts again from 0)."""
    saved_step: int | None = None
    saved_at: float = field(default_factory=time.monotonic)
    """time.monotonic() of the last checkpoint written (or of the start): checkpoint.every_minutes counts from it."""
    save_seconds: float | None = None
    """How long the last checkpoint of this job took to write (jobs/run/stop.py plans with it)."""
    initial: dict[str, Any] | None = None
    """The driver state at step 0, for a learner restart before the first checkpoint."""
    resumed_from: Path | None = None
    """The checkpoint this job started from (in a Tune trial it lives in Tune's storage, not output_dir)."""
    first_step: int = 0
    """The step this job started after: recovery.trained[i] is step first_step + i + 1."""
    best: dict[str, float] | None = None
    """{"step", "value"} of the evaluation whose policy is in <output_dir>/best (eval.best_metric)."""
    remote: Storage | None = None
    """A URI output_dir's storage (output_dir is then the driver's local copy): the learner state of
    the run's checkpoints is there (jobs/run/checkpoint.py)."""

    def driver_state(self, live: bool = True) -> dict[str, Any]:
        """What a checkpoint holds besides the learner's state. `live=False`: the stateless roles' state
        as the recovery read it after their last phase, without calling them: between two steps that is
        the same, and a role that is stopped or restarting (recovery's to mend in the next phase) is not
        waited on."""
        roles, kept, sampler = self.roles, self.recovery.states, self.sampler.state_dict()
        owed = self.pipeline.owed
        if owed is not None and owed.states is not None and owed.sampler is not None:  # a pipelined batch
            live, kept, sampler = False, owed.states, owed.sampler  # whose collect failed: from before it
        if live:
            scorers = ray.get([scorer.state_dict.remote() for scorer in roles.scorers])
            rollout = ray.get([worker.state_dict.remote() for worker in roles.rollout])
        else:
            scorers = [kept["reward", rank] for rank in range(len(roles.scorers))]
            rollout = [kept["rollout", rank] for rank in range(len(roles.rollout))]
        return {
            "step": self.step,
            "before": self.before,
            "sampler": sampler,
            "scorers": scorers,
            "rollout": rollout,
            "tracker": self.tracker.state(),
            "monitor": self.monitor.state_dict(),
            "best": self.best,
        }

    def save(self, state: dict[str, Any] | None = None) -> Path:
        """A complete checkpoint of this step (a collective of the learner ranks); `state`: the driver
        state to store instead of the current one (taken before a step that then failed)."""
        start = time.monotonic()
        state = dict(state) if state is not None else self.driver_state()

        def write_learner(location: str) -> None:
            group = self.roles.learner
            learner = learner_get([rank.save_checkpoint.remote(Storage(location)) for rank in group], group)
            state["learner"] = learner[0]

        learner_cfg = self.cfg.learner
        path = checkpoint.write(
            self.output_dir, self.step, self.cfg.model_dump(), state, write_learner,
            {"learner_ranks": learner_cfg.num_ranks, "zero_stage": learner_cfg.zero_stage}, self.cfg.checkpoint.keep,
            self.remote, write_extra=self.pipeline.save_ahead,
        )
        self.saved_step, self.saved_at = self.step, time.monotonic()
        self.save_seconds = self.saved_at - start
        return path

    def save_after_error(self, before: dict[str, Any], error: BaseException) -> Path | None:
        """After `error` inside step self.step + 1: a checkpoint of the last finished step, with the
        driver state taken before the failed step, so that nothing done since the last checkpoint is
        lost (a pipelined run's failed collect of its batch ahead ends the step before, which owes
        that batch: jobs/run/pipeline.py). None where that state cannot be had: the learner already
        trained the failed step (its version is past the step)."""
        if self.saved_step == self.step:
            return checkpoint.at_step(self.output_dir, self.step)
        try:
            path = self.save(before)
            version = checkpoint.read(path)[2]["learner"]["version"]
        except Exception as failure:  # the error may have broken what a save needs: say so, keep the first error
            self.tracker.write(f"could not write a checkpoint after the error: {type(failure).__name__}: {failure}")
            return None
        if version != self.step:  # the learner had trained the failed step: not the state of step self.step
            checkpoint.remove(path)
            self.saved_step = None
            return None
        self.tracker.write(f"error in step {self.step + 1} ({type(error).__name__}): checkpoint of step "
                           f"{self.step} written to {path} (fix the cause and run the same command to resume)")
        return path

    def resume(self, path: Path) -> None:
        self.restore(path)
        self.resumed_from, self.first_step = path, self.step

    def restore(self, path: Path | None) -> None:
        """Put a checkpoint back (None: the state at step 0, with the fresh learner group as it is)."""
        if path is None:
            state = self.initial
            assert state is not None, "no step-0 state to restore"
        else:
            _, saved, state = checkpoint.read(path)
            source = Storage(checkpoint.learner_location(path, self.output_dir, self.remote))
            overrides = pbt.learner_overrides(saved, self.cfg.model_dump())  # a PBT trial's perturbed lr, KL coef
            get_all([rank.load_checkpoint.remote(source.only(checkpoint.RankFiles(i)), state["learner"], overrides)
                     for i, rank in enumerate(self.roles.learner)])  # from a bucket, each rank downloads its own files
        roles = self.roles
        self.recovery.restore({
            **{("reward", rank): s for rank, s in enumerate(state["scorers"])},
            **{("rollout", rank): s for rank, s in enumerate(state["rollout"])},
        })  # fmt: skip
        # the checkpoint's policy to every rollout worker, through the recovery (it keeps the ref for
        # workers that restart later): the learner's (get_weights is a collective: rank 0 returns them),
        # or those that are to sample a pipelined batch the checkpoint owes
        owed = self.pipeline.load_ahead(path)
        version = min(s["version"] for s in state["rollout"])
        learner_weights = lambda: [rank.get_weights.remote() for rank in roles.learner][0]  # noqa: E731
        self.recovery.sync(version, (lambda: owed) if owed is not None else learner_weights)
        self.sampler.load_state_dict(state["sampler"])
        self.step, self.before = state["step"], state["before"]
        self.monitor.load_state_dict(state["monitor"])
        self.best = state.get("best")  # absent in checkpoints written before eval.best_metric existed
        del self.recovery.trained[self.step - self.first_step:]  # the steps after the checkpoint are trained again
        self.tracker.rewind(state["tracker"])
        self.history = _history(self.output_dir / "metrics.jsonl", self.step)
        self.saved_step = self.step if path is not None else None

    def recover_learner(self, error: BaseException) -> None:
        """Restart the learner group from the latest checkpoint (or step 0), rewinding the driver to it."""
        limit = self.cfg.fault_tolerance.max_learner_restarts
        if self.learner_restarts >= limit:
            raise RuntimeError(f"a learner rank failed after {self.learner_restarts} restart(s) "
                               f"(fault_tolerance.max_learner_restarts={limit})") from error
        self.learner_restarts += 1
        path = checkpoint.latest(self.output_dir) or self.resumed_from
        self.tracker.write(
            f"learner failure at step {self.step + 1} ({type(error.__cause__ or error).__name__}): restart "
            f"{self.learner_restarts}/{limit}, from {path or 'the start (no checkpoint yet)'}"
        )
        groups = dict(self.roles.groups)  # where the replicas were, for the error if no node has room
        try:
            restart_learner(self.roles, self.cfg)  # on the NCCL broadcast path, the rollout workers too
        except PlacementError as failure:  # no room for the group now: a node died, and none joined in time
            raise node_lost(groups, self.cfg.fault_tolerance.node_wait_s) from failure
        self.recovery.rebind()
        self.restore(path)


def _history(metrics_path: Path, step: int) -> list[dict[str, float]]:
    """The per-step metrics of steps 1..step, read back from metrics.jsonl (step 0 is the eval before)."""
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines()] if metrics_path.exists() else []
    return [row for row in rows if 1 <= row["step"] <= step][:step]
