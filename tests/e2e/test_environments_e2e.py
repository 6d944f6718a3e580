"""Multi-turn training end to end on the tiny model: calculator_tiny trains and evaluates with the
episode metrics logged; an environment that hangs past env.timeout_s, then dies, is restarted twice,
the interrupted work redone, and every planned sample trained once."""

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
    for name in ("env_reward", "env_success", "env_turns", "env_tool_calls", "env_invalid_calls"):
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
