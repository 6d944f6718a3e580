"""Every role on its device, and weight sync that keeps the policy's dtype.

On this machine (no GPU) the device choice, the bf16 object-store path and the bucketed broadcast
(over gloo, the same code NCCL runs) are tested on the CPU; the NCCL test at the end runs only where
CUDA exists and is skipped visibly elsewhere. Launched roles on Ray: tests/integration/test_weight_sync.py.
"""

import os
import pickle
import socket
import threading

import pytest
import torch
from sockets import free_port
from transformers import GPT2Config, GPT2LMHeadModel

from rayrlhf.actors.runtime.devices import role_device, select_device, select_dtype, set_deepspeed_accelerator
from rayrlhf.actors.runtime.models import ModelUnavailableError, resolve_policy_here
from rayrlhf.actors.rollout_worker import RolloutWorker
from rayrlhf.actors.runtime.weight_sync import BroadcastGroup, Weights, buckets
from rayrlhf.jobs.config.run import load_config
from rayrlhf.jobs.run.roles import role_table, uses_broadcast

NO_CUDA = not torch.cuda.is_available()


def tiny_model(seed: int, dtype: torch.dtype = torch.float32) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=300, n_positions=32, n_embd=16, n_layer=2, n_head=2)
    return GPT2LMHeadModel(config).to(dtype).eval()


def test_each_role_gets_the_device_and_gpu_share_its_config_names():
    cfg = load_config("tiny", ["rollout.num_gpus=0.5", "learner.num_gpus=0.5", "reward.num_gpus=0.25",
                               "kl.num_gpus=0.25"])  # fmt: skip
    table = {role.name: role for role in role_table(cfg)}
    assert {name: role.resources.get("GPU") for name, role in table.items()} == {
        "rollout": 0.5, "reward": 0.25, "reference": 0.25, "learner": 0.5,
    }  # fmt: skip
    assert {name: role.settings(0)["device"] for name, role in table.items()} == dict.fromkeys(table, "cuda")
    assert all(role.settings(0)["model"] == "tiny-gpt2" for name, role in table.items() if name != "reward")
    assert table["learner"].settings(0)["algorithm"].loss_scale_tokens == cfg.rollout.max_new_tokens  # its default
    cpu = {role.name: role.settings(0)["device"] for role in role_table(load_config("tiny"))}
    assert cpu == dict.fromkeys(cpu, "cpu")
    assert not uses_broadcast(cfg)  # fractional GPUs may share a device: NCCL would refuse
    assert uses_broadcast(load_config("gpu_zero2"))
    assert role_device(0) == "cpu" and role_device(0.01) == "cuda"


def test_device_and_dtype_selection_on_a_cpu_process(monkeypatch):
    assert select_device("cpu") == torch.device("cpu")
    assert select_dtype("auto", torch.device("cpu")) == torch.float32  # bf16 is slow on CPUs
    assert select_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16
    with pytest.raises(ValueError, match="not a torch dtype"):
        select_dtype("float31", torch.device("cpu"))
    monkeypatch.setenv("DS_ACCELERATOR", "cuda")  # a GPU shell's setting must not follow a CPU learner
    set_deepspeed_accelerator(torch.device("cpu"))
    assert os.environ["DS_ACCELERATOR"] == "cpu"
    if NO_CUDA:
        with pytest.raises(RuntimeError, match=rf"num_gpus > 0.*sees none on node {socket.gethostname()}"):
            select_device("cuda")


def test_a_model_missing_on_this_node_is_named_with_the_node(tmp_path):
    missing = tmp_path / "only-on-the-driver"
    with pytest.raises(ModelUnavailableError, match=rf"policy.model is not available on node {socket.gethostname()}"):
        resolve_policy_here(str(missing))


