"""In-job recovery of the stateless roles: rollout workers, reward scorers and the reference policy.

Ray restarts a replica whose process died (its constructor reruns: initial weights, a fresh sampling
counter, empty normaliser statistics). This module puts it back where the run is and redoes the work
that was lost. The driver keeps what those roles hold between phases, all of it small or already in
the object store: the policy version and the ref of its weights, each rollout worker's sampling
counter, each scorer's normaliser statistics (read after every phase).

Each phase of a step (rollout with scoring and reference log-probs; the weight sync; an evaluation)
runs under `Recovery.run`. If a replica died during it, or answers from a new process afterwards (a
restart between two calls raises nothing: the next call just runs on the fresh process), every
replica is put back to the state before the phase and the phase runs again from its start. Rollout
samples are seeded by (seed, version, call count), so the redone phase produces exactly what the
lost one would have, and nothing reaches the learner before its phase has finished cleanly: no
sample is lost or trained twice. A restart is noticed by the replica's process id changing.

A replica whose whole node died is restarted by Ray once a node with room for it is there, awaited up to
fault_tolerance.node_wait_s (jobs/run/nodes.py). An input of the phase lost with that node's object store
is made again with the phase. The learner is not handled here (its state is a checkpoint's business): the
published weights lost with learner rank 0's node raise a LearnerFailure, whose restart publishes them anew.
"""

from __future__ import annotations

import os
import sys
import time
from collections import Counter
from collections.abc import Callable
from typing import Any, TypeVar

import ray
from ray.exceptions import (
    ActorDiedError,
    ActorUnavailableError,
    GetTimeoutError,
    ObjectLostError,
    RayActorError,
    RayTaskError,
)

from rayrlhf.actors.reference_policy import ReferencePolicy
from rayrlhf.actors.reward_scorer import RewardScorer
from rayrlhf.actors.rl.trajectory import Rewards, Trajectory
from rayrlhf.actors.rollout_worker import RolloutWorker
from rayrlhf.actors.runtime.weight_sync import Weights
from rayrlhf.cluster.actor_group import Actor
from rayrlhf.jobs.config.run import FaultToleranceConfig
from rayrlhf.jobs.run.learner_failure import LearnerFailure
from rayrlhf.jobs.run.nodes import REPLICAS, node_lost
from rayrlhf.jobs.run.roles import Roles

T = TypeVar("T")
NAMES = {name: REPLICAS[name] for name in ("rollout", "reward", "reference", "env")}
"""The roles recovered here, in the order they are probed."""
STATEFUL = ("rollout", "reward")
"""Roles whose replicas hold state the driver restores (state_dict / load_state_dict)."""
REDO = (*STATEFUL, "env")
"""Roles whose restart during a phase means the phase is redone (environments lose their episodes)."""


class RecoveryError(RuntimeError):
    """A replica is gone for good, or did not come back in time: the run cannot go on."""


class ScoreError(RuntimeError):
    """Scoring failed or timed out on every attempt; the step is not trained."""


def _pid_and_state(
    replica: RolloutWorker | RewardScorer | ReferencePolicy, with_state: bool
) -> tuple[int, dict[str, Any] | None]:
    """Runs in the replica's process: its process id, and its state if asked (the STATEFUL roles)."""
    return os.getpid(), replica.state_dict() if with_state and not isinstance(replica, ReferencePolicy) else None


