"""The roles of an RL run, declared once: class, count, resources and constructor settings.

The launch (`launch`), the resource check before it (`resource_demands`) and Ray Tune's placement
bundles (`bundles`) are all read off this one table, so adding a role or a resource cannot make
them disagree. Actors receive typed settings: keyword arguments that the schema has already checked
(rollout, reward, reference) or the config sections themselves (learner), never dicts to re-check.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rayrlhf.actors.learner import Learner
from rayrlhf.actors.reference_policy import ReferencePolicy
from rayrlhf.actors.reward_scorer import RewardScorer
from rayrlhf.actors.rollout_worker import RolloutWorker
from rayrlhf.cluster.actor_group import ActorGroup, check_fits
from rayrlhf.jobs.config.run import RunConfig

LAUNCH_FIELDS = {"num_workers", "num_scorers", "num_ranks", "num_cpus", "num_gpus"}
"""Fields of a config section that say where a role runs, not how: the launch reads them, the actor does not."""


def actor_settings(section: Any) -> dict[str, Any]:
    return section.model_dump(exclude=LAUNCH_FIELDS)


@dataclass(frozen=True)
class Role:
    name: str
    cls: type
    count: int
    num_cpus: float
    num_gpus: float
    settings: Callable[[int], dict[str, Any]]
    """Constructor keyword arguments of replica `rank`."""
    rendezvous: bool = False
    """Replicas meet through torch.distributed: they also get master_addr/master_port of replica 0."""

    def instantiate(self, rank: int = 0, **extra: Any) -> Any:
        """Replica `rank` as a plain object in this process (benchmarks, offline scoring): no Ray."""
        return self.cls(**self.settings(rank), **extra)

    @property
    def resources(self) -> dict[str, float]:
        return {"CPU": self.num_cpus, **({"GPU": self.num_gpus} if self.num_gpus else {})}


def uses_reference(cfg: RunConfig) -> bool:
    return cfg.kl.coef > 0 or cfg.kl.adaptive


def role_table(cfg: RunConfig, model_dir: Path | str | None = None) -> list[Role]:
    """The roles this run needs, in launch order (Tune's bundles follow the same order)."""
    model = str(model_dir)
    rollout, reward, kl, learner = cfg.rollout, cfg.reward, cfg.kl, cfg.learner
    roles = [
        Role("rollout", RolloutWorker, rollout.num_workers, rollout.num_cpus, rollout.num_gpus, lambda rank: dict(
            model_dir=model, dtype=cfg.policy.dtype, max_prompt_tokens=cfg.policy.max_prompt_tokens,
            use_chat_template=cfg.data.use_chat_template, system_prompt=cfg.data.system_prompt,
            seed=cfg.seed + 1000 * rank, **actor_settings(rollout),
        )),
        Role("reward", RewardScorer, reward.num_scorers, reward.num_cpus, 0.0, lambda rank: actor_settings(reward)),
    ]
    if uses_reference(cfg):
        roles.append(Role("reference", ReferencePolicy, 1, kl.num_cpus, 0.0, lambda rank: dict(
            model_dir=model, dtype=cfg.policy.dtype, temperature=rollout.temperature, torch_threads=kl.torch_threads,
        )))
    roles.append(Role("learner", Learner, learner.num_ranks, learner.num_cpus, learner.num_gpus, lambda rank: dict(
        rank=rank, world_size=learner.num_ranks, model_dir=model, seed=cfg.seed, temperature=rollout.temperature,
        rows_per_step=cfg.prompts_per_step * rollout.samples_per_prompt // learner.num_ranks,
        algorithm=cfg.algorithm, kl=kl, learner=learner, lora=cfg.policy.lora,
    ), rendezvous=True))
    return roles


def resource_demands(cfg: RunConfig) -> dict[str, float]:
    """What the run's actors reserve in all, for the check before anything is reserved."""
    total: dict[str, float] = {}
    for role in role_table(cfg):
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
    def learner(self) -> ActorGroup:
        return self.groups["learner"]

    def __iter__(self) -> Iterator[ActorGroup]:
        return iter(self.groups.values())

    def shutdown(self) -> None:
        for group in self:
            group.shutdown()


def launch(cfg: RunConfig, model_dir: Path | str) -> Roles:
    """Check that the run fits, then start every role's replicas in its placement group."""
    table = role_table(cfg, model_dir)
    check_fits(resource_demands(cfg))
    groups: dict[str, ActorGroup] = {}
    try:
        for role in table:
            group = ActorGroup(role.count, name=role.name, resources=role.resources,
                               strategy=cfg.cluster.placement_strategy)
            groups[role.name] = group
            settings = role.settings
            if role.rendezvous:
                master_addr, master_port = group.rendezvous()
                settings = lambda rank, s=role.settings: dict(s(rank), master_addr=master_addr, master_port=master_port)  # noqa: E731
            group.start(role.cls, settings)
    except BaseException:
        Roles(groups).shutdown()
        raise
    return Roles(groups)
