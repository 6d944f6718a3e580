"""`rayrlhf tune` with search.algorithm=pbt: a real population (ray_configs/tune_pbt_tiny.yaml, two
tiny-model trials of 5 steps, perturbed after steps 2 and 4) whose weaker trial takes over the
stronger's run checkpoint each time, with one trial process killed with SIGKILL on the way.
"""

import json
import os
import signal
import threading
import time
from pathlib import Path

import matplotlib.image
import pytest

from rayrlhf.jobs.config.tune import load_tune_config
from rayrlhf.jobs.run import pbt
from rayrlhf.jobs.tune import tune_weights


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _kill_after_first_exploit(exp_dir: Path, killed: list[int]) -> None:
    """SIGKILL the trial process that took over a checkpoint, once it holds its run's lock again."""
    deadline = time.time() + 600
    while time.time() < deadline and not killed:
        for events in exp_dir.glob(f"run_trial_*/{pbt.EVENTS}"):
            exploits = [e for e in _lines(events) if e["kind"] == "exploit"]
            lock = events.parent / "run" / ".rayrlhf.lock"
            if exploits and lock.exists() and lock.stat().st_mtime > events.stat().st_mtime:
                try:
                    pid = json.loads(lock.read_text())["pid"]
                    os.kill(pid, signal.SIGKILL)
                except (ValueError, KeyError, ProcessLookupError):
                    continue  # a lock being written, or a process already gone
                killed.append(pid)
                return
        time.sleep(0.2)


def test_pbt_exploits_perturbs_survives_a_killed_trial_and_reports_the_schedule(local_ray, tmp_path):
    setup = load_tune_config("tune_pbt_tiny", [f"storage_path={tmp_path}", "max_failures=1"])
    exp_dir = tmp_path / "tune_pbt_tiny"
    killed: list[int] = []
    killer = threading.Thread(target=_kill_after_first_exploit, args=(exp_dir, killed), daemon=True)
    killer.start()
    outcome = tune_weights(setup)
    killer.join(timeout=5)
    again = tune_weights(setup)  # a finished search is restored, nothing runs again
    assert killed, "no trial process was killed"
    assert again.resumed and not again.interrupted

    summary = outcome.summary
    assert [r["status"] for r in summary.rows] == ["done", "done"]
    trials = {r["trial"]: exp_dir / r["trial"] for r in summary.rows}
    events = {name: pbt.read_events(d) for name, d in trials.items()}
    exploits = [e for es in events.values() for e in es if e["kind"] == "exploit"]
    # two trials, quantile 0.5: at the perturbation (step 2) the weaker takes over the stronger
    assert [e["step"] for e in exploits] == [2]
    # the killed process was the exploiting trial's: retried once, it recorded its exploit once
    assert [name for name, d in trials.items() if (d / "error.txt").exists()] == [exploits[0]["trial"]]
    assert (trials[exploits[0]["trial"]] / "error.txt").read_text().count("Failure # ") == 1
    for e in exploits:
        assert e["donor"] != e["trial"] and e["before"] != e["after"]
        # the donor's settings were those of its own start or last exploit
        donor_settings = [d["after"] for d in events[e["donor"]] if d["step"] < e["step"]][-1]
        assert e["before"] == donor_settings
        # the perturbed values won over the checkpoint's: the next step trained with them
        metrics = {row["step"]: row for row in _lines(trials[e["trial"]] / "run" / "metrics.jsonl") if "lr" in row}
        assert metrics[e["step"] + 1]["lr"] == pytest.approx(e["after"]["learner.lr"])
        assert metrics[e["step"] + 1]["kl_coef"] == pytest.approx(e["after"]["kl.coef"])
        # and Tune's results record the change at its step
        reported = {r["step"]: r for r in _lines(trials[e["trial"]] / "result.json")}
        later = min(s for s in reported if s > e["step"])
        assert reported[later]["weight/learner.lr"] == pytest.approx(e["after"]["learner.lr"])
        assert e["after"]["reward.alpha"] + e["after"]["reward.beta"] == pytest.approx(1.0)
    # each row's weights are its final settings; the summary counts its exploits
    assert sorted(r["exploits"] for r in summary.rows) == [0, 1]

    schedule = summary.schedule
    assert schedule[0]["step"] == 0
    for entry in schedule[1:]:  # every later change of the best policy's settings is an exploit of its lineage
        event = next(e for e in exploits if e["step"] == entry["step"] and e["trial"] == entry["trial"])
        assert {k: entry[k] for k in event["after"]} == event["after"]
    assert schedule[-1]["trial"] == summary.best["trial"]
    assert schedule[-1]["learner.lr"] == pytest.approx(summary.best["learner.lr"])
    # the restored search rewrote the summary (with tied objectives its best may be the other trial)
    assert json.loads(summary.json_path.read_text())["schedule"] == again.summary.schedule
    assert matplotlib.image.imread(summary.schedule_path).shape[1] == 600  # 6 inches at 100 dpi
