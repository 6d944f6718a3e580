"""Run checkpoints and resume (jobs/run/checkpoint.py, jobs/run/state.py): real Ray, DeepSpeed, tiny model.

A run interrupted (SIGINT) after step k and resumed ends with the same per-step metrics and the
same final weights as the same run uninterrupted; a learner rank killed with SIGKILL mid-run is
restarted from the latest checkpoint and the run ends as if nothing happened; the CLI exits 130 on
SIGINT with a checkpoint and a rerun finishes the run.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import yaml
from safetensors.numpy import load_file

from rayrlhf.cluster.storage import Storage
from rayrlhf.jobs.run import checkpoint
from rayrlhf.jobs.run.checkpoint import Interrupted
from rayrlhf.jobs.cli import main
from rayrlhf.jobs.config.base import ConfigError
from rayrlhf.jobs.config.run import load_config
from rayrlhf.jobs.run.state import plan
from rayrlhf.jobs.data.sampler import PromptSampler
from rayrlhf.jobs.train import train
from tests.e2e.test_train_e2e import changed_fraction, generates

REPO = Path(__file__).resolve().parents[2]
VARYING = ("time/", "tokens_per_s", "learn_seconds")
"""Wall-clock metrics: the only ones allowed to differ between two runs of the same config."""


def tiny(out: Path, *overrides: str):
    return load_config("tiny", [f"output_dir={out}", "logging.tensorboard=false", *overrides])


def metric_rows(out: Path) -> list[dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if not k.startswith(VARYING)} for row in rows]


def assert_same_run(a: Path, b: Path, skip: tuple[str, ...] = (), from_step: int = 0) -> None:
    """Run b logged the same metrics as run a (from `from_step` on: b resumed a's checkpoint elsewhere) and ended
    with the same weights."""
    rows_a, rows_b = ([row for row in metric_rows(run) if row["step"] >= from_step] for run in (a, b))
    assert [r["step"] for r in rows_a] == [r["step"] for r in rows_b]
    for ra, rb in zip(rows_a, rows_b):
        keys = {k for k in ra if k not in skip}
        assert keys == {k for k in rb if k not in skip}, ra["step"]
        for key in keys:
            assert rb[key] == pytest.approx(ra[key], abs=1e-6, rel=1e-6), (ra["step"], key)
    wa, wb = load_file(str(a / "final" / "model.safetensors")), load_file(str(b / "final" / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for name in wa:
        np.testing.assert_allclose(wb[name], wa[name], atol=1e-6, rtol=0, err_msg=name)


def interrupt_at(k: int):
    """An on_step callback that sends this process SIGINT after step k, as Ctrl-C would."""
    def on_step(step: int, metrics: dict) -> None:
        if step == k:
            os.kill(os.getpid(), signal.SIGINT)
    return on_step


# --- no Ray ---------------------------------------------------------------------------------


def test_sampler_state_roundtrip_at_epoch_boundary():
    prompts = list(range(8))
    a = PromptSampler(prompts, seed=3)
    a.draw(8)  # exactly one epoch: the next draw reshuffles with the RNG
    state = json.loads(json.dumps(a.state_dict()))
    b = PromptSampler(prompts, seed=99)
    b.load_state_dict(state)
    assert state["order"] == []
    assert b.draw(12) == a.draw(12)


def test_checkpoint_files_atomic_keep_and_config_check(tmp_path):
    cfg = tiny(tmp_path, "save_every=2", "checkpoint.keep=2")
    assert cfg.checkpoint.every == 2  # the older spelling still works
    with pytest.raises(ConfigError, match="disagree"):
        tiny(tmp_path, "save_every=2", "checkpoint.every=3")

    def write_learner(location):
        folder = Path(location)
        folder.mkdir()
        (folder / "rank0").write_text("x")

    def broken_learner(folder):
        raise RuntimeError("a rank died while saving")

    for step in (2, 4, 6):
        checkpoint.write(tmp_path, step, cfg.model_dump(), {"step": step}, write_learner, {}, keep=2)
    with pytest.raises(RuntimeError):
        checkpoint.write(tmp_path, 8, cfg.model_dump(), {"step": 8}, broken_learner, {}, keep=2)
    assert [checkpoint.step_of(p) for p in checkpoint.complete(tmp_path)] == [4, 6]  # 8 never became one
    manifest, config, state = checkpoint.read(checkpoint.latest(tmp_path))
    assert manifest["step"] == 6 and state == {"step": 6} and config == cfg.model_dump()

    # resume planning: the latest complete one; a changed field refused by name; never forgets them
    assert plan(tiny(tmp_path, "save_every=2", "steps=9"), tmp_path, "auto").checkpoint == checkpoint.latest(tmp_path)
    assert plan(cfg, tmp_path, str(tmp_path / "checkpoints" / "step_000004")).checkpoint.name == "step_000004"
    with pytest.raises(ConfigError, match=r"differs from the checkpoint's in learner\.lr, seed"):
        plan(tiny(tmp_path, "learner.lr=0.5", "seed=1"), tmp_path, "auto")
    checkpoint.mark_finished(tmp_path, cfg.steps, cfg.model_dump())
    assert plan(cfg, tmp_path, "auto").finished_step == cfg.steps
    assert plan(cfg, tmp_path, "never").checkpoint is None and checkpoint.latest(tmp_path) is None

    other = tiny(tmp_path, "steps=9", "logging.wandb=offline", "reward.alpha=0.5", "learner.lr=0.1",
                 "rollout.num_cpus=1", "algorithm.name=ppo")
    assert checkpoint.changed_fields(cfg.model_dump(), other.model_dump()) == [
        "algorithm.name", "learner.lr", "reward.alpha"]


def test_a_checkpoint_of_an_older_format_is_refused_saying_what_to_do(tmp_path):
    """Format 1 kept a pipelined run's batch ahead as a pickle; this version never reads one."""
    cfg = tiny(tmp_path)
    path = checkpoint.write(tmp_path, 1, cfg.model_dump(), {"step": 1}, lambda loc: Path(loc).mkdir(), {}, keep=1)
    assert checkpoint.read(path)[0]["format"] == checkpoint.FORMAT == 2
    manifest = json.loads((path / "manifest.json").read_text())
    (path / "manifest.json").write_text(json.dumps({**manifest, "format": 1}))
    (path / "ahead.pkl").write_bytes(b"not to be unpickled")
    expected = r"format 1 was written by an older rayrlhf.*the rayrlhf version that wrote it.*--resume never"
    with pytest.raises(ConfigError, match=expected):  # the CLI prints a ConfigError and exits 2
        plan(cfg, tmp_path, "auto")
    with pytest.raises(ConfigError, match=expected):
        plan(cfg, tmp_path, str(path))
    assert plan(cfg, tmp_path, "never").checkpoint is None and checkpoint.latest(tmp_path) is None


def test_checkpoints_on_a_uri_complete_only_with_their_manifest(tmp_path):
    """A URI output_dir (file:// takes the road s3:// takes): the learner state goes straight to the
    bucket, the driver's files beside it, manifest last; a checkpoint cut off before its manifest is
    never taken by a rerun (which finds the others from the bucket alone) and is removed later."""
    bucket = Storage(f"file://{tmp_path}/bucket/run")
    cfg = tiny(bucket.location, "save_every=2", "checkpoint.keep=2")
    driver = tmp_path / "driver"  # the first driver's local copy

    def write_learner(location):  # what each rank does from its own node
        with Storage(location).writable_dir() as folder:
            (folder / "rank0").write_text("x")

    def dies_before_the_manifest(location):
        write_learner(location)
        raise RuntimeError("the driver died while saving")

    for step in (2, 4, 6):
        checkpoint.write(driver, step, cfg.model_dump(), {"step": step}, write_learner, {}, keep=2, remote=bucket)
    with pytest.raises(RuntimeError):
        checkpoint.write(driver, 8, cfg.model_dump(), {"step": 8}, dies_before_the_manifest, {}, keep=2, remote=bucket)
    stored = tmp_path / "bucket" / "run" / "checkpoints"
    assert sorted(p.name for p in stored.iterdir()) == ["step_000004", "step_000006", "step_000008"]
    assert (stored / "step_000008" / "learner" / "rank0").is_file() and not (stored / "step_000008" / "manifest.json").exists()

    rerun = tmp_path / "rerun"  # another driver, on another machine: only the bucket
    checkpoint.mirror(bucket, rerun)
    assert not list(rerun.glob("checkpoints/*/learner"))  # the learner state stays in the bucket
    start = plan(tiny(bucket.location, "save_every=2", "steps=9"), rerun, "auto", bucket)
    assert start.checkpoint == rerun / "checkpoints" / "step_000006"
    assert checkpoint.learner_location(start.checkpoint, rerun, bucket) == bucket.join("checkpoints", "step_000006", "learner")
    with Storage(checkpoint.learner_location(start.checkpoint, rerun, bucket)).readable_dir() as folder:
        assert (folder / "rank0").read_text() == "x"
    checkpoint.write(rerun, 8, cfg.model_dump(), {"step": 8}, write_learner, {}, keep=2, remote=bucket)
    assert sorted(p.name for p in stored.iterdir()) == ["step_000006", "step_000008"]
    assert json.loads((stored / "step_000008" / "manifest.json").read_text())["step"] == 8
    plan(cfg, rerun, "never", bucket)
    assert not stored.exists()


# --- real Ray -------------------------------------------------------------------------------


def _wait_for(predicate, proc, timeout: float) -> None:
    deadline = time.time() + timeout
    while not predicate() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)


