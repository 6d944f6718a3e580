"""`rayrlhf tune`: the schema, trial placement, and a real Ray Tune search of real trials.

The search (2 grid points, tiny model) is started through the CLI in a subprocess, interrupted
with SIGINT once its first trial has finished, and resumed in-process with Tuner.restore.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import matplotlib.image
import pytest
import ray
import yaml
from ray import tune
from ray.util.placement_group import placement_group_table

from rayrlhf.cluster.local import shutdown_ray
from rayrlhf.jobs.config.base import CONFIG_DIR, ConfigError
from rayrlhf.jobs.config.run import load_config
from rayrlhf.jobs.config.tune import SearchConfig, SimplexSpec, load_tune_config
from rayrlhf.jobs.train import train
from rayrlhf.jobs.tune import reports_per_trial, trial_resources, tune_weights

REPO = Path(__file__).resolve().parents[2]
ROLE_GROUP_NAMES = {"rollout", "reward", "reference", "learner"}


def tiny_search(tmp_path: Path, name: str = "tiny_search", **extra) -> Path:
    data = {
        "name": name,
        "base": "tiny",
        "storage_path": str(tmp_path / "store"),
        # kept in the exported config: no reference policy, a ZeRO-0 learner
        "overrides": {"kl": {"coef": 0}, "learner": {"zero_stage": 0}, "logging": {"tensorboard": False}},
        # each trial's budget: 2 steps, evaluated after each, on 4 held-out prompts
        "trial": {"steps": 2, "eval_every": 1, "data": {"num_eval": 4}, "eval_max_new_tokens": 4},
        "search": {"algorithm": "grid", "max_concurrent": 1, "simplex": {"share": {"values": [0.2, 0.8]}}},
        "asha": {"enabled": False},
        "objective": {"metric": "eval/sim"},
        **extra,
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_shipped_tune_config_validates():
    setup = load_tune_config()  # ray_configs/tune.yaml
    assert setup.base_path == CONFIG_DIR / "default.yaml"
    assert setup.cfg.objective.metric == "eval/rouge_l"
    assert setup.cfg.search.simplex is not None
    assert not str(setup.cfg.experiment_dir()).startswith(str(Path.home()))


def test_simplex_and_bad_input_fail_before_ray(tmp_path):
    shutdown_ray()  # none at all, not even the Ray an earlier module shares (tests/conftest.py)
    # stick-breaking: w1 = s1 = 0.5, w2 = (1 - 0.5) * 0.5 = 0.25, w3 = what is left = 0.25
    three = SearchConfig(simplex=SimplexSpec(weights=["reward.alpha", "reward.beta", "reward.rouge_l"]))
    assert three.field_values({"simplex_share_1": 0.5, "simplex_share_2": 0.5}) == {
        "reward.alpha": 0.5, "reward.beta": 0.25, "reward.rouge_l": 0.25,
    }
    path = tiny_search(tmp_path)
    cases = {
        "search.space.learner.zero_stage={values: [0, 4]}": "learner.zero_stage",  # a corner of the space is invalid
        "search.space.learner.lr={low: 0.001, high: 0.01}": "algorithm=grid needs values",
        "objective.metric=eval/raw": "tuned reward itself",
        "objective.kl_budget=0.1": "kl_budget needs the KL term",
        "search.algorithm=bayes": "search.algorithm",
        "base=nonexistent": "config file not found",
    }
    for override, message in cases.items():
        with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
            load_tune_config(path, [override])
    assert not ray.is_initialized()


def test_trial_resources_reserve_every_role(tmp_path):
    setup = load_tune_config(tiny_search(tmp_path))
    point = {"simplex_share_1": 0.2}
    cfg = setup.run_config(setup.cfg.search.field_values(point))
    assert (cfg.reward.alpha, cfg.reward.beta) == (0.2, 0.8)
    assert cfg.steps == 2 and cfg.data.num_eval == 4 and cfg.kl.coef == 0
    factory = trial_resources(setup, point)
    # driver, rollout worker, reward scorer, learner rank; no reference (kl.coef = 0)
    assert factory.bundles == [
        {"CPU": 0.25}, {"CPU": cfg.rollout.num_cpus}, {"CPU": cfg.reward.num_cpus}, {"CPU": cfg.learner.num_cpus},
    ]
    assert reports_per_trial(cfg) == 2  # the eval after step 1, then the final one


def _finished_trials(exp_dir: Path) -> list[Path]:
    done = []
    for result in exp_dir.glob("run_trial_*/result.json"):
        lines = result.read_text().splitlines()
        if lines and json.loads(lines[-1]).get("final") == 1.0:
            done.append(result.parent)
    return done


def test_search_interrupted_resumed_and_exported(local_ray, tmp_path):
    path = tiny_search(tmp_path)
    exp_dir = tmp_path / "store" / "tiny_search"
    log = tmp_path / "first_run.log"
    with open(log, "w") as sink:
        proc = subprocess.Popen(
            [sys.executable, "-m", "rayrlhf.jobs.cli", "tune", "--config", str(path)], cwd=REPO,
            stdout=sink, stderr=subprocess.STDOUT, start_new_session=True,
        )
    try:
        deadline = time.time() + 600  # a guard for a loaded machine; ~30 s when idle
        while "completed after" not in log.read_text() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.5)
        assert "completed after" in log.read_text(), "no trial finished"
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    out = log.read_text()
    assert "search interrupted" in out, out[-3000:]
    first = _finished_trials(exp_dir)
    assert len(first) == 1  # the second was cut short
    before = {d.name: (d / "result.json").read_text() for d in first}
    assert tune.Tuner.can_restore(str(exp_dir))

    # a trial that fails at run time (64 training prompts < 128 per step) is retried, then reported
    failing = tiny_search(
        tmp_path, name="failing", trial={"prompts_per_step": 128},
        search={"algorithm": "grid", "simplex": {"share": {"values": [0.5]}}},
    )
    failed = tune_weights(load_tune_config(failing)).summary
    assert [r["status"] for r in failed.rows] == ["error"] and "prompts_per_step" in failed.rows[0]["error"]
    assert failed.best is None and failed.best_config_path is None
    error_log = next((tmp_path / "store" / "failing").glob("run_trial_*/error.txt")).read_text()
    assert error_log.count("Failure # ") == 2  # max_failures = 1: one retry

    earlier = set(placement_group_table())  # the shared Ray's groups of earlier runs
    outcome = tune_weights(load_tune_config(path))
    # the trials' role actors went into the trials' placement groups: no group of their own
    assert not ROLE_GROUP_NAMES & {pg["name"] for key, pg in placement_group_table().items() if key not in earlier}
    assert outcome.resumed and not outcome.interrupted
    # the trials finished before the interruption were not run again
    assert {d.name: (d / "result.json").read_text() for d in first} == before

    summary = outcome.summary
    rows = summary.rows
    assert len(rows) == 2 and {r["status"] for r in rows} == {"done"}
    assert sorted(r["reward.alpha"] for r in rows) == [0.2, 0.8]
    for r in rows:
        assert r["reward.alpha"] + r["reward.beta"] == pytest.approx(1.0)
        assert r["objective"] == r["eval/sim"] and r["kl"] == 0.0
        assert r["evaluations"] == 2
        for component in ("eval/freq", "eval/rouge_l", "reward/sim", "reward/freq"):
            assert component in r
    best = max(rows, key=lambda r: r["objective"])
    assert summary.best["trial"] == best["trial"]
    assert Path(summary.best_checkpoint, "model.safetensors").exists()

    table = summary.table_path.read_text().splitlines()
    assert len(table) == 3 and "reward.alpha" in table[0] and "objective" in table[0]
    saved = json.loads(summary.json_path.read_text())
    assert saved["best"]["objective"] == best["objective"]

    image = matplotlib.image.imread(summary.plot_path)
    assert image.shape[:2] == (450, 600)  # figsize 6 x 4.5 inches at 100 dpi

    exported = load_config(summary.best_config_path)
    assert (exported.reward.alpha, exported.reward.beta) == (best["reward.alpha"], best["reward.beta"])
    assert exported.kl.coef == 0 and exported.learner.zero_stage == 0  # the search's overrides
    assert exported.data.num_eval == load_config("tiny").data.num_eval  # not the trial budget (4)
    result = train(exported)
    assert result.final_dir == exp_dir / "best_run" / "final"
    assert (result.final_dir / "model.safetensors").exists()


def _trial_driver_pids() -> list[int]:
    """The Tune trial processes among this test's Ray workers (process title ray::ImplicitFunc...)."""
    import psutil

    mine = psutil.Process().children(recursive=True)
    return [p.pid for p in mine if p.is_running() and " ".join(p.cmdline()).startswith("ray::ImplicitFunc")]


