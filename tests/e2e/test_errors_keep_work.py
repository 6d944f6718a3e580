"""An error inside a step (here a reward function that fails every retry) ends the run with a checkpoint
of the last finished step, and the same command resumes from it once the cause is fixed."""

import json
import time

import pytest

from rayrlhf.jobs.config.run import load_config
from rayrlhf.jobs.run import checkpoint
from rayrlhf.jobs.run.recovery import ScoreError
from rayrlhf.jobs.train import checkpoint_due, train

FLAKY = '''
import pathlib

FLAG = pathlib.Path(__file__).with_name("broken")
COUNT = pathlib.Path(__file__).with_name("calls")


def flaky(completions, **_):
    calls = int(COUNT.read_text()) + 1 if COUNT.exists() else 1
    COUNT.write_text(str(calls))
    if FLAG.exists() and calls >= 4:  # the evaluation before, steps 1 and 2 score; step 3 fails
        raise RuntimeError("the reward service is down")
    return [0.0 for _ in completions]
'''


def test_a_step_that_fails_leaves_the_last_finished_step_and_the_run_resumes(local_ray, tmp_path):
    (tmp_path / "flaky.py").write_text(FLAKY)
    (tmp_path / "broken").touch()
    cfg = load_config("tiny", [f"output_dir={tmp_path / 'run'}", "steps=3", "fault_tolerance.score_retries=0",
                               f"reward.functions=[{{path: '{tmp_path / 'flaky.py'}:flaky', weight: 0.0}}]"])
    with pytest.raises(ScoreError, match="the reward service is down"):
        train(cfg)
    saved = checkpoint.latest(tmp_path / "run")
    assert saved is not None and checkpoint.step_of(saved) == 2  # nothing was saved on schedule (every: 0)
    state = checkpoint.read(saved)[2]
    assert state["step"] == 2 and state["learner"]["version"] == 2
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in lines] == [0, 1, 2]

    (tmp_path / "broken").unlink()  # the cause is fixed: the same command continues after step 2
    result = train(cfg)
    assert [h["step"] for h in result.history] == [1, 2, 3]
    assert [row["step"] for row in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())
            ] == [0, 1, 2, 3, 3]


def test_checkpoints_are_due_by_steps_and_by_time():
    cfg = load_config("tiny", ["checkpoint.every=3", "checkpoint.every_minutes=2"])
    now = time.monotonic()
    assert checkpoint_due(cfg, 3, now) and checkpoint_due(cfg, 6, now)  # by steps
    assert not checkpoint_due(cfg, 4, now) and not checkpoint_due(cfg, 5, now - 119)
    assert checkpoint_due(cfg, 5, now - 121)  # by time since the last save
    off = load_config("tiny", ["checkpoint.every=0", "checkpoint.every_minutes=null"])
    assert not checkpoint_due(off, 3, now - 10**6)
    assert load_config("default").checkpoint.every_minutes == 30  # the default bounds what a death can lose
