"""A multi-node run whose nodes do not share the driver's files: models resolve on each node,
outputs reach the configured storage.

tests/separate_nodes.py runs a head (0 CPUs) and two worker nodes in a mount namespace where the
driver's home folder is an empty tmpfs, and gives each node its own model cache ($RAYRLHF_CACHE in
its raylet's environment). The driver (this process) has its own cache there. A path from the driver
therefore means nothing on the nodes, as on a cluster without a shared home directory.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import ray

from rayrlhf.actors.runtime.models import TINY_GPT2, TINY_GPT2_VERSION, resolve_policy
from rayrlhf.cluster.actor_group import RoleStartError
from rayrlhf.jobs.config.run import load_config
from rayrlhf.jobs.train import train

HERE = Path(__file__).resolve().parent
CONVERTED = f"{TINY_GPT2}-{TINY_GPT2_VERSION}"


@pytest.fixture(scope="module")
def separate_nodes():
    assert not ray.is_initialized()
    root = Path(tempfile.mkdtemp(prefix="rrnodes", dir="/tmp"))
    driver_home, caches, storage = root / "driver_home", [root / "node0", root / "node1"], root / "storage"
    for folder in (driver_home, *caches, storage):
        folder.mkdir()
    env = dict(os.environ, RAY_TMPDIR=str(root / "ray"))
    address_file = root / "address"
    script = f"mount -t tmpfs none {driver_home} && exec {sys.executable} {HERE.parent / 'separate_nodes.py'} {address_file} {caches[0]} {caches[1]}"
    proc = subprocess.Popen(["unshare", "-m", "sh", "-c", script], stdin=subprocess.PIPE, env=env)
    saved = {key: os.environ.get(key) for key in ("RAY_TMPDIR", "RAYRLHF_CACHE")}
    os.environ.update(RAY_TMPDIR=env["RAY_TMPDIR"], RAYRLHF_CACHE=str(driver_home / "cache"))
    try:
        deadline = time.monotonic() + 120
        while not address_file.exists():
            assert proc.poll() is None, "the two-node cluster did not start"
            assert time.monotonic() < deadline, "the two-node cluster took over 120 s to start"
            time.sleep(0.2)
        yield dict(address=address_file.read_text(), driver_home=driver_home, caches=caches, storage=storage)
    finally:
        ray.shutdown()
        proc.stdin.close()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        shutil.rmtree(root, ignore_errors=True)


def tiny(address: str, output_dir: str, *overrides: str):
    return load_config("tiny", [
        f"output_dir={output_dir}", f"cluster.address={address}", "cluster.placement_strategy=SPREAD",
        "rollout.num_workers=2", "learner.num_ranks=2", "steps=1", "data.num_eval=4", *overrides,
    ])  # fmt: skip


def test_each_node_resolves_the_policy_and_the_outputs_reach_storage(separate_nodes):
    driver_model = resolve_policy(TINY_GPT2)  # the driver's own copy, in a folder the nodes cannot see
    assert driver_model == separate_nodes["driver_home"] / "cache" / CONVERTED
    storage = separate_nodes["storage"]

    result = train(tiny(separate_nodes["address"], f"file://{storage}/run", "checkpoint.every=1", "kl.coef=0"))

    # Both nodes hold replicas (SPREAD), and each converted the built-in model into its own cache.
    for cache in separate_nodes["caches"]:
        assert (cache / CONVERTED / "config.json").is_file(), f"{cache} has no {CONVERTED}"
    # Rank 0 of the learner wrote the policy straight to storage; the driver uploaded its logs there.
    assert result.final_dir == f"file://{storage}/run/final"
    assert (storage / "run" / "final" / "model.safetensors").is_file()
    lines = (storage / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [0, 1, 1]
    assert json.loads((storage / "run" / "eval.json").read_text())["after"] == result.after
    assert (storage / "run" / "config.yaml").is_file()
    # The run checkpoint: the ranks (one per node) uploaded their engine state, the driver its files.
    saved = storage / "run" / "checkpoints" / "step_000001"
    assert (saved / "manifest.json").is_file() and (saved / "driver.json").is_file()
    assert (saved / "learner" / "state" / "mp_rank_00_model_states.pt").is_file()


def test_a_path_only_the_driver_has_fails_the_launch_naming_the_node(separate_nodes, tmp_path):
    driver_model = resolve_policy(TINY_GPT2)  # exists here, not on the nodes (the old bug shipped this path)
    cfg = tiny(separate_nodes["address"], str(tmp_path / "run"), f"policy.model={driver_model}", "kl.coef=0")
    with pytest.raises(RoleStartError) as err:
        train(cfg)
    message = str(err.value)
    assert "policy.model is not available on node" in message and "Ray node" in message
    assert str(driver_model) in message and "could not start" in message
    assert not ray.is_initialized()  # train() started its connection and closed it again
