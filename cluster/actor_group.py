"""Replicas of one role, reserved together in a placement group.

A role is a plain class; it becomes a Ray actor here, at launch, so the class itself stays
importable and testable without Ray. Reserving every replica's resources in one placement
group means a group either starts whole or fails with a clear message, never half-placed.

Inside a placement group that someone else reserved for the whole run (a Ray Tune trial: bundle 0
holds the trial's driver, then one bundle per role actor, in launch order), a group takes the
next free bundles of that group instead of reserving its own, so trials never starve each other.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator
from typing import Any, TypeAlias, TypeVar

import ray
from ray.util.placement_group import (
    PlacementGroup,
    get_current_placement_group,
    placement_group,
    placement_group_table,
    remove_placement_group,
)
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from rayrlhf.cluster.errors import PlacementError, RoleStartError

PLACEMENT_TIMEOUT_S = 120
T = TypeVar("T")

Actor: TypeAlias = Any
"""A Ray actor handle. Its methods are looked up at run time, and Ray types that lookup as returning
`Never`, which would make mypy skip every line after a call: so the handle stays dynamic."""


def check_fits(demands: dict[str, float]) -> None:
    """Fail before reserving anything when the cluster (or the enclosing placement group) lacks room."""
    enclosing = get_current_placement_group()
    where, available = "cluster", ray.cluster_resources()
    if enclosing is not None:
        where, available = "placement group", {}
        for bundle in enclosing.bundle_specs[1:]:  # bundle 0 is the caller's own
            for key, value in bundle.items():
                available[key] = available.get(key, 0.0) + value
    short = {k: (v, available.get(k, 0.0)) for k, v in demands.items() if v > available.get(k, 0.0) + 1e-9}
    if short:
        detail = ", ".join(f"{k}: needs {need:g}, {where} has {have:g}" for k, (need, have) in short.items())
        raise PlacementError(f"the run's actors do not fit the cluster ({detail}); lower the num_cpus/num_gpus of the roles")


def _free_port() -> tuple[str, int]:
    ip = ray.util.get_node_ip_address()
    with socket.socket() as s:
        s.bind((ip, 0))
        return ip, s.getsockname()[1]


class ActorGroup:
    """Reserve `size` bundles at construction (waiting up to `timeout_s` for room); `start` then places
    one actor per bundle."""

    def __init__(
        self, size: int, *, name: str, resources: dict[str, float], strategy: str = "PACK",
        timeout_s: float = PLACEMENT_TIMEOUT_S,
    ) -> None:  # fmt: skip
        self.name = name
        self.size = size
        self.resources = dict(resources)
        self.actors: list[Actor] = []
        enclosing = get_current_placement_group()
        self.owns_placement = enclosing is None
        if enclosing is not None:
            self.placement = enclosing
            self.bundles = _take_bundles(enclosing, size, self.resources, name)
        else:
            self.bundles = list(range(size))
            self.placement = placement_group([dict(self.resources) for _ in range(size)], strategy=strategy, name=name)
            ready, _ = ray.wait([self.placement.ready()], timeout=timeout_s)
            if not ready:
                remove_placement_group(self.placement)
                raise PlacementError(f"{name}: {size} x {self.resources} could not be placed within {timeout_s:g}s")
        self.homes: list[str] = [""] * size
        """The node each replica's bundle was last seen on (a dead one, while Ray looks for room elsewhere)."""
        self.nodes()

    def nodes(self) -> list[str | None]:
        """The node each replica's bundle is on now (Ray node ids); None while it has none: its node died
        and no other has room yet (Ray places the bundle once one has, and restarts the replica there)."""
        placed = placement_group_table(self.placement).get("bundles_to_node_id", {})  # none once removed
        now = [placed.get(bundle) or None for bundle in self.bundles]
        self.homes = [node or home for node, home in zip(now, self.homes)]
        return now

    def start(self, role: type[T], kwargs_for: Callable[[int], dict[str, Any]], max_restarts: int = 0) -> ActorGroup:
        """`max_restarts`: process deaths Ray restarts a replica after (in its bundle, constructor rerun).
        Ray never retries a call on the new process (max_task_retries=0): the driver restores the
        replica's state first (jobs/run/recovery.py), or a restarted rollout worker would sample with
        the initial weights."""
        remote_role = ray.remote(role)
        self.actors = [
            remote_role.options(
                num_cpus=self.resources["CPU"],
                num_gpus=self.resources.get("GPU", 0),
                scheduling_strategy=self.scheduling(rank),
                max_restarts=max_restarts,
                max_task_retries=0,
            ).remote(**kwargs_for(rank))
            for rank in range(self.size)
        ]
        return self

    def wait_started(self) -> None:
        """Block until every replica is constructed; the first that failed raises, naming role, replica and cause."""
        for rank, ready in enumerate([actor.__ray_ready__.remote() for actor in self.actors]):
            try:
                ray.get(ready)
            except ray.exceptions.RayActorError as err:
                cause = str(err).strip().splitlines()[-1]  # "ExceptionType: message", the constructor's own
                raise RoleStartError(f"{self.name} replica {rank} could not start: {cause}") from None

    def scheduling(self, rank: int) -> PlacementGroupSchedulingStrategy:
        """Replica `rank`'s bundle: for its actor, and for tasks that should run beside it."""
        return PlacementGroupSchedulingStrategy(
            placement_group=self.placement,
            placement_group_bundle_index=self.bundles[rank],
            placement_group_capture_child_tasks=True,
        )

    def rendezvous(self) -> tuple[str, int]:
        """Address and a free port on the node of bundle 0, for torch.distributed's rank 0."""
        probe = ray.remote(_free_port).options(num_cpus=0, scheduling_strategy=self.scheduling(0))
        return ray.get(probe.remote())

    def __iter__(self) -> Iterator[Actor]:
        return iter(self.actors)

    def __len__(self) -> int:
        return len(self.actors)

    def __getitem__(self, rank: int) -> Actor:
        return self.actors[rank]

    def shutdown(self) -> None:
        for actor in self.actors:
            ray.kill(actor)
        if self.owns_placement:
            remove_placement_group(self.placement)
        else:
            _taken[self.placement.id.hex()].difference_update(self.bundles)


_taken: dict[str, set[int]] = {}
"""Bundles of an enclosing placement group already given to a group of this process."""


def _take_bundles(pg: PlacementGroup, size: int, resources: dict[str, float], name: str) -> list[int]:
    """`size` free bundles (after bundle 0, the caller's) that hold `resources`, exact matches first."""
    taken = _taken.setdefault(pg.id.hex(), set())
    specs = pg.bundle_specs
    fits = [
        i for i, bundle in enumerate(specs)
        if i > 0 and i not in taken and all(bundle.get(k, 0.0) >= v - 1e-9 for k, v in resources.items())
    ]
    fits.sort(key=lambda i: (specs[i] != resources, i))
    if len(fits) < size:
        raise PlacementError(
            f"{name}: the enclosing placement group has {len(fits)} free bundle(s) holding {resources}, "
            f"needs {size}; its bundles are {pg.bundle_specs}"
        )
    taken.update(fits[:size])
    return fits[:size]
