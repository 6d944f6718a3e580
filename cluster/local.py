"""Where a job's Ray comes from: an in-process local cluster on loopback, or an existing one.

The embedded default starts Ray inside the driver with a bounded object store, bound to
127.0.0.1, with no traffic off the machine (see cluster/offline.py). Given an address (or
$RAY_ADDRESS, as inside a Ray Job) it attaches instead and starts nothing.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator

import ray
from ray._private import ray_constants, services

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
            with dead_end_proxy(), daemons_in_their_own_process_group():
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


@contextlib.contextmanager
def daemons_in_their_own_process_group() -> Iterator[None]:
    """Start the local Ray's processes (GCS, raylet, and the workers the raylet starts) outside the
    driver's process group. A signal to the whole group (`kill -TERM -<pgid>`, a supervisor that stops
    a job that way) then reaches the driver alone, which stops the run with a checkpoint and shuts Ray
    down itself; otherwise the same SIGTERM kills the actors that hold the state to save (Ray blocks
    SIGINT in them, not SIGTERM). They still die with the driver (Ray's fate sharing)."""
    popen = getattr(services, "ConsolePopen", None)  # how Ray starts its processes (ray/_private/services.py)
    if popen is None or os.name != "posix":  # another Ray version, or no process groups: as Ray does
        yield
        return

    class OwnGroup(popen):  # type: ignore[misc,valid-type]
        def __init__(self, *args, preexec_fn=None, **kwargs) -> None:
            def own_group() -> None:  # in the child, before it runs the daemon
                os.setpgid(0, 0)
                if preexec_fn is not None:
                    preexec_fn()

            super().__init__(*args, preexec_fn=own_group, **kwargs)

    services.ConsolePopen = OwnGroup  # type: ignore[misc]
    try:
        yield
    finally:
        services.ConsolePopen = popen  # type: ignore[misc]


def shutdown_ray() -> None:
    if ray.is_initialized():
        ray.shutdown()
