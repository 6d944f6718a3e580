"""Multi-turn training end to end on the tiny model: calculator_tiny trains and evaluates with the
episode metrics logged; an environment that hangs past env.timeout_s, then dies, is restarted twice,
the interrupted work redone, and every planned sample trained once."""

from pathlib import Path

from rayrlhf.jobs.config.run import load_config
from rayrlhf.jobs.train import train

FAULTY = """
import os, time
from pathlib import Path

class Faulty:
    \"\"\"Hangs on its first reset, dies on its second (a file counts them); then a two-turn game.\"\"\"
    def reset(self, row, seed):
        marker = Path({marker!r})
        failures = len(marker.read_text()) if marker.exists() else 0
        if failures < 2:
            marker.write_text("x" * (failures + 1))
            time.sleep(60) if failures == 0 else os._exit(1)
        self.turns = 0
        return [{{"role": "user", "content": "Say a number."}}]

    def step(self, assistant):
        self.turns += 1
        return [{{"role": "user", "content": "Again."}}], float(self.turns == 2), self.turns == 2
"""


def test_calculator_tiny_trains_with_episode_metrics_in_steps_and_evaluations(local_ray, tmp_path):
    cfg = load_config("calculator_tiny", [f"output_dir={tmp_path / 'run'}", "steps=1"])
    result = train(cfg)
    step = result.history[0]
    for name in ("env_reward", "env_success", "env_turns", "env_tool_calls", "env_invalid_calls", "env_cut"):
        assert f"reward/{name}" in step and f"eval/{name}" in result.after
    assert 1.0 <= step["reward/env_turns"] <= cfg.env.max_turns
    assert 0.0 <= result.after["eval/env_success"] <= 1.0
    assert result.trained_samples == [sorted(result.trained_samples[0])] and len(result.trained_samples[0]) == 4


def test_a_hung_then_a_dead_environment_is_restarted_and_its_rollout_redone(local_ray, tmp_path):
    (tmp_path / "faulty.py").write_text(FAULTY.format(marker=str(tmp_path / "failures")))
    cfg = load_config("guess_number_tiny", [
        f"output_dir={tmp_path / 'run'}", "steps=1", f"env.path={tmp_path / 'faulty.py'}:Faulty", "env.timeout_s=5",
        "env.max_turns=2",
    ])  # fmt: skip
    result = train(cfg)  # the evaluation before training meets both faults
    assert (tmp_path / "failures").read_text() == "xx"
    step = result.history[0]
    assert step["faults/restarts/env"] == 2.0 and step["faults/redone"] == 2.0
    assert len(result.trained_samples[0]) == 4 and step["reward/env_turns"] <= 2.0


SCRIPTED = Path(__file__).parents[1] / "scripted_env.py"


def test_episodes_alternate_rollout_workers_and_environment_actors(local_ray):
    """The driver's turn loop on Ray: two turns per episode, the environment's ids between the two
    replies exactly as the template renders them, masked out, and the per-turn rewards summed."""
    import numpy as np
    import ray
    from transformers import AutoTokenizer

    from rayrlhf.actors.runtime.models import resolve_policy
    from rayrlhf.jobs.data.prompts import load_task
    from rayrlhf.jobs.run.pipeline import shards
    from rayrlhf.jobs.run.recovery import Recovery
    from rayrlhf.jobs.run.roles import launch

    cfg = load_config("guess_number_tiny", [f"env.path={SCRIPTED}:Scripted", "rollout.max_new_tokens=8"])
    tok = AutoTokenizer.from_pretrained(resolve_policy("tiny-gpt2"))
    roles = launch(cfg, only=("rollout", "env"))
    try:
        newline = tok("\n", add_special_tokens=False).input_ids  # what ChatML writes after <|im_end|>
        ends = [i for i in range(600) if i not in newline]  # a random model: a third of its ids end a reply
        ray.get(roles.rollout[0].__ray_call__.remote(lambda worker: setattr(worker, "eos_ids", ends)))
        recovery = Recovery(roles, cfg.fault_tolerance)
        prompts = load_task(cfg.data.train, None, cfg.data.num_train, cfg.data.num_eval, cfg.seed)[0][:2]
        refs = roles.episodes.play(roles.rollout, roles.envs, shards(prompts, 1), recovery.version,
                                   recovery.environment)
        traj = ray.get(refs[0])
    finally:
        roles.shutdown()
    tool = tok("\n<|im_start|>tool\n7<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False).input_ids
    assert len(traj) == 4 and list(traj.sample_ids) == [0, 1, 2, 3]
    for i in range(len(traj)):
        if traj.extras[i]["env_turns"] < 2:  # a first reply cut at its budget ends the episode
            assert traj.truncated[i] and traj.extras[i]["env_reward"] == 0.0
            continue
        assert traj.extras[i]["env_reward"] == 1.25 and not traj.truncated[i]
        real = traj.attention_mask[i] == 1
        ids, mask = traj.input_ids[i][real], traj.response_mask[i][real]
        first = int(np.argmax(mask))  # the first sampled id
        masked_after = ids[first:][mask[first:] == 0].tolist()
        assert masked_after == tool  # the environment's ids: masked, exactly the template's
    assert any(e["env_turns"] == 2 for e in traj.extras)