def test_cli_sigint_writes_a_checkpoint_and_a_rerun_finishes(tmp_path, request, capsys):
    """Also the quiet console: the workers' output goes to the run's workers.log, not the console, and
    the finished run ends with where its results are."""
    # first in the file: its own Ray in a subprocess, before the module's Ray starts
    out = tmp_path / "run"
    args = ["train", "--config", "tiny", "--set", f"output_dir={out}", "--set", "steps=5",
            "--set", "logging.tensorboard=false", "--set", "kl.coef=0"]  # no reference actor to start
    log = tmp_path / "first.log"
    with open(log, "w") as sink:
        proc = subprocess.Popen([sys.executable, "-m", "rayrlhf.jobs.cli", *args], cwd=REPO,
                                stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        metrics = out / "metrics.jsonl"
        steps_done = lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 2  # noqa: E731
        _wait_for(steps_done, proc, 300)
        assert steps_done(), log.read_text()[-3000:]
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=120) == 130, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    saved = checkpoint.latest(out)
    assert saved is not None and 1 <= checkpoint.step_of(saved) < 5, log.read_text()[-3000:]
    assert not (out / "final").exists()
    worker_line = re.compile(r"^\((RolloutWorker|ReferencePolicy|RewardScorer|Learner) pid=\d+\) ", re.M)
    assert worker_line.search((out / "workers.log").read_text())  # e.g. their model loading
    assert not worker_line.search(log.read_text()) and "pid=" not in log.read_text(), log.read_text()[-3000:]

    request.getfixturevalue("local_ray")  # the module's Ray from here on, for the reruns in this process
    assert main([*args, "--set", "learner.lr=0.5"]) == 2  # a changed field is refused, by name
    capsys.readouterr()
    assert main(args) == 0
    console = capsys.readouterr().out
    assert "held-out metric" in console and "what you have:" in console
    for place in (out / "final", out / "metrics.jsonl", out / "workers.log", f"rayrlhf serve --model {out / 'final'}"):
        assert str(place) in console.split("what you have:")[1], console[-2000:]
    steps = [row["step"] for row in metric_rows(out)]
    assert steps == [0, 1, 2, 3, 4, 5, 5]  # the eval before, five steps, the eval after
    assert (out / "final" / "model.safetensors").exists()
    assert main(args) == 0  # already finished: says so, trains nothing
    assert [row["step"] for row in metric_rows(out)] == steps


