"""DAPO's dynamic sampling, Ray-free: which groups a step keeps, the shards it rebuilds, the draw loop
(jobs/run/dynamic_sampling.py), on hand-made rewards."""

import numpy as np
import pytest
from pydantic import ValidationError

from rayrlhf.actors.rl.trajectory import LearnerBatch, Rewards, Trajectory
from rayrlhf.jobs.config.run import RunConfig
from rayrlhf.jobs.run import dynamic_sampling
from rayrlhf.jobs.run.dynamic_sampling import choose, regroup, varied_groups
from rayrlhf.jobs.run.pipeline import Experience


def test_varied_groups_are_those_whose_rewards_differ():
    scores = np.array([1, 1, 1, 0, 1, 0, 0.5, 0.5, 0.5, 2, 2, 2.000001], np.float32)
    assert varied_groups(scores, 3).tolist() == [False, True, False, True]


@pytest.mark.parametrize("varied, needed, groups, in_loss", [
    # enough: the first two varied groups; the third (group 4) is surplus, dropped
    ("FTTF TTFF", 2, [1, 2], [1, 1]),
    # at the limit with two kept: those, then the two latest constant groups, out of the loss
    ("FTFF FFFT", 4, [1, 7, 5, 6], [1, 1, 0, 0]),
    # nothing kept: the last draw as it is
    ("FFFF FFFF", 4, [4, 5, 6, 7], [1, 1, 1, 1]),
    ("TTTT", 4, [0, 1, 2, 3], [1, 1, 1, 1]),
])  # fmt: skip
def test_choose(varied, needed, groups, in_loss):
    flags = np.array([c == "T" for c in varied.replace(" ", "")])
    got_groups, got_in_loss = choose(flags, needed)
    assert got_groups.tolist() == groups and got_in_loss.tolist() == [bool(x) for x in in_loss]


def test_groups_in_the_loss_are_never_constant_unless_none_varied():
    rng = np.random.default_rng(0)
    for _ in range(200):
        needed = int(rng.integers(1, 5))
        flags = rng.random(needed * int(rng.integers(1, 4))) < rng.random()
        groups, in_loss = choose(flags, needed)
        assert len(groups) == needed == len(set(groups.tolist()))
        assert flags[groups[in_loss]].all() or not flags.any()


