"""A node killed whole mid-run: its raylet and every process under it (the actors' workers, Ray's agents)
get SIGKILL by PID at once, as when a spot instance is taken away.

The cluster is the test's own: a head with no CPUs (the driver's node) and worker nodes started by
ray.cluster_utils.Cluster on loopback. A network namespace would give each node its own address too, but
what the run must survive is the same (a raylet, its object store and its workers gone at once, noticed
by Ray's health checks), and Cluster starts nodes from this process, quicker than `ray start` in a
namespace, while the file has to stay short. The health checks are made faster than Ray's defaults so
that a death is noticed in seconds, and small results go to the object store of the node that made them
(as trajectory batches do at real sizes), so what a dead node held is really lost.

Node R (2 CPUs) holds the rollout worker (1.5) and the learner rank (0.5), node S (1 CPU) the reward
scorer (0.75); the sizes leave Ray one way to place them, launched in that order.
"""

import contextlib
import math
import time

import psutil
import pytest
import ray
from ray.cluster_utils import Cluster

from rayrlhf.cluster.faults import Fault, process_title
from rayrlhf.cluster.local import init_ray
from rayrlhf.jobs.config.run import load_config
from rayrlhf.jobs.run import checkpoint
from rayrlhf.jobs.run.nodes import NodeLostError
from rayrlhf.jobs.train import train
from tests.e2e.test_recovery import planned

LOOPBACK = dict(node_ip_address="127.0.0.1", object_store_memory=96 << 20)
FAST_DEATH = {
    "health_check_period_ms": 1000, "health_check_failure_threshold": 3, "health_check_initial_delay_ms": 1000,
    "max_direct_call_object_size": 1024,
}  # fmt: skip
R_NODE = dict(num_cpus=2, **LOOPBACK)
"""Room for the rollout worker and the learner rank, and for nothing else."""


@pytest.fixture(scope="module")
def cluster():
    assert not ray.is_initialized()
    started, cluster = time.time(), None
    head = dict(num_cpus=0, include_dashboard=False, _system_config=FAST_DEATH, **LOOPBACK)
    try:
        cluster = Cluster(initialize_head=True, shutdown_at_exit=False, head_node_args=head)  # nodes join from a thread
        cluster.add_node(**R_NODE)
        cluster.add_node(num_cpus=1, **LOOPBACK)
        cluster.wait_for_nodes()
        init_ray(cluster.address)
        yield cluster
    finally:
        ray.shutdown()
        try:
            if cluster is not None:
                cluster.shutdown()
        finally:  # what a node that failed to start left behind is in no one's books: our own Ray processes, by PID
            for process in psutil.Process().children(recursive=True):
                with contextlib.suppress(psutil.Error):  # it exited meanwhile
                    if process.create_time() >= started and "ray" in process_title(process):
                        process.kill()


class NodeKill(Fault):
    """After step `after`, once `cls`.`method` runs, SIGKILL the node it runs on, whole; then a node like
    `replacement` joins (None: none does)."""

    def __init__(self, cluster: Cluster, cls: str, method: str, after: int, replacement: dict | None) -> None:
        super().__init__(cls, method, after=after)
        self.cluster, self.replacement = cluster, replacement
        self.node_id: str | None = None

    def _send(self, process: psutil.Process, in_call: bool) -> None:
        raylet = next(p for p in process.parents() if process_title(p).split(" ")[0].endswith("raylet"))
        node = next(n for n in self.cluster.worker_nodes if n.all_processes["raylet"][0].process.pid == raylet.pid)
        doomed = [raylet, *raylet.children(recursive=True)]
        for p in doomed:
            p.kill()
        self.in_call, self.at, self.pid, self.node_id = in_call, time.perf_counter(), process.pid, node.node_id
        self.cluster.remove_node(node, allow_graceful=False)  # reaps what was killed: its processes are gone
        if self.replacement is not None:
            self.cluster.add_node(**self.replacement)


def tiny(path, address, *overrides):
    return load_config("tiny", [
        f"output_dir={path / 'run'}", f"cluster.address={address}", "kl.coef=0", "checkpoint.every=1",
        "rollout.num_cpus=1.5", "reward.num_cpus=0.75", "data.num_eval=4", *overrides,
    ])  # fmt: skip


def alive(node_id: str) -> bool:
    return any(node["NodeID"] == node_id and node["Alive"] for node in ray.nodes())


def test_a_killed_node_is_replaced_and_every_step_is_trained_once(cluster, tmp_path, capsys):
    cfg = tiny(tmp_path, cluster.address, "steps=3", "fault_tolerance.max_learner_restarts=2")
    kills = [
        NodeKill(cluster, "RolloutWorker", "generate", after=1, replacement=R_NODE),  # the weights die with it
        NodeKill(cluster, "Learner", "learn_parts", after=2, replacement=R_NODE),  # and the batch it trains
    ]
    result = train(cfg, on_step=lambda step, metrics: [kill.on_step(step, metrics) for kill in kills])

    for kill in kills:
        assert kill.in_call and kill.node_id is not None and not alive(kill.node_id)
    assert [h["step"] for h in result.history] == [1, 2, 3]
    assert [sorted(ids) for ids in result.trained_samples] == planned(cfg)  # each planned sample once
    last = result.history[-1]
    assert last["restarts/learner"] == 2  # from the checkpoints of steps 1 and 2
    assert last["faults/restarts/rollout"] == 2 and last["faults/restarts/reward"] == 0
    assert [h["rollout/version"] for h in result.history] == [1.0, 2.0, 3.0]
    assert all(math.isfinite(h["loss"]) and math.isfinite(h["reward/total"]) for h in result.history)
    assert result.after and all(math.isfinite(v) for v in result.after.values())
    failures = [line for line in capsys.readouterr().out.splitlines() if line.startswith("learner failure")]
    assert len(failures) == 2, failures
    assert failures[0].startswith("learner failure at step 2 (") and "Object" in failures[0]  # the weights were lost
    assert failures[1].startswith("learner failure at step 3 (")  # learner rank 0 died in its call


@pytest.mark.parametrize(("cls", "method"), [("RolloutWorker", "generate"), ("Learner", "learn_parts")])
def test_when_no_node_comes_back_the_run_ends_within_node_wait_s_naming_the_node(cluster, tmp_path, cls, method):
    if not any(node["Alive"] and node["Resources"].get("CPU") == R_NODE["num_cpus"] for node in ray.nodes()):
        cluster.add_node(**R_NODE)  # the case before took it away
    cfg = tiny(tmp_path, cluster.address, "steps=2", "fault_tolerance.node_wait_s=2")
    kill = NodeKill(cluster, cls, method, after=1, replacement=None)  # the recovery waits, or the learner's restart
    with pytest.raises(NodeLostError) as error:
        train(cfg, on_step=kill.on_step)
    waited = time.perf_counter() - kill.at
    message = str(error.value)
    assert f"node {kill.node_id} (127.0.0.1) with rollout worker 0, learner rank 0 on it died" in message, message
    assert "fault_tolerance.node_wait_s=2" in message
    assert waited < 2 + 30, waited  # its death noticed in seconds, then the wait: never an endless one
    assert checkpoint.latest(tmp_path / "run") == checkpoint.at_step(tmp_path / "run", 1)  # the step before it kept