GRPO_ZERO2 = ("learner.num_ranks=2", "learner.zero_stage=2", "steps=3", "data.num_train=8", "kl.coef=0")
"""8 prompts, 4 per step: the sampler's first epoch ends exactly at step 2. No KL term (no reference
actor to start in each run): the PPO test below resumes one."""


@pytest.fixture(scope="module")
def grpo_reference(local_ray, tmp_path_factory):
    out = tmp_path_factory.mktemp("grpo") / "uninterrupted"
    train(tiny(out, *GRPO_ZERO2))
    return out


def _learner_pids() -> list[int]:
    mine = psutil.Process().children(recursive=True)
    return [p.pid for p in mine if p.is_running() and " ".join(p.cmdline()).startswith("ray::Learner")]


def test_killed_learner_rank_restarts_from_checkpoint(grpo_reference, tmp_path):
    out = tmp_path / "run"
    killed = []

    def kill_one_rank(step, metrics):
        if step == 2:
            pids = _learner_pids()
            assert len(pids) == 2, pids
            os.kill(max(pids), signal.SIGKILL)
            killed.append(max(pids))

    result = train(tiny(out, *GRPO_ZERO2, "checkpoint.every=1"), on_step=kill_one_rank)
    assert killed and not psutil.pid_exists(killed[0])
    assert [h["step"] for h in result.history] == [1, 2, 3]
    assert [h["restarts/learner"] for h in result.history] == [0.0, 0.0, 1.0]
    # restarted from step 2's checkpoint, the run ends exactly as the uninterrupted one
    assert_same_run(grpo_reference, out, skip=("restarts/learner",))


