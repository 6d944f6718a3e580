"""Test-wide settings: offline, loopback only, nothing sent off the machine; and a test's folder
(unit/, integration/, e2e/) is its marker: `pytest -m unit` is the inner loop, `-m "not e2e"` adds
the integration tests."""

import os
import sys
from pathlib import Path

import pytest

from rayrlhf.cluster.offline import DEAD_END_PROXY, apply_offline_defaults

apply_offline_defaults()
os.environ.update(DEAD_END_PROXY)  # tests never need the network: block it for the whole session
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("DS_ACCELERATOR", "cpu")  # the machine has no GPU; DeepSpeed's probe stays quiet
# Ray Train's controller sees a finished sft/train-rm run at its next poll of the workers (every 2 s by default)
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")

FOLDERS = ("unit", "integration", "e2e")
"""The markers registered in pyproject.toml, one per folder under tests/."""


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by these markers
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        folder = item.path.relative_to(here).parts[0]
        if folder not in FOLDERS:
            raise pytest.UsageError(f"{item.nodeid}: a test lives in one of tests/{{{','.join(FOLDERS)}}}/")
        item.add_marker(folder)
    # Within a folder, the modules that share the local Ray (tests/e2e/conftest.py) run first, one after
    # the other: one Ray start for all of them instead of one after each module that starts its own.
    sharing = {item.path for item in items if "local_ray" in item.fixturenames}
    order = {id(item): i for i, item in enumerate(items)}
    items.sort(key=lambda item: (item.path.parent, item.path not in sharing, order[id(item)]))


def stop_ray() -> None:
    """Shut down this process's Ray, if it has one (a module that never imported Ray has none)."""
    if "ray" in sys.modules and sys.modules["ray"].is_initialized():
        sys.modules["ray"].shutdown()


@pytest.fixture(scope="module", autouse=True)
def _ray_only_where_asked(request: pytest.FixtureRequest):
    """Consecutive modules that use `local_ray` (tests/e2e/conftest.py) share one Ray; a module none of
    whose tests uses it runs without: some start a cluster of their own, others check that none runs."""
    here = request.node.path
    if not any("local_ray" in item.fixturenames for item in request.session.items if item.path == here):
        stop_ray()
    yield


@pytest.fixture(scope="session", autouse=True)
def _no_ray_after_the_session():
    yield
    stop_ray()


@pytest.fixture(scope="module")
def tiny_dir() -> Path:
    """The built-in tiny GPT-2, converted once into the model cache (the serving tests share it)."""
    from rayrlhf.actors.runtime.models import resolve_policy  # after the offline settings above

    return resolve_policy("tiny-gpt2")


@pytest.fixture(scope="module")
def gen(tiny_dir):
    """A serving generator (actors/serving/text_generator.py) over the tiny model, one torch thread."""
    from rayrlhf.actors.serving.text_generator import TextGenerator

    return TextGenerator(tiny_dir, "float32", torch_threads=1)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    session.config.stash[EXIT_STATUS] = int(exitstatus)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config: pytest.Config) -> None:
    """End the process with pytest's own status once its report is written, skipping the interpreter's
    teardown: a clean-clone run (2026-12-05) passed every test and then died of a segfault while
    native extensions (Ray, torch threads) were finalised, which turned a green run red."""
    if EXIT_STATUS in config.stash:
        import sys

        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(config.stash[EXIT_STATUS])


EXIT_STATUS = pytest.StashKey[int]()
