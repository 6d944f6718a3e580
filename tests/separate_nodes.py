"""A two-node Ray cluster on loopback whose nodes do not share the driver's files (run as a script).

Started under `unshare -m` with an empty tmpfs mounted over the driver's home folder, so no process of
this cluster (head, raylets, workers) can see what the driver keeps there; each worker node also gets
its own model cache through its raylet's environment. Usage:

    unshare -m sh -c 'mount -t tmpfs none HIDDEN && exec python separate_nodes.py ADDRESS_FILE CACHE0 CACHE1'

It writes the GCS address to ADDRESS_FILE once both nodes are up, and shuts the cluster down when
its stdin closes (the test closes it; it is killed by PID if it does not exit).
"""

import os
import sys

from ray.cluster_utils import Cluster

LOOPBACK = dict(node_ip_address="127.0.0.1", object_store_memory=192 << 20)


def main(address_file: str, *caches: str) -> None:
    cluster = Cluster(initialize_head=True, head_node_args=dict(num_cpus=0, include_dashboard=False, **LOOPBACK))
    try:
        for cache in caches:
            cluster.add_node(num_cpus=2, env_vars={"RAYRLHF_CACHE": cache}, **LOOPBACK)
        cluster.wait_for_nodes()
        with open(address_file + ".tmp", "w") as out:
            out.write(cluster.address)
        os.rename(address_file + ".tmp", address_file)
        sys.stdin.read()  # until the test closes our stdin
    finally:
        cluster.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:])
