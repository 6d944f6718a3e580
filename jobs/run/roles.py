"""The roles of an RL run, declared once: class, count, resources and constructor settings.

The launch (`launch`), the resource check before it (`resource_demands`) and Ray Tune's placement
bundles (`bundles`) are all read off this one table, so adding a role or a resource cannot make
them disagree. Actors receive typed settings: keyword arguments that the schema has already checked
(rollout, reward, reference) or the config sections themselves (learner), never dicts to re-check.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import ray

from rayrlhf.actors.runtime.devices import role_device
from rayrlhf.actors.environment_worker import EnvironmentWorker
from rayrlhf.actors.learner import Learner
from rayrlhf.actors.reference_policy import ReferencePolicy
from rayrlhf.actors.reward_scorer import RewardScorer
from rayrlhf.actors.rollout_worker import RolloutWorker
from rayrlhf.cluster.actor_group import PLACEMENT_TIMEOUT_S, ActorGroup, check_fits
from rayrlhf.jobs.config.run import RewardConfig, RolloutConfig, RunConfig
from rayrlhf.jobs.run.episodes import Episodes

LAUNCH_FIELDS = {"num_workers", "num_scorers", "num_ranks", "num_cpus", "num_gpus"}
"""Fields of a config section that say where a role runs, not how: the launch reads them, the actor does not."""


def actor_settings(section: RolloutConfig | RewardConfig) -> dict[str, Any]:
    """A section's constructor settings, plus the device its reservation gives it (cuda iff num_gpus > 0)."""
    return dict(section.model_dump(exclude=LAUNCH_FIELDS), device=role_device(section.num_gpus))


Replica = RolloutWorker | RewardScorer | ReferencePolicy | Learner | EnvironmentWorker
"""An instance of a role's class (in an actor, or plain in this process)."""


@dataclass(frozen=True)
class Role:
    name: str
    cls: type[Replica]
    count: int
    num_cpus: float
    num_gpus: float
    settings: Callable[[int], dict[str, Any]]
    """Constructor keyword arguments of replica `rank`."""
    rendezvous: bool = False
    """Replicas meet through torch.distributed: they also get master_addr/master_port of replica 0."""
    max_restarts: int = 0
    """Process deaths Ray restarts a replica after (jobs/run/recovery.py then restores its state)."""

    def instantiate(self, rank: int = 0, **extra: Any) -> Replica:
        """Replica `rank` as a plain object in this process (benchmarks, offline scoring): no Ray."""
        return self.cls(**self.settings(rank), **extra)

    @property
    def resources(self) -> dict[str, float]:
        return {"CPU": self.num_cpus, **({"GPU": self.num_gpus} if self.num_gpus else {})}


def uses_reference(cfg: RunConfig) -> bool:
    return cfg.kl.coef > 0 or cfg.kl.adaptive


def role_table(cfg: RunConfig) -> list[Role]:
    """The roles this run needs, in launch order (Tune's bundles follow the same order).

    Actors get the policy's name, never a path: each resolves it on its own node (see actors/runtime/models.py).
    """
    rollout, reward, kl, learner = cfg.rollout, cfg.reward, cfg.kl, cfg.learner
    model = dict(model=cfg.policy.model, cache_dir=cfg.policy.cache_dir)
    restarts = cfg.fault_tolerance.max_actor_restarts  # the stateless roles: the driver restores their state
    roles = [
        Role("rollout", RolloutWorker, rollout.num_workers, rollout.num_cpus, rollout.num_gpus, lambda rank: dict(
            **model, dtype=cfg.policy.dtype, max_prompt_tokens=cfg.policy.max_prompt_tokens,
            use_chat_template=cfg.data.use_chat_template, system_prompt=cfg.data.system_prompt,
            seed=cfg.seed + 1000 * rank, **actor_settings(rollout),
        ), max_restarts=restarts),
        Role("reward", RewardScorer, reward.num_scorers, reward.num_cpus, reward.num_gpus,
             lambda rank: actor_settings(reward), max_restarts=restarts),
    ]
    if uses_reference(cfg):
        roles.append(Role("reference", ReferencePolicy, 1, kl.num_cpus, kl.num_gpus, lambda rank: dict(
            **model, dtype=cfg.policy.dtype, temperature=rollout.temperature, torch_threads=kl.torch_threads,
            device=role_device(kl.num_gpus), pack_tokens=learner.packed_row_tokens,
            share_prompts=learner.share_prompts, logits_chunk=learner.logits_chunk,
        ), max_restarts=restarts))
    if (env := cfg.env) is not None:
        roles.append(Role("env", EnvironmentWorker, env.num_workers, env.num_cpus, 0.0,
                          lambda rank: dict(path=env.path, options=env.options), max_restarts=restarts))  # fmt: skip
    algorithm = cfg.algorithm  # seq-mean-token-sum-norm's constant defaults to the longest answer
    if algorithm.loss_scale_tokens is None:
        algorithm = algorithm.model_copy(update={"loss_scale_tokens": rollout.max_new_tokens})
    roles.append(Role("learner", Learner, learner.num_ranks, learner.num_cpus, learner.num_gpus, lambda rank: dict(
        **model, rank=rank, world_size=learner.num_ranks, seed=cfg.seed, temperature=rollout.temperature,
        rows_per_step=cfg.prompts_per_step * rollout.samples_per_prompt // learner.num_ranks,
        algorithm=algorithm, kl=kl, learner=learner, device=role_device(learner.num_gpus),
        lora=cfg.policy.lora, pipeline=cfg.pipeline, off_policy_data=cfg.data.episodes is not None,
    ), rendezvous=True))
    return roles


