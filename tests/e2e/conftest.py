"""Shared by the end-to-end tests: one local Ray per test module."""

import pytest

from rayrlhf.cluster.local import init_ray, shutdown_ray


@pytest.fixture(scope="module")
def local_ray():
    # 4 logical CPUs on the 2-core machine: the roles take turns, so they may share cores.
    init_ray(num_cpus=4, object_store_mb=512)
    yield
    shutdown_ray()
