"""The embedded local cluster listens on loopback only; actor groups take their bundles from an
enclosing placement group (a Tune trial's)."""

import os

import psutil
import ray
from ray.util.placement_group import placement_group, placement_group_table, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
from sockets import is_loopback, listening

from rayrlhf.cluster.actor_group import ActorGroup, PlacementError, check_fits
from rayrlhf.cluster.local import init_ray, shutdown_ray


def test_local_cluster_listens_on_loopback_only():
    assert not ray.is_initialized()
    os.environ.pop("RAY_ADDRESS", None)
    resources = init_ray(num_cpus=2, object_store_mb=128)
    try:
        assert resources["CPU"] == 2
        assert resources["object_store_memory"] == 128 << 20
        ray.get(ray.remote(lambda: 1).remote())  # a worker process exists too
        sockets = listening([psutil.Process(), *psutil.Process().children(recursive=True)])
        names = {name for name, _ in sockets}
        assert any("gcs_server" in n for n in names) and any("raylet" in n for n in names)
        exposed = [(name, ip) for name, ip in sockets if not is_loopback(ip)]
        assert exposed == []
        assert ray.util.get_node_ip_address() == "127.0.0.1"
    finally:
        shutdown_ray()


def test_actor_groups_use_the_enclosing_placement_group():
    init_ray(num_cpus=4, object_store_mb=256)
    try:
        class Where:
            def pg(self) -> str:
                return ray.get_runtime_context().get_placement_group_id()

        @ray.remote(num_cpus=0.25)
        class TrialDriver:
            def launch(self):
                groups_before = len(placement_group_table())
                a = ActorGroup(1, name="rollout", resources={"CPU": 0.5}).start(Where, lambda rank: {})
                b = ActorGroup(1, name="reward", resources={"CPU": 0.25}).start(Where, lambda rank: {})
                where = ray.get([a[0].pg.remote(), b[0].pg.remote()])
                try:
                    ActorGroup(1, name="learner", resources={"CPU": 0.5})
                    extra = None
                except PlacementError as e:
                    extra = str(e)
                try:
                    check_fits({"CPU": 1.0})  # the cluster has 4 CPUs, the group's role bundles 0.75
                    refused = None
                except PlacementError as e:
                    refused = str(e)
                check_fits({"CPU": 0.75})
                a.shutdown()
                b.shutdown()
                again = ActorGroup(1, name="rollout", resources={"CPU": 0.5})  # freed bundles are taken again
                return a.bundles, b.bundles, again.bundles, where, len(placement_group_table()) - groups_before, extra, refused

        pg = placement_group([{"CPU": 0.25}, {"CPU": 0.5}, {"CPU": 0.25}])
        ray.get(pg.ready())
        driver = TrialDriver.options(
            scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=0)
        ).remote()
        a, b, again, where, new_groups, extra, refused = ray.get(driver.launch.remote())
        assert (a, b, again) == ([1], [2], [1])
        assert where == [pg.id.hex(), pg.id.hex()]
        assert new_groups == 0
        assert extra is not None and "needs 1" in extra
        assert refused is not None and "placement group has 0.75" in refused
        ray.kill(driver)
        remove_placement_group(pg)
    finally:
        shutdown_ray()
