"""Multi-turn training end to end on the tiny model: calculator_tiny trains and evaluates with the
episode metrics logged; an environment that hangs past env.timeout_s and one whose process dies are
restarted, their rollout redone, and every planned sample trained once."""

import pytest

from rayrlhf.jobs.config.run import load_config
from rayrlhf.jobs.train import train

FAULTY = '''
import os, time
from pathlib import Path

class Faulty:
    """Fails once (the marker file says whether it has): {how}; then a two-turn game."""
    def reset(self, row, seed):
        marker = Path({marker!r})
        if not marker.exists():
            marker.write_text("failed once")
            {how}
        self.turns = 0
        return [{{"role": "user", "content": "Say a number."}}]

    def step(self, assistant):
        self.turns += 1
        return [{{"role": "user", "content": "Again."}}], float(self.turns == 2), self.turns == 2
'''


def test_calculator_tiny_trains_with_episode_metrics_in_steps_and_evaluations(local_ray, tmp_path):
    cfg = load_config("calculator_tiny", [f"output_dir={tmp_path / 'run'}", "steps=1"])
    result = train(cfg)
    step = result.history[0]
    for name in ("env_reward", "env_success", "env_turns", "env_tool_calls", "env_invalid_calls"):
        assert f"reward/{name}" in step and f"eval/{name}" in result.after
    assert 1.0 <= step["reward/env_turns"] <= cfg.env.max_turns
    assert 0.0 <= result.after["eval/env_success"] <= 1.0
    assert result.trained_samples == [sorted(result.trained_samples[0])] and len(result.trained_samples[0]) == 4


@pytest.mark.parametrize("how", ["time.sleep(60)", "os._exit(1)"], ids=["hangs", "dies"])
def test_a_hung_or_dead_environment_is_restarted_and_its_rollout_redone(local_ray, tmp_path, how):
    (tmp_path / "faulty.py").write_text(FAULTY.format(how=how, marker=str(tmp_path / "failed")))
    cfg = load_config("guess_number_tiny", [
        f"output_dir={tmp_path / 'run'}", "steps=1", f"env.path={tmp_path / 'faulty.py'}:Faulty", "env.timeout_s=5",
        "env.max_turns=2",
    ])  # fmt: skip
    result = train(cfg)
    step = result.history[0]
    assert (tmp_path / "failed").exists()
    assert step["faults/restarts/env"] == 1.0 and step["faults/redone"] >= 1.0
    assert len(result.trained_samples[0]) == 4
    assert step["reward/env_turns"] <= 2.0