def draw(first_prompt: int, width: int, scores: list[float], k: int = 2) -> tuple[Trajectory, Rewards, np.ndarray]:
    """One shard: len(scores) / k prompts from first_prompt on, k rows each, responses of width - 1 tokens."""
    b = len(scores)
    group_ids = np.repeat(np.arange(first_prompt, first_prompt + b // k), k)
    mask = np.zeros((b, width), np.float32)
    mask[:, 1:] = 1
    traj = Trajectory(input_ids=np.arange(b * width).reshape(b, width), attention_mask=np.ones((b, width), np.int64),
                      response_mask=mask, old_logprobs=-mask, group_ids=group_ids,
                      sample_ids=group_ids * k + np.tile(np.arange(k), b // k), policy_version=3,
                      responses=[f"r{i}" for i in group_ids], truncated=np.zeros(b, bool),
                      max_new_tokens=width)  # fmt: skip
    total = np.array(scores, np.float32)
    rewards = Rewards(total, total + 10, {"match": total}, info={"length_ratio": total * 2})
    return traj, rewards, np.full((b, width), -2.0, np.float32)


def test_regroup_keeps_the_chosen_groups_in_order_and_masks_the_filler():
    # draw 0: prompts 0, 1 (constant, varied), width 3; draw 1: prompts 2, 3 (varied, constant), width 5
    parts = [draw(0, 3, [1, 1, 0, 1]), draw(2, 5, [0, 1, 0, 0])]
    groups, in_loss = np.array([1, 2, 3]), np.array([True, True, False])  # two kept, prompt 3 fills
    shards = regroup(*map(list, zip(*parts)), groups, in_loss, group_size=2, shards=3)
    assert [s[0].group_ids.tolist() for s in shards] == [[1, 1], [2, 2], [3, 3]]
    assert [s[1].total.tolist() for s in shards] == [[0, 1], [0, 1], [0, 0]]
    assert [s[1].loss_mask.tolist() for s in shards] == [[1, 1], [1, 1], [0, 0]]
    assert shards[0][1].components["match"].tolist() == [0, 1] and shards[0][1].info["length_ratio"].tolist() == [0, 2]
    assert shards[0][1].raw_total.tolist() == [10, 11] and shards[1][0].responses == ["r2", "r2"]
    # joined to the widest draw, reference log-probs padded alike: the learner joins them as it would the draws
    for traj, _, ref in shards:
        assert traj.input_ids.shape == ref.shape == (2, 5) and traj.policy_version == 3
    assert shards[0][0].response_mask[:, 3:].sum() == 0 and (shards[0][2][:, 3:] == 0).all()
    batch = LearnerBatch.join([s[0] for s in shards], [s[1] for s in shards], [s[2] for s in shards])
    assert batch.loss_mask.tolist() == [1, 1, 1, 1, 0, 0] and batch.trajectory.sample_ids.tolist() == [2, 3, 4, 5, 6, 7]


def run_refill(monkeypatch, draws_scores: list[list[float]], max_draws: int, ranks: int = 1):
    """refill over hand-made draws of 2 prompts x 2 samples, the object store replaced by the objects themselves."""
    monkeypatch.setattr(dynamic_sampling.ray, "get", lambda refs: refs)
    monkeypatch.setattr(dynamic_sampling.ray, "put", lambda value: value)
    cfg = RunConfig(prompts_per_step=2, rollout={"samples_per_prompt": 2},
                    algorithm={"dynamic_sampling": {"enabled": True, "max_draws": max_draws}})  # fmt: skip
    made, lines = [], []

    def collect_draw() -> Experience:
        traj, rewards, ref = draw(2 * len(made), 3, draws_scores[len(made)])
        made.append(traj)
        return Experience([traj], [rewards], [rewards], [ref], {"time/generate": 1.0})

    return dynamic_sampling.refill(collect_draw, cfg, ranks, lines.append), made, lines


def test_refill_draws_until_the_batch_is_full(monkeypatch):
    # draw 0 keeps prompt 1; draw 1 keeps prompt 2 (and 3, surplus, dropped); no third draw
    experience, made, lines = run_refill(monkeypatch, [[1, 1, 0, 1], [0, 1, 1, 0], [0, 1, 0, 1]], max_draws=3, ranks=2)
    assert len(made) == 2 and not lines
    assert [t.group_ids.tolist() for t in experience.trajectories] == [[1, 1], [2, 2]]
    assert experience.times == {"time/generate": 2.0, "dynamic_sampling/draws": 2.0,
                                "dynamic_sampling/prompts_drawn": 4.0, "dynamic_sampling/kept_frac": 0.75,
                                "dynamic_sampling/groups_kept": 2.0}  # fmt: skip
    assert experience.rewards is not None and experience.reward_refs == experience.rewards


def test_refill_at_the_limit_trains_what_it_kept_and_never_an_empty_step(monkeypatch):
    experience, made, lines = run_refill(monkeypatch, [[1, 1, 0, 1], [0, 0, 1, 1]], max_draws=2)
    assert len(made) == 2 and experience.trajectories[0].group_ids.tolist() == [1, 1, 3, 3]
    assert experience.rewards[0].loss_mask.tolist() == [1, 1, 0, 0]
    assert experience.times["dynamic_sampling/groups_kept"] == 1.0 and "1 of 2 groups" in lines[0]
    experience, made, lines = run_refill(monkeypatch, [[1, 1, 0, 0], [0, 0, 1, 1]], max_draws=2)
    assert experience.trajectories[0].group_ids.tolist() == [2, 2, 3, 3]  # the last draw, every row in the loss
    assert experience.rewards[0].loss_mask.tolist() == [1, 1, 1, 1] and "the last draw" in lines[0]
    assert experience.times["dynamic_sampling/kept_frac"] == 0.0


def test_a_full_first_draw_is_passed_on_untouched(monkeypatch):
    experience, made, _ = run_refill(monkeypatch, [[1, 0, 0, 1]], max_draws=3)
    assert experience.trajectories == made and experience.times["dynamic_sampling/kept_frac"] == 1.0


def test_config_checks():
    assert RunConfig().algorithm.dynamic_sampling.enabled is False
    with pytest.raises(ValidationError, match="group-relative"):
        RunConfig(algorithm={"name": "ppo", "dynamic_sampling": {"enabled": True}})
    with pytest.raises(ValidationError, match="samples_per_prompt >= 2"):
        RunConfig(rollout={"samples_per_prompt": 1},
                  algorithm={"name": "reinforce", "dynamic_sampling": {"enabled": True}})
    with pytest.raises(ValidationError):
        RunConfig(algorithm={"dynamic_sampling": {"enabled": True, "max_draws": 0}})


def test_math_dapo_is_math_plus_dapos_three_changes():
    from rayrlhf.jobs.config.run import load_config

    math, dapo = load_config("math").model_dump(), load_config("math_dapo").model_dump()
    assert dapo["algorithm"]["dynamic_sampling"] == {"enabled": True, "max_draws": 3}
    assert (dapo["algorithm"]["clip_eps_low"], dapo["algorithm"]["clip_eps_high"]) == (0.2, 0.28)
    assert dapo["algorithm"]["loss_aggregation"] == "token-mean"
    for cfg in (math, dapo):
        for key in ("dynamic_sampling", "clip_eps_low", "clip_eps_high", "loss_aggregation"):
            del cfg["algorithm"][key]
        del cfg["name"], cfg["output_dir"]
    assert math == dapo
