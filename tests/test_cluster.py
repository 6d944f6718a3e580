"""The embedded local cluster listens on loopback only."""

import os

import psutil
import ray
from sockets import is_loopback, listening

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