def test_ppo_two_rank_zero3_adaptive_kl_trains_and_resumes_exactly(local_ray, tmp_path):
    """The PPO job itself (the uninterrupted run: its value head, the KL controller, a policy that
    generates), and a run resumed from the checkpoint it wrote after step 1 that ends the same. (The
    signal that writes such a checkpoint is the GRPO and CLI tests' own: the save is the same.)"""
    # packed rows of ~32 tokens and the LM head 8 positions at a time (recomputed in backward under ZeRO-3)
    setting = ("learner.num_ranks=2", "learner.zero_stage=3", "algorithm.name=ppo", "kl.adaptive=true",
               "kl.horizon=10", "steps=2", "learner.packing=true", "learner.pack_tokens=32", "learner.logits_chunk=8",
               "checkpoint.every=1")
    reference, out = tmp_path / "uninterrupted", tmp_path / "run"
    cfg = tiny(reference, *setting)
    result = train(cfg)
    assert changed_fraction(result.final_dir) > 0.5
    first, last = result.history
    assert np.isfinite(last["value_loss"]) and last["value_loss"] > 0
    assert first["kl_coef"] != cfg.kl.coef or last["kl_coef"] != first["kl_coef"]  # the controller moved
    generates(result.final_dir)

    saved = checkpoint.at_step(reference, 1)
    _, _, state = checkpoint.read(saved)
    assert state["learner"]["kl_coef"] != 0.05  # the adaptive coefficient moved and was saved
    assert yaml.safe_load((saved / "config.yaml").read_text())["algorithm"]["name"] == "ppo"
    resumed = train(tiny(out, *setting), resume=saved)
    assert [h["step"] for h in resumed.history] == [2]  # this output_dir's: step 1 is in the other's metrics
    assert_same_run(reference, out, from_step=2)


def test_grpo_zero2_resume_at_epoch_boundary_from_a_uri_output_dir_is_exact(grpo_reference, tmp_path):
    """Interrupted where the sampler's epoch ends (step 2), the resumed run trains step 3, not 0 steps.
    output_dir as a URI: each rank uploads its DeepSpeed state to the bucket, the rerun (a fresh
    driver copy) finds the checkpoint there, each rank downloads it, and the run ends exactly as the
    uninterrupted one on a local path. (A local checkpoint of the same run is reloaded by
    test_killed_learner_rank_restarts_from_checkpoint, and rerun by the CLI and PPO tests.)"""
    bucket = tmp_path / "bucket" / "run"
    cfg = tiny(f"file://{bucket}", *GRPO_ZERO2)
    with pytest.raises(Interrupted) as stopped:
        train(cfg, on_step=interrupt_at(2))
    assert stopped.value.exit_code == 130
    assert checkpoint.step_of(stopped.value.checkpoint) == 2
    saved = bucket / "checkpoints" / "step_000002"
    assert (saved / "manifest.json").is_file()
    assert checkpoint.read(saved)[2]["sampler"]["order"] == []  # the epoch ended exactly here
    assert len(list((saved / "learner" / "state").glob("*optim_states.pt"))) == 2  # one per rank
    assert not (bucket / "final").exists()

    result = train(cfg)
    assert result.output_dir == f"file://{bucket}" and result.final_dir == f"file://{bucket}/final"
    assert [h["step"] for h in result.history] == [1, 2, 3]  # resumed: step 3 only was trained here
    assert_same_run(grpo_reference, bucket)
    assert [h["step"] for h in train(cfg).history] == [1, 2, 3]  # finished: found so in the bucket, nothing trained