def test_killed_trial_continues_from_its_checkpoint(local_ray, tmp_path):
    """kill -9 a trial's process after its first reported checkpoint: Tune retries the trial
    (max_failures=1), and the retry continues from that checkpoint instead of step 0."""
    import threading

    # four steps: the kill after the first report lands while the trial still has three to go
    path = tiny_search(tmp_path, name="killed", search={"algorithm": "grid", "simplex": {"share": {"values": [0.5]}}},
                       trial={"steps": 4, "eval_every": 1, "data": {"num_eval": 4}, "eval_max_new_tokens": 4})
    exp_dir = tmp_path / "store" / "killed"
    killed: list[int] = []

    def kill_after_first_checkpoint() -> None:
        deadline = time.time() + 600
        def reported() -> bool:  # Tune has the checkpoint and its result (it records them a moment apart)
            results = list(exp_dir.glob("run_trial_*/result.json"))
            return bool(list(exp_dir.glob("run_trial_*/checkpoint_000000/manifest.json"))) and bool(
                results and results[0].read_text().strip())

        while time.time() < deadline and not reported():
            time.sleep(0.2)
        pids = _trial_driver_pids()
        if len(pids) == 1:
            os.kill(pids[0], signal.SIGKILL)
            killed.append(pids[0])

    killer = threading.Thread(target=kill_after_first_checkpoint, daemon=True)
    killer.start()
    outcome = tune_weights(load_tune_config(path))
    killer.join(timeout=5)
    assert killed, "the trial's process was not found"
    assert [r["status"] for r in outcome.summary.rows] == ["done"]
    trial = next(exp_dir.glob("run_trial_*"))
    assert (trial / "error.txt").read_text().count("Failure # ") == 1
    reported = [json.loads(line)["step"] for line in (trial / "result.json").read_text().splitlines()]
    assert reported == [1, 2, 3, 4]  # step 1 was reported once: the retry resumed after it
    assert [json.loads(line)["step"] for line in (trial / "run" / "metrics.jsonl").read_text().splitlines()] == [
        0, 1, 2, 3, 4, 4]


