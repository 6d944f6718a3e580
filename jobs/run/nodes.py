"""A node that dies under a run, taking its raylet, its object store and every replica on it.

Ray places a dead node's placement-group bundles again once a node with room joins (a replacement, or
room left on the others), and restarts there the replicas that may restart: the stateless roles, which
jobs/run/recovery.py then restores; the learner group is started anew from its latest checkpoint
(jobs/run/state.py). Both wait at most fault_tolerance.node_wait_s for that room, then end the run with
the error made here, naming each dead node and the replicas that lived on it.
"""

from __future__ import annotations

from collections.abc import Mapping

import ray

from rayrlhf.cluster.actor_group import ActorGroup

REPLICAS = {"rollout": "rollout worker", "reward": "reward scorer", "reference": "reference policy",
            "env": "environment worker", "learner": "learner rank"}  # fmt: skip
"""What one replica of each role is called in messages."""


class NodeLostError(RuntimeError):
    """A node died and no node with room for its replicas joined in time: the run cannot go on."""


def node_lost(groups: Mapping[str, ActorGroup], wait_s: float) -> NodeLostError:
    """The error naming each dead node that held replicas of `groups` (role name: group), and those replicas."""
    dead = {node["NodeID"]: node["NodeManagerAddress"] for node in ray.nodes() if not node["Alive"]}
    lost: dict[str, list[str]] = {}
    for name, group in groups.items():
        group.nodes()  # a bundle placed again since then is not lost
        for rank, home in enumerate(group.homes):
            if home in dead:
                lost.setdefault(home, []).append(f"{REPLICAS[name]} {rank}")
    where = "; ".join(f"node {node} ({dead[node]}) with {', '.join(who)} on it" for node, who in lost.items())
    return NodeLostError(
        f"{where or 'a node of the run'} died, and no node with room for what it held joined within "
        f"fault_tolerance.node_wait_s={wait_s:g}; the latest checkpoint resumes the run once the cluster has room"
    )
