"""Weight sync between launched roles on Ray: the broadcast group re-formed after a learner rank dies,
and (where CUDA exists) roles sharing one GPU or broadcasting over NCCL. The device choice and the
weight transport themselves are unit-tested in tests/unit/test_devices.py."""

import os

import numpy as np
import pytest
import ray
import torch

from rayrlhf.jobs.config.run import load_config
from rayrlhf.jobs.run.roles import uses_broadcast

NO_CUDA = not torch.cuda.is_available()


def test_a_restarted_learner_forms_a_new_broadcast_group_with_restarted_rollout_workers(tmp_path):
    """The broadcast path after a learner rank dies (kill -9), over gloo (the code NCCL runs): the
    learner group and the rollout workers restart, join a new group, and the next step's weights
    reach the workers through it."""
    from rayrlhf.cluster.local import init_ray, shutdown_ray
    from rayrlhf.jobs.data.prompts import load_task
    from rayrlhf.jobs.run.recovery import Recovery
    from rayrlhf.jobs.run.roles import connect_weight_broadcast, launch, restart_learner
    from rayrlhf.jobs.run.pipeline import rl_step

    cfg = load_config("tiny", [f"output_dir={tmp_path}", "kl.coef=0", "rollout.num_workers=2"])
    train_set, _ = load_task(cfg.data.train, cfg.data.eval, cfg.data.num_train, cfg.data.num_eval, cfg.seed)
    pid = lambda actor: ray.get(actor.__ray_call__.remote(lambda _: os.getpid()))  # noqa: E731
    init_ray(num_cpus=4, object_store_mb=256)
    roles = launch(cfg)
    try:
        roles.broadcast_backend = "gloo"
        roles.broadcast_dtypes = connect_weight_broadcast(roles)
        recovery = Recovery(roles, cfg.fault_tolerance)
        assert rl_step(cfg, roles, train_set[:4], recovery)["rollout/version"] == 1.0
        rollout_pids = [pid(w) for w in roles.rollout]
        os.kill(pid(roles.learner[0]), 9)

        restart_learner(roles, cfg)
        recovery.rebind()
        assert not set(rollout_pids) & {pid(w) for w in roles.rollout}  # new workers, in the new group
        metrics = rl_step(cfg, roles, train_set[4:8], recovery)  # the new learner starts at version 0
        assert metrics["rollout/version"] == 1.0 and recovery.metrics()["faults/restarts/rollout"] == 0
        sent = ray.get([rank.get_weights.remote() for rank in roles.learner])[0].tensors()
        for worker in roles.rollout:
            held = ray.get(worker.__ray_call__.remote(lambda w: w.model.state_dict()))
            for name, tensor in held.items():
                assert torch.equal(tensor, sent[name]), name
    finally:
        roles.shutdown()
        shutdown_ray()


# --- where a GPU exists -------------------------------------------------------------------------


@pytest.mark.skipif(NO_CUDA, reason="needs a CUDA GPU: rollout and learner sharing one GPU, bf16")
def test_gpu_grpo_step_with_rollout_and_learner_sharing_one_gpu(tmp_path, monkeypatch):
    from rayrlhf.cluster.local import init_ray, shutdown_ray
    from rayrlhf.jobs.data.prompts import load_task
    from rayrlhf.jobs.run.roles import launch
    from rayrlhf.jobs.run.pipeline import rl_step

    monkeypatch.delenv("DS_ACCELERATOR", raising=False)  # the learner names its own
    cfg = load_config("tiny", [f"output_dir={tmp_path}", "rollout.num_gpus=0.5", "learner.num_gpus=0.5",
                               "learner.bf16=true", "kl.coef=0", "policy.dtype=auto"])  # fmt: skip
    init_ray(num_cpus=4)
    roles = launch(cfg)
    try:
        assert roles.broadcast_dtypes is None  # a shared GPU: the object store carries the bf16 weights
        device = ray.get(roles.rollout[0].__ray_call__.remote(lambda w: (str(w.device), str(w.model.dtype))))
        assert device == ("cuda:0", "torch.bfloat16")
        train_set, _ = load_task(cfg.data.train, cfg.data.eval, cfg.data.num_train, cfg.data.num_eval, cfg.seed)
        metrics = rl_step(cfg, roles, train_set[: cfg.prompts_per_step])
        assert np.isfinite(metrics["loss"]) and metrics["rollout/version"] == 1.0
    finally:
        roles.shutdown()
        shutdown_ray()


@pytest.mark.skipif(NO_CUDA or torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs: NCCL weight broadcast")
def test_gpu_learner_rank_killed_on_the_broadcast_path_restarts_and_the_run_finishes(tmp_path, monkeypatch):
    import psutil

    from rayrlhf.cluster.local import init_ray, shutdown_ray
    from rayrlhf.jobs.train import train

    monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    cfg = load_config("tiny", [f"output_dir={tmp_path}", "rollout.num_gpus=1", "learner.num_gpus=1", "kl.coef=0",
                               "steps=3", "checkpoint.every=1", "logging.tensorboard=false"])  # fmt: skip
    assert uses_broadcast(cfg)
    killed = []

    def kill_learner(step, metrics):
        if step == 2:
            (learner,) = [p for p in psutil.Process().children(recursive=True)
                          if " ".join(p.cmdline()).startswith("ray::Learner")]  # fmt: skip
            os.kill(learner.pid, 9)
            killed.append(learner.pid)

    init_ray(num_cpus=4)
    try:
        result = train(cfg, on_step=kill_learner)
    finally:
        shutdown_ray()
    assert killed and [h["step"] for h in result.history] == [1, 2, 3]
    assert [h["restarts/learner"] for h in result.history] == [0.0, 0.0, 1.0]
    assert result.history[-1]["rollout/version"] == 3.0
