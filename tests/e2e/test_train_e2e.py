"""The RL job end to end: real Ray actors, real DeepSpeed engines, the tiny model."""

import json

import numpy as np
import pytest
import ray
import torch
from safetensors.numpy import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from rayrlhf.actors.runtime.models import resolve_policy
from rayrlhf.jobs.config.run import load_config
from rayrlhf.jobs.data.prompts import load_task
from rayrlhf.jobs.run.roles import launch
from rayrlhf.jobs.run.pipeline import rl_step
from rayrlhf.jobs.train import train


def tiny(tmp_path, *overrides):
    return load_config("tiny", [f"output_dir={tmp_path / 'run'}", *overrides])


def changed_fraction(final_dir) -> float:
    start = load_file(str(resolve_policy("tiny-gpt2") / "model.safetensors"))
    end = load_file(str(final_dir / "model.safetensors"))
    assert start.keys() == end.keys()
    return float(np.mean([not np.array_equal(start[k], end[k]) for k in start]))


def generates(final_dir) -> str:
    model = AutoModelForCausalLM.from_pretrained(final_dir)
    tok = AutoTokenizer.from_pretrained(final_dir)
    ids = tok("What is 2 plus 3?", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    assert out.shape[1] == ids["input_ids"].shape[1] + 6
    return tok.decode(out[0, ids["input_ids"].shape[1]:])


def test_grpo_two_rank_zero2(local_ray, tmp_path):
    cfg = tiny(tmp_path, "learner.num_ranks=2", "learner.zero_stage=2", "rollout.num_workers=2", "steps=2")
    result = train(cfg)

    assert changed_fraction(result.final_dir) > 0.5
    # rollout workers loaded every new policy version
    assert [h["rollout/version"] for h in result.history] == [1.0, 2.0]
    last = result.history[-1]
    for key in ("reward/freq", "reward/sim", "reward/rouge_l", "kl", "entropy", "clip_frac", "response_length",
                "tokens_per_s", "time/generate", "time/score", "time/reference", "time/learn", "time/sync"):
        assert key in last and np.isfinite(last[key]), key
    assert last["tokens"] > 0
    generates(result.final_dir)

    out = result.output_dir
    assert json.loads((out / "eval.json").read_text())["after"]["eval/length"] == result.after["eval/length"]
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [0, 1, 2, 2]
    assert any((out / "tensorboard").iterdir())
    assert len((out / "examples.jsonl").read_text().splitlines()) == cfg.data.num_eval


# PPO on two ZeRO-3 ranks with adaptive KL and packing: the uninterrupted run of
# tests/e2e/test_resume.py::test_ppo_two_rank_zero3_adaptive_kl_trains_and_resumes_exactly


def test_reinforce_without_reference_zero0(local_ray, tmp_path):
    cfg = tiny(tmp_path, "algorithm.name=reinforce", "kl.coef=0", "learner.zero_stage=0", "steps=1")
    result = train(cfg)
    assert changed_fraction(result.final_dir) > 0.5
    assert result.history[0]["kl"] == 0.0


@pytest.mark.parametrize("overrides", [  # no reference actor (kl.coef=0) where the KL term is not the loss's own
    ("algorithm.name=dr_grpo", "learner.num_ranks=2", "rollout.num_workers=2", "kl.coef=0"),  # the normaliser over ranks
    ("algorithm.policy_loss=cispo", "algorithm.clip_eps_high=0.28", "kl.coef=0"),
    ("algorithm.policy_loss=gspo", "algorithm.clip_eps_low=3e-4", "algorithm.clip_eps_high=4e-4", "kl.coef=0"),
    ("algorithm.name=reinforce_pp",),  # its KL term is in the per-token reward it whitens
])  # fmt: skip
def test_each_new_loss_trains(local_ray, tmp_path, overrides):
    result = train(tiny(tmp_path, *overrides, "steps=1"))
    assert changed_fraction(result.final_dir) > 0.5
    assert np.isfinite(result.history[0]["pg_loss"]) and np.isfinite(result.history[0]["loss"])


def test_stale_trajectory_is_refused(local_ray, tmp_path):
    cfg = tiny(tmp_path)
    train_set, _ = load_task(cfg.data.train, cfg.data.eval, cfg.data.num_train, cfg.data.num_eval, cfg.seed)
    roles = launch(cfg)
    try:
        prompts = train_set[: cfg.prompts_per_step]
        stale = roles.rollout[0].generate.remote(ray.put(prompts))
        assert ray.get(stale).policy_version == 0
        metrics = rl_step(cfg, roles, prompts)
        assert metrics["rollout/version"] == 1.0
        fresh = roles.rollout[0].generate.remote(ray.put(prompts))
        assert ray.get(fresh).policy_version == 1
        scored = roles.scorers[0].score.remote(stale)
        ref = roles.reference[0].logprobs.remote(stale)
        with pytest.raises(ray.exceptions.RayTaskError, match="StaleTrajectoryError"):
            ray.get(roles.learner[0].learn_parts.remote(stale, scored, ref))
    finally:
        roles.shutdown()