class Recovery:
    """The driver's copy of the stateless roles' state, and the means to restore it and redo a phase."""

    def __init__(self, roles: Roles, ft: FaultToleranceConfig, log: Callable[[str], None] | None = None) -> None:
        self.roles, self.ft = roles, ft
        self.log = log or (lambda line: print(line, file=sys.stderr, flush=True))
        self.replicas = self._replicas()
        self.restarts: Counter[str] = Counter()
        self.redone = 0
        self.score_retries = 0
        self.trained: list[list[int]] = []
        """The sample ids of every learner step, in order: what the learner has trained."""
        self.pids, self.states = self._probe()
        self.version = min(state["version"] for (name, _), state in self.states.items() if name == "rollout")
        self.weights: ray.ObjectRef[Weights] | None = None
        """The weights of `version` (None: the initial ones, which a restarted worker loads by itself)."""

    def run(self, phase: str, work: Callable[[], T]) -> T:
        """`work()`, redone from its start (after a restore) until no replica that holds state (or
        episodes) was replaced while it ran (the reference policy's answers are the same from any process)."""
        restore = False
        while True:
            try:
                if restore:
                    self._restore()
                result = work()
                pids, states = self._probe()
            except (RayActorError, ObjectLostError) as error:  # a replica died, or an input with its node
                if isinstance(error, ObjectLostError) and self.weights is not None \
                        and error.object_ref_hex == self.weights.hex():  # fmt: skip
                    raise LearnerFailure("the published weights were lost with learner rank 0's node") from error
                if not self._note_restarts(self._wait_alive(), phase):
                    raise  # an actor error without a death: nothing this can mend
            else:
                if not any(name in REDO for name, _ in self._note_restarts(pids, phase)):
                    self.states = states
                    return result
            restore = True
            self.redone += 1

    def sync(self, version: int, publish: Callable[[], ray.ObjectRef[Weights]]) -> list[int]:
        """Load the learner's new weights on every rollout worker; returns the versions they hold.
        The ref stays with the driver for workers that restart later: one copy of the policy in the
        object store, as the old one is released before `publish` makes the new one."""
        self.weights = None
        self.weights, self.version = publish(), version

        def load() -> list[int]:
            return ray.get([worker.load_weights.remote(version, self.weights) for worker in self.roles.rollout])

        return self.run("the weight sync", load)

    def score(
        self, traj_refs: list[ray.ObjectRef[Trajectory]], update_stats: bool = True
    ) -> tuple[list[ray.ObjectRef[Rewards]], list[Rewards]]:
        """Rewards of each trajectory batch (scorer i % n scores batch i), as refs and values.

        An attempt that fails or passes fault_tolerance.score_timeout_s is retried from the
        statistics before it (a timed-out scorer is restarted first); after score_retries retries
        the step fails. A failed score never becomes a reward. A scorer's death is run()'s to mend.
        """
        scorers = self.roles.scorers
        failure = ""
        for attempt in range(self.ft.score_retries + 1):
            if attempt:
                self._restore(only="reward")
            refs = [
                scorers[i % len(scorers)].score.remote(t, update_stats=update_stats) for i, t in enumerate(traj_refs)
            ]
            _, pending = ray.wait(refs, num_returns=len(refs), timeout=self.ft.score_timeout_s, fetch_local=False)
            if pending:
                failure = f"no answer within fault_tolerance.score_timeout_s={self.ft.score_timeout_s:g}"
                for rank in sorted({i % len(scorers) for i, ref in enumerate(refs) if ref in pending}):
                    ray.kill(scorers[rank], no_restart=False)
                if attempt < self.ft.score_retries:  # after the last attempt the step fails: no restart to await
                    self._note_restarts(self._wait_alive(only="reward"), "scoring")
            else:
                try:
                    return refs, ray.get(refs)
                except (RayActorError, ObjectLostError):  # a death (a batch lost with its node): run() redoes
                    raise
                except RayTaskError as error:
                    failure = f"{type(error.cause).__name__}: {error.cause}"
            self.score_retries += 1
            self.log(f"recovery: scoring attempt {attempt + 1} failed ({failure})")
        raise ScoreError(
            f"reward scoring failed {self.ft.score_retries + 1} times (fault_tolerance.score_retries="
            f"{self.ft.score_retries}), last: {failure}; the step is not trained"
        )

    def environment(self, refs: dict[int, ray.ObjectRef[T]], timeout_s: float) -> dict[int, T]:
        """The answers of environment workers (rank: ref). A worker past `timeout_s` is killed and
        restarted: its ref then raises RayActorError, and run() redoes the rollout, as for a dead one.
        An exception the environment raises fails the step (RayTaskError, with its traceback)."""
        _, pending = ray.wait(list(refs.values()), num_returns=len(refs), timeout=timeout_s, fetch_local=False)
        for rank, ref in refs.items():
            if ref in pending:
                self.log(f"recovery: environment worker {rank} gave no answer within env.timeout_s={timeout_s:g}; "
                         "restarting it")  # fmt: skip
                ray.kill(self.roles.groups["env"][rank], no_restart=False)
        return dict(zip(refs, ray.get(list(refs.values()))))

    def metrics(self) -> dict[str, float]:
        """Counts since the run began: restarts per role, phases redone, scoring retries."""
        names = dict.fromkeys(name for name, _, _ in self.replicas)
        out = {f"faults/restarts/{name}": float(self.restarts[name]) for name in names}
        out["faults/redone"] = float(self.redone)
        out["faults/score_retries"] = float(self.score_retries)
        return out

    def rebind(self) -> None:
        """Follow the driver's own restart of a role's group (new actors, not a fault to redo work for).
        Only the new actors are asked: another replica may be restarting meanwhile (its node died too)."""
        before = {(name, rank): actor for name, rank, actor in self.replicas}
        self.replicas = self._replicas()
        pids, states = self._probe([r for r in self.replicas if before.get((r[0], r[1])) is not r[2]])
        self.pids.update(pids)
        self.states.update(states)

    def restore(self, states: dict[tuple[str, int], dict[str, Any]]) -> None:
        """Put the replicas that hold state back to `states` (a checkpoint's), as a phase: one that dies
        meanwhile is mended. The weights come with the next sync (the ref held now may have died with
        the learner, whose restart brought the run here)."""
        self.states.update(states)
        self.weights = None
        self.run("the restore", self._restore)

    # --- replicas --------------------------------------------------------------------------

    def _replicas(self) -> list[tuple[str, int, Actor]]:
        groups = self.roles.groups
        return [(name, rank, actor) for name in NAMES if groups.get(name) for rank, actor in enumerate(groups[name])]

    def _selected(self, only: str | None) -> list[tuple[str, int, Actor]]:
        return [r for r in self.replicas if only is None or r[0] == only]

    def _probe(
        self, replicas: list[tuple[str, int, Actor]] | None = None
    ) -> tuple[dict[tuple[str, int], int], dict[tuple[str, int], dict[str, Any]]]:
        """Every replica's (or these replicas') process id, and the state of those that hold one."""
        replicas = self.replicas if replicas is None else replicas
        answers = ray.get([actor.__ray_call__.remote(_pid_and_state, name in STATEFUL) for name, _, actor in replicas])
        keys = [(name, rank) for name, rank, _ in replicas]
        return dict(zip(keys, (pid for pid, _ in answers))), {k: s for k, (_, s) in zip(keys, answers) if s is not None}

    def _wait_alive(self, only: str | None = None) -> dict[tuple[str, int], int]:
        """Process ids once every (selected) replica answers again. Ray restarts a dead replica in its
        bundle: at once, or, when its node died, once a node with room for the bundle joins, which is
        awaited up to fault_tolerance.node_wait_s; restart_timeout_s bounds the rest (its reload)."""
        ft = self.ft
        deadline, unplaced_since = time.monotonic() + ft.restart_timeout_s, None
        pids = {}
        for name, rank, actor in self._selected(only):
            call = None
            while (name, rank) not in pids:
                if call is None:
                    call = actor.__ray_call__.remote(_pid_and_state, False)
                try:
                    pids[name, rank] = ray.get(call, timeout=1.0)[0]
                    continue
                except ActorDiedError as error:
                    raise RecoveryError(
                        f"{NAMES[name]} {rank} died and was not restarted (fault_tolerance.max_actor_restarts="
                        f"{ft.max_actor_restarts} used up, or its constructor failed)"
                    ) from error
                except ActorUnavailableError:  # its death not yet known to Ray, or restarting: ask again
                    call = None
                    time.sleep(0.1)
                except GetTimeoutError:  # busy, or not placed yet
                    pass
                now = time.monotonic()
                if self.roles.groups[name].nodes()[rank] is None:  # its node died, and no other has room yet
                    unplaced_since = now if unplaced_since is None else unplaced_since
                    if now - unplaced_since >= ft.node_wait_s:
                        raise node_lost(self.roles.groups, ft.node_wait_s)
                    deadline = now + ft.restart_timeout_s  # its reload counts from its placement
                elif now >= deadline:
                    raise RecoveryError(f"{NAMES[name]} {rank} did not answer within "
                                        f"fault_tolerance.restart_timeout_s={ft.restart_timeout_s:g}")  # fmt: skip
        return pids

    def _note_restarts(self, pids: dict[tuple[str, int], int], phase: str) -> list[tuple[str, int]]:
        """Count and log (one line each) the replicas whose process changed."""
        restarted = [key for key, pid in pids.items() if pid != self.pids[key]]
        for name, rank in restarted:
            self.restarts[name] += 1
            self.log(
                f"recovery: {NAMES[name]} {rank} restarted (pid {self.pids[name, rank]} -> {pids[name, rank]}) "
                f"during {phase}, at policy version {self.version}"
            )
        self.pids.update(pids)
        return restarted

    def _restore(self, only: str | None = None) -> None:
        """Put every (selected) replica back to the state saved after the last finished phase."""
        calls = []
        for name, rank, actor in self._selected(only):
            if name == "rollout" and self.weights is not None:
                calls.append(actor.load_weights.remote(self.version, self.weights))
            if name in STATEFUL:
                calls.append(actor.load_state_dict.remote(self.states[name, rank]))
        ray.get(calls)
