"""Where the roles land on a multi-node cluster, simulated on one machine (ray.cluster_utils.Cluster).

cluster.placement_strategy reaches every role's placement group: SPREAD puts a group's replicas
on different nodes, PACK keeps them on one. The head only runs the driver (0 CPUs), as on a real
cluster, so every role must land on one of the two worker nodes.
"""

import os
import shutil
import tempfile
import time

import numpy as np
import pytest
import ray
from ray.cluster_utils import Cluster
from ray.util.placement_group import placement_group_table

from rayrlhf.jobs.config.run import load_config
from rayrlhf.jobs.data.prompts import load_task
from rayrlhf.jobs.run.roles import Roles, launch
from rayrlhf.jobs.run.pipeline import rl_step

LOOPBACK = dict(node_ip_address="127.0.0.1", object_store_memory=192 << 20)


@pytest.fixture(scope="module")
def worker_nodes():
    assert not ray.is_initialized()
    # A private temp root: the session files and the `ray_current_cluster` address file that
    # Cluster writes (and deletes) stay away from any other Ray on this machine.
    temp_root = tempfile.mkdtemp(prefix="rrplace", dir="/tmp")
    saved, os.environ["RAY_TMPDIR"] = os.environ.get("RAY_TMPDIR"), temp_root
    cluster = Cluster(initialize_head=True, head_node_args=dict(num_cpus=0, include_dashboard=False, **LOOPBACK))
    try:
        workers = [cluster.add_node(num_cpus=2, **LOOPBACK) for _ in range(2)]
        cluster.wait_for_nodes()
        cluster.connect()
        yield {node.node_id for node in workers}
    finally:
        ray.shutdown()
        cluster.shutdown()
        if saved is None:
            os.environ.pop("RAY_TMPDIR")
        else:
            os.environ["RAY_TMPDIR"] = saved
        shutil.rmtree(temp_root, ignore_errors=True)


def tiny(tmp_path, strategy: str, *overrides: str):
    return load_config("tiny", [
        f"output_dir={tmp_path}", "rollout.num_workers=2", "learner.num_ranks=2",
        f"cluster.placement_strategy={strategy}", *overrides,
    ])


def wait_until_idle(timeout: float = 60) -> None:
    """Killed actors and removed placement groups free their CPUs asynchronously; PACK needs them back."""
    deadline = time.monotonic() + timeout
    while ray.available_resources().get("CPU", 0) < ray.cluster_resources()["CPU"]:
        assert time.monotonic() < deadline, f"CPUs still held: {ray.available_resources()}"
        time.sleep(0.2)


def node_of(actor) -> str:
    """The node an actor process actually runs on, asked of the actor itself."""
    return ray.get(actor.__ray_call__.remote(lambda self: ray.get_runtime_context().get_node_id()))


def groups(roles: Roles) -> dict:
    named = {"rollout": roles.rollout, "reward": roles.scorers, "learner": roles.learner, "reference": roles.reference}
    return {name: group for name, group in named.items() if group is not None}


def placement(roles: Roles) -> dict[str, list[str]]:
    return {name: [node_of(actor) for actor in group.actors] for name, group in groups(roles).items()}


def strategies(roles: Roles) -> set[str]:
    return {placement_group_table(group.placement)["strategy"] for group in groups(roles).values()}


def test_spread_puts_replicas_on_different_nodes_and_the_ranks_still_train(worker_nodes, tmp_path):
    wait_until_idle()
    cfg = tiny(tmp_path, "SPREAD", "kl.coef=0")  # no reference actor: one process fewer to start
    roles = launch(cfg)
    try:
        nodes = placement(roles)
        assert strategies(roles) == {"SPREAD"} and set(nodes) == {"rollout", "reward", "learner"}
        assert len(set(nodes["learner"])) == 2 and len(set(nodes["rollout"])) == 2
        assert {n for group in nodes.values() for n in group} <= worker_nodes  # nothing on the 0-CPU head

        # The two learner ranks, on different nodes, rendezvous over torch.distributed and step together;
        # the new weights travel to both rollout workers through the object store.
        train_set, _ = load_task(cfg.data.train, cfg.data.eval, cfg.data.num_train, cfg.data.num_eval, cfg.seed)
        metrics = rl_step(cfg, roles, train_set[: cfg.prompts_per_step])
        assert np.isfinite(metrics["loss"])
        assert metrics["rollout/version"] == 1.0  # the minimum over both workers, on both nodes
    finally:
        roles.shutdown()


def test_pack_keeps_each_groups_replicas_on_one_node(worker_nodes, tmp_path):
    wait_until_idle()
    roles = launch(tiny(tmp_path, "PACK", "kl.coef=0"))
    try:
        nodes = placement(roles)
        assert strategies(roles) == {"PACK"} and set(nodes) == {"rollout", "reward", "learner"}
        assert len(set(nodes["learner"])) == 1 and len(set(nodes["rollout"])) == 1
        assert {n for group in nodes.values() for n in group} <= worker_nodes
    finally:
        roles.shutdown()
