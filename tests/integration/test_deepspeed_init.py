"""A DeepSpeed engine starts on CPU without JIT-building anything, so a build lock left by a killed
rank cannot stall it (actors/runtime/deepspeed_engine.py: skip_shared_memory_op)."""

import os
import subprocess
import sys
import textwrap

from tests.sockets import free_port

SCRIPT = textwrap.dedent("""
    import torch
    from rayrlhf.actors.runtime.deepspeed_engine import deepspeed_engine
    from rayrlhf.jobs.config.run import load_config

    learner = load_config("tiny", ["learner.zero_stage=1"]).learner
    module = torch.nn.Linear(4, 2)
    engine = deepspeed_engine(module, torch.optim.AdamW(module.parameters()), learner, 1, 1, torch.device("cpu"))
    loss = engine(torch.ones(learner.micro_batch_size, 4)).sum()
    engine.backward(loss)
    engine.step()
    print("stepped", engine.global_steps)
""")


def test_a_stale_extension_build_lock_does_not_stall_the_engine(tmp_path):
    op_folder = tmp_path / "deepspeed_shm_comm"
    op_folder.mkdir()
    (op_folder / "lock").touch()  # what a rank SIGKILLed during the op's build leaves behind
    env = dict(
        os.environ, TORCH_EXTENSIONS_DIR=str(tmp_path), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1",
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), DS_ACCELERATOR="cpu",
    )  # fmt: skip
    done = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "stepped 1" in done.stdout
    assert sorted(path.name for path in op_folder.iterdir()) == ["lock"]  # nothing was built