def test_bf16_weights_travel_as_bf16_and_load_bit_exact(tmp_path):
    learner = tiny_model(0, torch.bfloat16)
    state = {k: v * 3 for k, v in learner.state_dict().items()}  # not the receiver's weights
    weights = pickle.loads(pickle.dumps(Weights.from_state_dict(state)))  # as through the object store
    fp32_bytes = sum(t.numel() * 4 for t in state.values())
    assert weights.nbytes * 2 == fp32_bytes  # no fp32 upcast on the way
    assert set(weights.dtypes.values()) == {"bfloat16"}
    for name, tensor in weights.tensors().items():
        assert tensor.dtype == torch.bfloat16 and torch.equal(tensor, state[name]), name

    worker = RolloutWorker(model="tiny-gpt2", cache_dir=str(tmp_path), dtype="bfloat16", max_prompt_tokens=16,
                           use_chat_template=False, system_prompt=None, samples_per_prompt=2, max_new_tokens=2,
                           temperature=1.0, top_p=1.0, torch_threads=1, seed=0)  # fmt: skip
    new = {k: v.clone() * 2 for k, v in worker.model.state_dict().items()}
    assert worker.load_weights(1, Weights.from_state_dict(new)) == 1
    for name, tensor in worker.model.state_dict().items():
        assert tensor.dtype == torch.bfloat16 and torch.equal(tensor, new[name]), name


def test_buckets_keep_one_dtype_and_a_size_bound():
    f32 = lambda n: torch.zeros(n, dtype=torch.float32)  # noqa: E731
    tensors = [("a", f32(10)), ("b", f32(10)), ("c", f32(30)), ("d", torch.zeros(4, dtype=torch.bfloat16)), ("e", f32(1))]
    # 40 + 40 bytes fit 100; c (120 bytes) is alone; a dtype change starts a bucket
    assert [[name for name, _ in b] for b in buckets(tensors, 100)] == [["a", "b"], ["c"], ["d"], ["e"]]


def test_broadcast_group_sends_the_state_dict_in_buckets_in_the_receivers_dtype():
    sender, receivers = tiny_model(0), [tiny_model(1, torch.bfloat16), tiny_model(2, torch.bfloat16)]
    dtypes = {name: t.dtype for name, t in receivers[0].state_dict().items()}
    port, errors = free_port(), []

    def run(rank: int) -> None:
        try:
            group = BroadcastGroup(master_addr="127.0.0.1", master_port=port, rank=rank, world_size=3, backend="gloo",
                                   device=torch.device("cpu"), bucket_bytes=16 << 10, timeout_s=60)  # fmt: skip
            if rank == 0:
                group.send(sender.state_dict(), dtypes)
            else:
                group.receive(receivers[rank - 1])
        except Exception as err:  # noqa: BLE001 - reported by the main thread
            errors.append(err)

    threads = [threading.Thread(target=run, args=(rank,)) for rank in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors and not any(t.is_alive() for t in threads)
    assert len(buckets(list(sender.state_dict().items()), 16 << 10)) > 3  # really several buckets
    for receiver in receivers:
        for name, tensor in receiver.state_dict().items():
            assert tensor.dtype == torch.bfloat16
            assert torch.equal(tensor, sender.state_dict()[name].to(torch.bfloat16)), name


# --- where a GPU exists -------------------------------------------------------------------------


@pytest.mark.skipif(NO_CUDA or torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs: NCCL broadcast, bf16")
def test_gpu_nccl_broadcast_round_trip_in_bf16():
    sender = tiny_model(0, torch.bfloat16).to("cuda:0")
    receiver = tiny_model(1, torch.bfloat16).to("cuda:1")
    dtypes = {name: t.dtype for name, t in receiver.state_dict().items()}
    port, errors = free_port(), []

    def run(rank: int) -> None:
        try:
            torch.cuda.set_device(rank)
            group = BroadcastGroup(master_addr="127.0.0.1", master_port=port, rank=rank, world_size=2, backend="nccl",
                                   device=torch.device("cuda", rank), bucket_bytes=16 << 10)  # fmt: skip
            group.send(sender.state_dict(), dtypes) if rank == 0 else group.receive(receiver)
            torch.cuda.synchronize(rank)
        except Exception as err:  # noqa: BLE001
            errors.append(err)

    threads = [threading.Thread(target=run, args=(rank,)) for rank in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors
    for name, tensor in receiver.state_dict().items():
        assert torch.equal(tensor.cpu(), sender.state_dict()[name].cpu()), name
