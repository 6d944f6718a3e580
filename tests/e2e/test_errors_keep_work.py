"""An error inside a step (here a reward function that fails every retry) ends the run with a checkpoint
of the last finished step, and the same command resumes from it once the cause is fixed; so does a
SIGTERM whose grace period cannot cover the step it comes in (here one that hangs in scoring)."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rayrlhf.jobs.config.run import load_config
from rayrlhf.jobs.run import checkpoint
from rayrlhf.jobs.run.recovery import ScoreError
from rayrlhf.jobs.run.stop import grace_period, last_moment
from rayrlhf.jobs.train import checkpoint_due, train
from tests.e2e.test_recovery import planned

REPO = Path(__file__).resolve().parents[2]

FLAKY = '''
import pathlib
import time

HERE = pathlib.Path(__file__).parent


def flaky(completions, **_):
    """Fails from its 4th call while a file `broken` is beside it, hangs at its 3rd while `hang` is."""
    count = HERE / "calls"
    calls = int(count.read_text()) + 1 if count.exists() else 1
    count.write_text(str(calls))
    if (HERE / "hang").exists() and calls == 3:  # the evaluation before and step 1 score; step 2 hangs
        (HERE / "hanging").touch()
        time.sleep(600)
    if (HERE / "broken").exists() and calls >= 4:  # the evaluation before, steps 1 and 2 score; step 3 fails
        raise RuntimeError("the reward service is down")
    return [0.0 for _ in completions]
'''


def test_a_sigterm_whose_grace_cannot_cover_the_step_abandons_it_and_saves_the_one_before(tmp_path, request):
    """As Ray's job supervisor stops a job: SIGTERM, then SIGKILL after the job's RAY_JOB_STOP_WAIT_TIME_S;
    the SIGTERM goes to the driver's whole process group, as a scheduler signals a job (the local Ray's
    processes started by the driver are outside it: cluster/local.py). Step 2 hangs in scoring (as a
    slow step would): the driver abandons it in time, saves step 1 with the learner untouched and exits
    143; the same command then trains steps 2 and 3, each sample once."""
    # first in the file: its own Ray in a subprocess, before the module's Ray starts
    grace = 15  # mostly waited out (less the 5 s margin) before the hung step is abandoned
    (tmp_path / "flaky.py").write_text(FLAKY)
    (tmp_path / "hang").touch()
    out = tmp_path / "run"
    overrides = [f"output_dir={out}", "steps=3", "logging.tensorboard=false", "kl.coef=0",
                 f"reward.functions=[{{path: '{tmp_path / 'flaky.py'}:flaky', weight: 0.0}}]"]
    cli = [sys.executable, "-m", "rayrlhf.jobs.cli", "train", "--config", "tiny",
           *(arg for override in overrides for arg in ("--set", override))]
    log = tmp_path / "driver.log"
    with open(log, "w") as sink:
        proc = subprocess.Popen(cli, cwd=REPO, env={**os.environ, "RAY_JOB_STOP_WAIT_TIME_S": str(grace)},
                                stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 300
        while not (tmp_path / "hanging").exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        assert (tmp_path / "hanging").exists(), log.read_text()[-3000:]
        os.killpg(proc.pid, signal.SIGTERM)  # its own session: the group is the driver's
        try:
            code = proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            code = None  # the SIGKILL of the finally block, as the supervisor sends it
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    # The promise is the checkpoint before the SIGKILL; the exit itself (Ray's shutdown after the save)
    # may still be under way when a loaded machine's supervisor kills the driver.
    assert code in (143, None), log.read_text()[-3000:]
    saved = checkpoint.latest(out)
    assert saved is not None and checkpoint.step_of(saved) == 1
    assert checkpoint.read(saved)[2]["learner"]["version"] == 1  # the learner never started step 2
    assert f"step 2 could not end and be saved within the {grace} s a SIGTERM leaves, so it was abandoned" in \
        log.read_text()

    (tmp_path / "hang").unlink()
    request.getfixturevalue("local_ray")  # the module's Ray from here on
    cfg = load_config("tiny", overrides)
    result = train(cfg)
    assert [h["step"] for h in result.history] == [1, 2, 3]
    assert [sorted(ids) for ids in result.trained_samples] == planned(cfg)[1:]  # none lost, none twice
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [0, 1, 2, 3, 3]


def test_the_local_rays_processes_are_outside_the_drivers_process_group(local_ray):
    """What lets the driver above save after a SIGTERM to its group: none of the processes its Ray
    started (GCS, raylet, workers) shares its process group."""
    import psutil

    started = [p for p in psutil.Process().children(recursive=True) if p.name() in ("gcs_server", "raylet")]
    assert {p.name() for p in started} == {"gcs_server", "raylet"}
    assert os.getpgid(0) not in {os.getpgid(p.pid) for p in psutil.Process().children(recursive=True)}


def test_the_grace_period_and_the_last_moment_to_abandon_a_step():
    assert grace_period(12.0, {"RAY_JOB_STOP_WAIT_TIME_S": "300"}) == 12.0  # checkpoint.stop_grace_s first
    assert grace_period(None, {"RAY_JOB_STOP_WAIT_TIME_S": "300"}) == 300.0  # the job's, as submit sets it
    assert grace_period(None, {}) is None and grace_period(None, {"RAY_JOB_STOP_WAIT_TIME_S": "x"}) is None
    step = {"time/step": 10.0, "time/learn": 4.0, "time/sync": 1.0}
    assert last_moment(100.0, 80.0, step, save_s=6.0) == 100.0 - 5.0 - 6.0 - 8.0  # learn, sync, save, 10% margin
    assert last_moment(100.0, 80.0, step, save_s=None) == 100.0 - 5.0 - 10.0 - 8.0  # an untimed save: a step
    assert last_moment(100.0, 30.0, step, save_s=6.0) == 100.0 - 5.0 - 6.0 - 5.0  # the margin's 5 s floor
    assert last_moment(100.0, 30.0, None, save_s=6.0) == -math.inf  # nothing to go by: at once



def test_a_step_that_fails_leaves_the_last_finished_step_and_the_run_resumes(local_ray, tmp_path):
    (tmp_path / "flaky.py").write_text(FLAKY)
    (tmp_path / "broken").touch()
    cfg = load_config("tiny", [f"output_dir={tmp_path / 'run'}", "steps=3", "fault_tolerance.score_retries=0",
                               "kl.coef=0", f"reward.functions=[{{path: '{tmp_path / 'flaky.py'}:flaky', weight: 0.0}}]"])
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