def test_search_on_a_uri_storage_path_writes_and_restores_there(local_ray, tmp_path):
    """storage_path as a pyarrow.fs URI (file:// takes the same road as s3://): Tune, the trial's run
    and the summary all write into the bucket, and a second run restores the search from it."""
    bucket = tmp_path / "bucket"
    path = tiny_search(tmp_path, name="on_uri", storage_path=f"file://{bucket}/tune",
                       search={"algorithm": "grid", "simplex": {"share": {"values": [0.5]}}},
                       trial={"steps": 1, "data": {"num_eval": 4}, "eval_max_new_tokens": 4})
    exp_dir = bucket / "tune" / "on_uri"
    first = tune_weights(load_tune_config(path))
    again = tune_weights(load_tune_config(path))  # finished: restored from the URI, nothing run again
    assert not first.resumed and again.resumed and not again.interrupted
    summary = first.summary
    assert [r["status"] for r in summary.rows] == ["done"]
    assert summary.table_path == f"file://{exp_dir}/results.csv"
    assert len((exp_dir / "results.csv").read_text().splitlines()) == 2
    assert json.loads((exp_dir / "results.json").read_text())["best"]["trial"] == summary.rows[0]["trial"]
    assert summary.best_checkpoint == f"file://{exp_dir}/{summary.rows[0]['trial']}/run/final"
    assert (exp_dir / summary.rows[0]["trial"] / "run" / "final" / "model.safetensors").exists()
    assert (exp_dir / summary.rows[0]["trial"] / "run" / "metrics.jsonl").exists()
    assert load_config(exp_dir / "best_config.yaml").output_dir == f"file://{exp_dir}/best_run"
    assert not Path("file:").exists()  # no URI taken for a relative path
