"""DAPO's dynamic sampling end to end on the tiny model (ray_configs/math_tiny.yaml, pipelined): a reward
that is constant for every prompt with an odd answer, so those groups must never be trained, the
batch is refilled from further prompts, the counts are logged, and the sampler's checkpointed state
counts every prompt drawn (so a resumed run draws the same ones). One run, ~40 s."""

import json

from rayrlhf.jobs.config.run import load_config
from rayrlhf.jobs.data.prompts import load_task
from rayrlhf.jobs.data.sampler import PromptSampler
from rayrlhf.jobs.run import checkpoint
from rayrlhf.jobs.train import train

REWARD = '''
def parity(completions, answer, **kwargs):
    """0 for every answer to a prompt whose answer is odd (a constant group); else the completion's length parity."""
    return [0.0 if value % 2 else float(len(text) % 2) for text, value in zip(completions, answer)]
'''
KEYS = ("dynamic_sampling/draws", "dynamic_sampling/prompts_drawn", "dynamic_sampling/kept_frac",
        "dynamic_sampling/groups_kept")  # fmt: skip


def test_constant_groups_are_dropped_and_refilled(local_ray, tmp_path):
    (tmp_path / "rewards.py").write_text(REWARD)
    cfg = load_config("math_tiny", [
        f"output_dir={tmp_path / 'run'}", "steps=3", "kl.coef=0", "learner.zero_stage=0", "reward.beta=0",
        "reward.overlong_penalty=0", "reward.truncation=keep",  # length must not make an odd-answer group vary
        f"reward.functions=[{{path: '{tmp_path / 'rewards.py'}:parity', weight: 1.0}}]",
        "algorithm.dynamic_sampling={enabled: true, max_draws: 4}", "pipeline.max_staleness=1", "checkpoint.every=1",
    ])  # fmt: skip
    result = train(cfg)

    train_set, _ = load_task(cfg.data.train, cfg.data.eval, cfg.data.num_train, cfg.data.num_eval, cfg.seed)
    odd = {p.id for p in train_set if p.extra["answer"] % 2}
    assert 0 < len(odd) < len(train_set)
    k = cfg.rollout.samples_per_prompt
    for step, trained in zip(result.history, result.trained_samples):
        assert all(step[key] > 0 for key in KEYS), step
        assert step["dynamic_sampling/groups_kept"] == cfg.prompts_per_step  # never at the limit here
        assert {i // k for i in trained}.isdisjoint(odd)  # kept groups are never constant
        assert len(trained) == cfg.prompts_per_step * k
    assert max(step["dynamic_sampling/draws"] for step in result.history) > 1
    assert min(step["dynamic_sampling/kept_frac"] for step in result.history) < 1

    # logged in metrics.jsonl (and so on the console and wandb: the same tracker)
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(key in line for line in lines[1:-1] for key in KEYS)

    # the checkpointed sampler counts every prompt drawn: replaying that many draws gives its state
    drawn = sum(int(step["dynamic_sampling/prompts_drawn"]) for step in result.history)
    replay = PromptSampler(train_set, cfg.seed)
    replay.draw(drawn)
    saved = checkpoint.read(checkpoint.latest(tmp_path / "run"))[2]["sampler"]
    assert saved == replay.state_dict() and drawn > cfg.steps * cfg.prompts_per_step
