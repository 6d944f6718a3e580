"""Shared by the end-to-end tests: one local Ray for consecutive modules (see tests/conftest.py)."""

import time

import pytest
import ray

from rayrlhf.cluster.local import init_ray, shutdown_ray


@pytest.fixture(scope="module")
def local_ray():
    # 4 logical CPUs on the 2-core machine: the roles take turns, so they may share cores.
    # Starting Ray takes seconds, so the next module that uses it gets this one (tests/conftest.py
    # stops it before a module that does not) unless this module left CPUs taken (a failed test's actors).
    init_ray(num_cpus=4, object_store_mb=512)
    yield
    deadline = time.monotonic() + 10  # killed actors hand their CPUs back within moments
    while ray.is_initialized() and not all_cpus_free() and time.monotonic() < deadline:
        time.sleep(0.1)
    if ray.is_initialized() and not all_cpus_free():
        shutdown_ray()


def all_cpus_free() -> bool:
    return ray.available_resources().get("CPU", 0.0) >= ray.cluster_resources()["CPU"] - 1e-6