def resource_demands(cfg: RunConfig) -> dict[str, float]:
    """What the run's actors reserve in all, for the check before anything is reserved."""
    return demands(role_table(cfg))


def demands(table: list[Role]) -> dict[str, float]:
    total: dict[str, float] = {}
    for role in table:
        for key, value in role.resources.items():
            total[key] = total.get(key, 0.0) + role.count * value
    return total


def bundles(cfg: RunConfig) -> list[dict[str, float]]:
    """One placement bundle per actor, in launch order."""
    return [dict(role.resources) for role in role_table(cfg) for _ in range(role.count)]


@dataclass
class Roles:
    """The launched actor groups of one run, by role name."""

    groups: dict[str, ActorGroup]
    broadcast_dtypes: dict[str, str] | None = None
    """Set when the weights travel by NCCL broadcast (GPU learner and rollout): the receivers' dtypes."""
    broadcast_backend: str = "nccl"
    """The broadcast group's backend (gloo runs the same code on CPUs, in tests)."""
    episodes: Episodes | None = None
    """The multi-turn rollout (jobs/run/episodes.py) when the run has an environment (env:)."""

    @property
    def rollout(self) -> ActorGroup:
        return self.groups["rollout"]

    @property
    def scorers(self) -> ActorGroup:
        return self.groups["reward"]

    @property
    def reference(self) -> ActorGroup | None:
        return self.groups.get("reference")

    @property
    def envs(self) -> ActorGroup:
        return self.groups["env"]

    @property
    def learner(self) -> ActorGroup:
        return self.groups["learner"]

    def __iter__(self) -> Iterator[ActorGroup]:
        return iter(self.groups.values())

    def shutdown(self) -> None:
        for group in self:
            group.shutdown()


def _start(cfg: RunConfig, role: Role, timeout_s: float = PLACEMENT_TIMEOUT_S) -> ActorGroup:
    """`timeout_s`: how long the group's placement waits for room."""
    group = ActorGroup(role.count, name=role.name, resources=role.resources, strategy=cfg.cluster.placement_strategy,
                       timeout_s=timeout_s)  # fmt: skip
    try:
        settings: Callable[[int], dict[str, Any]] = role.settings
        if role.rendezvous:
            master_addr, master_port = group.rendezvous()
            settings = lambda rank: dict(role.settings(rank), master_addr=master_addr, master_port=master_port)  # noqa: E731
        group.start(role.cls, settings, max_restarts=role.max_restarts)
    except BaseException:
        group.shutdown()
        raise
    return group


def launch(cfg: RunConfig, only: tuple[str, ...] | None = None) -> Roles:
    """Check that the run fits, start every role's replicas in its placement group, and wait until
    they are up: a replica that cannot start (a model missing on its node) fails the launch, by name.
    `only`: just these roles (`rayrlhf eval` needs no learner)."""
    table = [role for role in role_table(cfg) if only is None or role.name in only]
    check_fits(demands(table))
    groups: dict[str, ActorGroup] = {}
    try:
        for role in table:
            groups[role.name] = _start(cfg, role)
        for group in groups.values():
            group.wait_started()
        roles = Roles(groups, episodes=Episodes(cfg) if "env" in groups else None)
        if uses_broadcast(cfg):
            roles.broadcast_dtypes = connect_weight_broadcast(roles)
    except BaseException:
        Roles(groups).shutdown()
        raise
    return roles


def restart(roles: Roles, cfg: RunConfig, name: str) -> ActorGroup:
    """Stop every replica of one role (a dead one included) and start the group anew, in place; its
    placement waits up to fault_tolerance.node_wait_s for room (its node may have died)."""
    roles.groups[name].shutdown()
    role = next(r for r in role_table(cfg) if r.name == name)
    group = roles.groups[name] = _start(cfg, role, timeout_s=cfg.fault_tolerance.node_wait_s)
    group.wait_started()
    return group


def uses_broadcast(cfg: RunConfig) -> bool:
    """Weight sync by NCCL broadcast: only between whole GPUs. NCCL refuses two ranks on one device, and
    fractional reservations may share one, so they (and CPUs) use the object store."""
    return cfg.rollout.num_gpus >= 1 and cfg.learner.num_gpus >= 1


def connect_weight_broadcast(roles: Roles) -> dict[str, str]:
    """A NCCL group of learner rank 0 (rank 0) and every rollout worker, for weight sync between GPUs
    (actors/runtime/weight_sync.py); returns the dtypes the workers hold, which the broadcast sends."""
    master_addr, master_port = roles.learner.rendezvous()  # another free port on rank 0's node
    world_size, backend = 1 + len(roles.rollout), roles.broadcast_backend
    ray.get([
        roles.learner[0].join_weight_group.remote(master_addr, master_port, world_size, backend),
        *[worker.join_weight_group.remote(master_addr, master_port, 1 + i, world_size, backend)
          for i, worker in enumerate(roles.rollout)],
    ])  # fmt: skip
    return ray.get(roles.rollout[0].weight_dtypes.remote())


def restart_learner(roles: Roles, cfg: RunConfig) -> None:
    """Start the learner group anew (a rank died). On the broadcast path the weight group died with
    learner rank 0, and a rollout worker may be blocked for good in a broadcast it was receiving: the
    rollout workers restart too (they hold nothing the driver cannot give back: jobs/run/state.py
    restores them) and form a new group with the new rank 0."""
    restart(roles, cfg, "learner")
    if roles.broadcast_dtypes is not None:
        restart(roles, cfg, "rollout")
        roles.broadcast_dtypes = connect_weight_broadcast(roles)
