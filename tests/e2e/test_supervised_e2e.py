"""train-rm and sft end to end on real Ray Train workers with real DeepSpeed engines, then both
results in a tiny RL run: the SFT policy as its start, the reward model as a weighted component.
Each job runs once for the module and is resumed once (sft's on a pyarrow.fs URI)."""

import json

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file
from transformers import AutoModelForCausalLM

from rayrlhf.actors.runtime.models import resolve_policy
from rayrlhf.actors.rewards.reward_model import RewardModel
from rayrlhf.jobs.config.run import load_config
from rayrlhf.jobs.config.supervised import RMConfig, SFTConfig, load_job_config
from rayrlhf.jobs.data.supervised import load_rm_data
from rayrlhf.jobs.sft import sft
from rayrlhf.jobs.train import train
from rayrlhf.jobs.train_rm import train_rm


def steps_logged(output_dir) -> list[int]:
    return [json.loads(line)["step"] for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def rm_run(local_ray, tmp_path_factory):
    """rm_tiny: 2 workers, ZeRO-2, 4 steps, a checkpoint every 2 steps."""
    cfg = load_job_config(RMConfig, "rm_tiny", [f"output_dir={tmp_path_factory.mktemp('rm')}"], "rm_tiny")
    return cfg, train_rm(cfg)


@pytest.fixture(scope="module")
def sft_run(local_ray, tmp_path_factory):
    """sft_tiny: 2 workers, ZeRO-3, 2 steps; output_dir a pyarrow.fs URI (file:// takes the road s3://
    takes), and the bucket's folder on this disk."""
    bucket = tmp_path_factory.mktemp("bucket") / "sft"
    cfg = load_job_config(SFTConfig, "sft_tiny", [f"output_dir=file://{bucket}"], "sft_tiny")
    return cfg, sft(cfg), bucket


def test_reward_model_learns_and_is_saved_as_trained(rm_run):
    cfg, result = rm_run
    before, after = result.before["eval/pairwise_accuracy"], result.after["eval/pairwise_accuracy"]
    assert after > before and after >= 0.7, (before, after)
    assert {"eval/accuracy_wrong", "eval/accuracy_truncated", "eval/margin"} <= set(result.after)
    assert steps_logged(result.output_dir) == [1, 2, 3, 4, 4]  # 4 losses, then the held-out metrics
    # the saved directory scores the held-out pairs exactly as the trained engines did
    _, held = load_rm_data(cfg.data.train, cfg.data.eval, cfg.data.num_train, cfg.data.num_eval, cfg.seed)
    model = RewardModel.load(result.final_dir)
    chosen = model.score([p.prompt for p in held], [p.chosen for p in held], batch_size=16)
    rejected = model.score([p.prompt for p in held], [p.rejected for p in held], batch_size=16)
    assert float(np.mean(chosen > rejected)) == pytest.approx(after)
    assert float(np.mean(chosen - rejected)) == pytest.approx(result.after["eval/margin"], abs=1e-4)


def test_reward_model_resumes_from_its_ray_train_checkpoint(rm_run):
    cfg, first = rm_run
    more = cfg.model_copy(update={"trainer": cfg.trainer.model_copy(update={"epochs": 2, "max_steps": 6})})
    second = train_rm(more)
    # steps 5 and 6 only: the run went on from the step-4 checkpoint, with its "before" metrics
    assert steps_logged(second.output_dir) == [1, 2, 3, 4, 4, 5, 6, 6]
    assert second.before == first.before
    checkpoints = [p for p in (second.output_dir / "ray_train" / cfg.name).glob("checkpoint_*") if p.is_dir()]
    assert len(checkpoints) == 1 and (checkpoints[0] / "engine" / "mp_rank_00_model_states.pt").is_file()


def test_sft_lowers_held_out_nll_and_writes_a_policy(sft_run):
    _, result, bucket = sft_run
    assert result.after["eval/nll"] < result.before["eval/nll"]
    start = load_file(str(resolve_policy("tiny-gpt2") / "model.safetensors"))
    end = load_file(str(bucket / "final" / "model.safetensors"))
    assert start.keys() == end.keys()
    assert np.mean([not np.array_equal(start[k], end[k]) for k in start]) > 0.5  # ZeRO-3 weights gathered
    model = AutoModelForCausalLM.from_pretrained(bucket / "final")
    assert isinstance(model, torch.nn.Module)


def test_rl_starts_from_sft_policy_with_learned_reward(rm_run, sft_run, tmp_path):
    _, rm = rm_run
    _, _, sft_bucket = sft_run
    cfg = load_config("tiny", [
        f"output_dir={tmp_path / 'rl'}", "steps=1", f"policy.model={sft_bucket / 'final'}",
        "kl.coef=0", "data.num_eval=4", "eval_max_new_tokens=4",  # no reference actor, a small eval
        "reward.rm_weight=0.5", f"reward.rm_model={rm.final_dir}",
    ])
    result = train(cfg)
    step = result.history[0]
    assert np.isfinite(step["reward/rm"])  # logged as its own component
    assert np.isfinite(result.after["eval/rm"]) and np.isfinite(result.before["eval/rm"])
    assert (result.final_dir / "model.safetensors").is_file()


def test_sft_on_a_uri_output_dir_writes_and_resumes_there(sft_run):
    """output_dir as a pyarrow.fs URI: Ray Train's checkpoints, rank 0's metrics, eval.json and final/
    land in the bucket; a rerun with more steps continues the bucket's checkpoint and log."""
    cfg, first, bucket = sft_run
    assert first.output_dir == f"file://{bucket}" and first.final_dir == f"file://{bucket}/final"
    assert (bucket / "final" / "model.safetensors").is_file() and (bucket / "config.yaml").is_file()
    assert steps_logged(bucket) == [1, 2, 2]
    # 2 workers x 8 rows: 2 steps per epoch of the 32 rows, so a third step needs a second epoch
    more = cfg.model_copy(update={"trainer": cfg.trainer.model_copy(update={"epochs": 2, "max_steps": 3})})
    second = sft(more)
    assert steps_logged(bucket) == [1, 2, 2, 3, 3]  # went on from the step-2 checkpoint in the bucket
    assert second.before == first.before
    assert json.loads((bucket / "eval.json").read_text())["after"] == second.after
    states = (bucket / "ray_train" / cfg.name).glob("checkpoint_*/engine/*_model_states.pt")
    assert sorted(p.name for p in states) == [f"zero_pp_rank_{r}_mp_rank_00_model_states.pt" for r in (0, 1)]  # ZeRO-3
