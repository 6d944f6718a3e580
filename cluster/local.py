"""Where a job's Ray comes from: an in-process local cluster on loopback, or an existing one.

The embedded default starts Ray inside the driver with a bounded object store, bound to
127.0.0.1, with no traffic off the machine (see cluster/offline.py). Given an address (or
$RAY_ADDRESS, as inside a Ray Job) it attaches instead and starts nothing.
"""

from __future__ import annotations

import logging
import os

import ray
from ray._private import ray_constants

from rayrlhf.cluster import worker_logs
from rayrlhf.cluster.offline import apply_offline_defaults, dead_end_proxy


def init_ray(
    address: str | None = None,
    num_cpus: int | None = None,
    object_store_mb: int = 1024,
    include_dashboard: bool = False,
) -> dict:
    """Start or attach to Ray (idempotent); returns the cluster's resources. Workers' output goes to the
    run's workers.log, their warnings to the console (cluster/worker_logs.py), unless RAYRLHF_VERBOSE."""
    apply_offline_defaults()
    if not ray.is_initialized():
        address = address or os.environ.get("RAY_ADDRESS")
        level = logging.INFO if worker_logs.verbose() else logging.WARNING  # no "Started a local Ray instance"
        worker_logs.quiet()
        if address:
            ray.init(address=address, log_to_driver=True, logging_level=level)
        else:
            # Ray reads this flag when it is imported, which may have happened before our defaults.
            ray_constants.ENABLE_RAY_CLUSTER = os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] != "0"
            with dead_end_proxy():
                ray.init(
                    address="local",  # a new instance, even if another Ray runs on this machine
                    num_cpus=num_cpus,
                    object_store_memory=object_store_mb << 20,
                    include_dashboard=include_dashboard,
                    dashboard_host="127.0.0.1",
                    log_to_driver=True,
                    logging_level=level,
                    # Ray starts workers at nice 15 so that its daemons stay responsive; here every
                    # actor is a compute role, and at 15 each loses the cores to any nice-0 process
                    # (the driver, other jobs) and runs clearly slower on a loaded machine.
                    _system_config={"worker_niceness": 0},
                )
        worker_logs.quiet()
    return ray.cluster_resources()


def shutdown_ray() -> None:
    if ray.is_initialized():
        ray.shutdown()
