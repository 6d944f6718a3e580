"""Replicas of one role, reserved together in a placement group.

A role is a plain class; it becomes a Ray actor here, at launch, so the class itself stays
importable and testable without Ray. Reserving every replica's resources in one placement
group means a group either starts whole or fails with a clear message, never half-placed.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Any

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

PLACEMENT_TIMEOUT_S = 120


class PlacementError(RuntimeError):
    """The cluster cannot hold the requested actors."""


def check_fits(demands: dict[str, float]) -> None:
    """Fail before reserving anything when the cluster lacks the resources the run needs."""
    available = ray.cluster_resources()
    short = {k: (v, available.get(k, 0.0)) for k, v in demands.items() if v > available.get(k, 0.0) + 1e-9}
    if short:
        detail = ", ".join(f"{k}: needs {need:g}, cluster has {have:g}" for k, (need, have) in short.items())
        raise PlacementError(f"the run's actors do not fit the cluster ({detail}); lower the num_cpus/num_gpus of the roles")


def _free_port() -> tuple[str, int]:
    ip = ray.util.get_node_ip_address()
    with socket.socket() as s:
        s.bind((ip, 0))
        return ip, s.getsockname()[1]


class ActorGroup:
    """Reserve `size` bundles at construction; `start` then places one actor per bundle."""

    def __init__(
        self, size: int, *, name: str, num_cpus: float, num_gpus: float = 0.0, strategy: str = "PACK"
    ) -> None:
        self.name = name
        self.size = size
        self.resources = {"CPU": num_cpus, **({"GPU": num_gpus} if num_gpus else {})}
        self.placement = placement_group([dict(self.resources) for _ in range(size)], strategy=strategy, name=name)
        ready, _ = ray.wait([self.placement.ready()], timeout=PLACEMENT_TIMEOUT_S)
        if not ready:
            remove_placement_group(self.placement)
            raise PlacementError(f"{name}: {size} x {self.resources} could not be placed within {PLACEMENT_TIMEOUT_S}s")
        self.actors: list[Any] = []

    def start(self, role: type, kwargs_for: Callable[[int], dict[str, Any]]) -> ActorGroup:
        remote_role = ray.remote(role)
        self.actors = [
            remote_role.options(
                num_cpus=self.resources["CPU"],
                num_gpus=self.resources.get("GPU", 0),
                scheduling_strategy=self._in_bundle(rank),
            ).remote(**kwargs_for(rank))
            for rank in range(self.size)
        ]
        return self

    def _in_bundle(self, rank: int) -> PlacementGroupSchedulingStrategy:
        return PlacementGroupSchedulingStrategy(
            placement_group=self.placement,
            placement_group_bundle_index=rank,
            placement_group_capture_child_tasks=True,
        )

    def rendezvous(self) -> tuple[str, int]:
        """Address and a free port on the node of bundle 0, for torch.distributed's rank 0."""
        probe = ray.remote(_free_port).options(num_cpus=0, scheduling_strategy=self._in_bundle(0))
        return ray.get(probe.remote())

    def call(self, method: str, *args: Any, **kwargs: Any) -> list[ray.ObjectRef]:
        return [getattr(actor, method).remote(*args, **kwargs) for actor in self.actors]

    def __len__(self) -> int:
        return len(self.actors)

    def __getitem__(self, rank: int) -> Any:
        return self.actors[rank]

    def shutdown(self) -> None:
        for actor in self.actors:
            ray.kill(actor)
        remove_placement_group(self.placement)
