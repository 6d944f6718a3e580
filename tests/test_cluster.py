"""The embedded local cluster listens on loopback only."""

import ipaddress
import os

import psutil
import ray

from cluster.local import init_ray, shutdown_ray


def _is_loopback(ip: str) -> bool:
    addr = ipaddress.ip_address(ip.split("%")[0])
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped:
        addr = addr.ipv4_mapped
    return addr.is_loopback


def test_local_cluster_listens_on_loopback_only():
    assert not ray.is_initialized()
    os.environ.pop("RAY_ADDRESS", None)
    resources = init_ray(num_cpus=2, object_store_mb=128)
    try:
        assert resources["CPU"] == 2
        assert resources["object_store_memory"] == 128 << 20
        ray.get(ray.remote(lambda: 1).remote())  # a worker process exists too
        listening = []
        for proc in [psutil.Process(), *psutil.Process().children(recursive=True)]:
            try:
                conns = proc.net_connections(kind="inet")
            except psutil.NoSuchProcess:
                continue
            listening += [(proc.name(), c.laddr.ip) for c in conns if c.status == psutil.CONN_LISTEN]
        names = {name for name, _ in listening}
        assert any("gcs_server" in n for n in names) and any("raylet" in n for n in names)
        exposed = [(name, ip) for name, ip in listening if not _is_loopback(ip)]
        assert exposed == []
        assert ray.util.get_node_ip_address() == "127.0.0.1"
    finally:
        shutdown_ray()
