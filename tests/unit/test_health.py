"""Training-health monitors on hand-made metric sequences (pure; no Ray)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import matplotlib.image
import pytest

from rayrlhf.jobs.config.run import load_config
from rayrlhf.jobs.run.health import HealthMonitor, trend, weighted_components

CFG = dict(window=1, max_length_growth=1.5, max_truncated_frac=0.5, min_entropy=0.1, max_kl=1.0,
           held_out="eval/rouge_l", hacking_tolerance=0.01, stop_on=[], plot=True)  # fmt: skip
DEFAULT_RUNS = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "health_default_steps.json"


def monitor(**overrides) -> tuple[HealthMonitor, list[str]]:
    printed: list[str] = []
    return HealthMonitor({**CFG, **overrides}, ["freq", "sim"], printed.append), printed


def test_trend_is_the_fitted_change_over_the_span():
    assert trend([(0, 1.0), (1, 2.0), (2, 3.0)]) == pytest.approx(2.0)
    # slope of (1,0),(2,2),(3,1): 0.5 per step, over 2 steps -> +1.0
    assert trend([(1, 0.0), (2, 2.0), (3, 1.0)]) == pytest.approx(1.0)
    assert trend([(4, 1.0)]) is None
    assert trend([(1, -3.0), (2, -3.0), (3, -3.0), (5, -3.0)]) == 0.0  # flat is exactly flat, on any CPU


def test_a_warning_per_threshold_crossing_and_flags_every_step():
    mon, printed = monitor()
    flags = []
    # window 1: step 1 is the length baseline (ratio 1.0); growth 1.2, 1.6, 1.7, 1.0, 2.0 after it
    for step, ratio in enumerate([1.0, 1.2, 1.6, 1.7, 1.0, 2.0], start=1):
        metrics = {"reward/length_ratio": ratio, "kl": 0.01, "entropy": 2.0}
        assert mon.observe(step, metrics) is False  # nothing in stop_on
        flags.append(metrics["health/length"])
        assert metrics["health/kl"] == 0.0 and metrics["health/entropy"] == 0.0
    assert flags == [0.0, 0.0, 1.0, 1.0, 0.0, 1.0]
    warned = [line for line in printed if "length" in line]
    assert len(warned) == 2 and "step 3" in warned[0] and "step 6" in warned[1]  # not again at step 4
    assert "2.00x as long as in the run's first 1 step(s)" in warned[1] and "reward.overlong_penalty" in warned[1]


def test_checks_read_the_mean_of_the_window_and_length_its_own_start():
    """A base model's samples run long (2.5x their references here): that is the baseline, not a warning.
    One long batch is noise; the mean of three that grew half again over the start is a warning."""
    mon, printed = monitor(window=3)
    ratios = [2.5, 2.4, 2.6, 2.0, 4.0, 2.2, 3.5, 4.2, 4.5]  # baseline 2.5; step 5 alone is 1.6x of it
    flags = []
    for step, ratio in enumerate(ratios, start=1):
        metrics = {"reward/length_ratio": ratio, "kl": [0.1, 2.5][step == 5]}  # one KL spike
        mon.observe(step, metrics)
        flags.append((metrics["health/length"], metrics["health/kl"]))
    # length means over steps 3-5: 2.87 -> 1.15x; 7-9: 4.07 -> 1.63x (> 1.5); kl at step 5: (0.1+0.1+2.5)/3 = 0.9
    assert [f[0] for f in flags] == [0.0] * 8 + [1.0] and not any(f[1] for f in flags)
    (line,) = printed
    assert "step 9, length" in line and "1.63x" in line and "mean of the last 3 steps" in line


def test_the_default_thresholds_do_not_warn_on_the_defaults_healthy_runs():
    """The default run's three seeds, step by step (benchmarks/health_calibration.py wrote them): the
    previous thresholds warned in every one of them; these warn in none."""
    from rayrlhf.jobs.config.run import MonitorConfig

    runs = json.loads(DEFAULT_RUNS.read_text())
    assert len(runs) == 3
    for name, steps in runs.items():
        printed: list[str] = []
        mon = HealthMonitor(MonitorConfig().model_dump(), ["freq", "sim"], printed.append)
        for row in steps:
            mon.observe(row["step"], {k: v for k, v in row.items() if k != "step"})
        assert printed == [], name
        # the same run with its answers padded a little more every step (a policy gaming a reward that
        # grows with length: 5x the healthy run's length by step 24) does warn
        mon = HealthMonitor(MonitorConfig().model_dump(), ["freq", "sim"], printed.append)
        for row in steps:
            mon.observe(row["step"], {**row, "reward/length_ratio": row["reward/length_ratio"] * (1 + row["step"] / 6)})
        assert printed and all(", length)" in line for line in printed), name


def test_stop_on_stops_at_the_first_crossing_of_a_listed_check():
    mon, printed = monitor(stop_on=["kl"], min_entropy=None)
    assert mon.observe(1, {"reward/truncated_frac": 0.75, "kl": 0.5, "entropy": 0.0}) is False  # not listed
    assert "75% of sampled answers were cut" in printed[0] and "entropy" not in "".join(printed)  # check off
    assert mon.observe(2, {"kl": 1.5}) is True
    assert mon.stop_reason.startswith("kl at step 2: KL to the reference 1.5000 > 1.0")


def test_the_truncation_warning_advises_by_the_runs_truncation_mode():
    """A penalty advice on a 0/1 reward made cut answers' penalty its only signal (math.yaml): each mode
    gets its own advice, and `keep` says which rewards it fits."""
    advice = {}
    for mode in ("penalize", "keep", "mask"):
        printed: list[str] = []
        mon = HealthMonitor(CFG, ["math_exact_match"], printed.append, truncation=mode)
        mon.observe(1, {"reward/truncated_frac": 0.75})
        (line,) = printed
        assert line.startswith("health warning (step 1, truncation): 75% of sampled answers were cut"), line
        advice[mode] = line.split("limit 50%: ")[1]
    assert advice["penalize"].startswith("raise rollout.max_new_tokens (each cut answer already loses")
    assert "a checked 0/1 answer cut before its final answer already scores 0" in advice["keep"]
    assert "set reward.truncation=penalize" in advice["keep"]
    assert "left out of the loss (reward.truncation=mask)" in advice["mask"]
    with pytest.raises(KeyError):
        HealthMonitor(CFG, [], truncation="drop")


def test_a_multi_turn_run_counts_episodes_cut_at_a_token_cap_not_games_lost_on_turns():
    """guess_number's lost games all ran out of turns (truncated_frac 0.84 at step 1 of seed 0, no reply
    cut): that is a loss, not a token-cap problem, so an episode run's check reads reward/env_cut."""
    printed: list[str] = []
    mon = HealthMonitor(CFG, ["env_reward"], printed.append, truncation="keep", episodes=True)
    assert mon.observe(1, {"reward/truncated_frac": 0.84, "reward/env_cut": 0.0}) is False and printed == []
    mon.observe(2, {"reward/truncated_frac": 0.84, "reward/env_cut": 0.75})
    assert printed == ["health warning (step 2, truncation): 75% of sampled episodes hit a token cap (a reply cut "
                       "at rollout.max_new_tokens, or env.max_tokens used up), limit 50%: raise "
                       "rollout.max_new_tokens or env.max_tokens"]  # fmt: skip


def test_hacking_a_weighted_component_rises_while_held_out_falls():
    mon, printed = monitor()
    mon.observe(0, {"eval/rouge_l": 0.50})
    for step, sim in enumerate([0.1, 0.2, 0.3, 0.4], start=1):
        # sim (weighted) rises by 0.3 over steps 1-4; freq (weighted) is flat; bleu is not weighted
        mon.observe(step, {"reward/sim": sim, "reward/freq": -3.0, "reward/bleu": sim})
    at_eval = {"reward/sim": 0.5, "reward/freq": -3.0, "eval/rouge_l": 0.45}
    mon.observe(5, at_eval)
    assert at_eval["health/hacking"] == 1.0
    (line,) = [p for p in printed if "hacking" in p]
    # the fit through steps 0-5 (step 0 has no training value): sim 0.1..0.5 over steps 1-5 -> +0.4
    assert "reward/sim +0.4000 rose from step 0 to 5 while eval/rouge_l fell -0.0500" in line
    assert "freq" not in line and "bleu" not in line
    # the held-out metric recovers: no warning, flag back to 0
    recovered = {"reward/sim": 0.6, "eval/rouge_l": 0.47}
    mon.observe(6, recovered)
    assert recovered["health/hacking"] == 0.0 and len([p for p in printed if "hacking" in p]) == 1


def test_a_resumed_monitor_warns_and_detects_as_the_uninterrupted_one():
    """Its state goes into the run checkpoint as JSON: a resume neither repeats a warning nor forgets the
    steps before it (the hacking check and training.png need them)."""
    steps = [(0, {"eval/rouge_l": 0.50}), (1, {"reward/sim": 0.1, "kl": 1.5}), (2, {"reward/sim": 0.3, "kl": 1.6}),
             (3, {"reward/sim": 0.5, "kl": 1.7, "eval/rouge_l": 0.45})]  # fmt: skip
    whole, printed_whole = monitor()
    for step, metrics in steps:
        whole.observe(step, dict(metrics))
    first, printed = monitor()
    for step, metrics in steps[:2]:
        first.observe(step, dict(metrics))
    resumed, printed_after = monitor()
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    for step, metrics in steps[2:]:
        resumed.observe(step, dict(metrics))
    assert printed + printed_after == printed_whole  # the KL warning once (step 1), hacking at step 3
    assert [line.split(",")[1].split(")")[0] for line in printed_whole] == [" kl", " hacking"]
    assert resumed.history == whole.history and resumed.failing == whole.failing


def test_a_small_held_out_dip_is_within_tolerance():
    mon, printed = monitor(hacking_tolerance=0.1)
    mon.observe(0, {"eval/rouge_l": 0.50})
    mon.observe(1, {"reward/sim": 0.1})
    mon.observe(2, {"reward/sim": 0.9, "eval/rouge_l": 0.45})
    assert printed == []


def test_weighted_components_and_plot(tmp_path):
    cfg = load_config("tiny", ["reward.bleu=0.5", "reward.alpha=0", "reward.functions=[{path: math_exact_match}]",
                               "reward.remote={url: 'http://127.0.0.1:9/x', weight: 0.2}"])  # fmt: skip
    assert weighted_components(cfg.reward) == ["sim", "bleu", "math_exact_match", "remote"]
    mon, _ = monitor()
    mon.observe(0, {"eval/rouge_l": 0.5, "eval/sim": 0.7, "eval/length": 12.0})
    for step in (1, 2, 3):
        mon.observe(step, {"reward/raw": step * 0.1, "reward/sim": 0.7, "response_length": 10.0 + step, "kl": 0.01,
                           "entropy": 3.0, "reward/length_ratio": 1.1, "reward/truncated_frac": 0.2})  # fmt: skip
    mon.observe(3, {"eval/rouge_l": 0.55, "eval/sim": 0.72, "eval/length": 13.0})
    image = matplotlib.image.imread(mon.plot(tmp_path / "training.png"))
    assert image.shape[0] > 400 and image.shape[1] > 700


def test_non_finite_values_fail_their_checks_and_are_logged_as_such(tmp_path):
    """NaN compares false with any threshold: it must fail the check, not pass it, and reach the logs."""
    from rayrlhf.jobs.config.run import MonitorConfig
    from rayrlhf.jobs.run.tracking import Tracker

    warnings: list[str] = []
    monitor = HealthMonitor(MonitorConfig().model_dump(), ["sim"], warnings.append)
    metrics = {"kl": float("nan"), "entropy": float("inf"), "reward/length_ratio": 1.0, "eval/rouge_l": float("nan")}
    monitor.observe(1, metrics)
    assert metrics["health/kl"] == 1.0 and metrics["health/entropy"] == 1.0  # inf fails too, though above the minimum
    assert metrics["health/length"] == 0.0 and metrics["health/hacking"] == 1.0
    assert any("kl is nan" in w for w in warnings) and any("eval/rouge_l is nan" in w for w in warnings)
    tracker = Tracker(tmp_path, run_name="t", config={}, total_steps=1, wandb_mode="disabled",
                      wandb_project="p", tensorboard=False, progress_bar=False)
    tracker.log(1, metrics)
    tracker.close()
    row = json.loads((tmp_path / "metrics.jsonl").read_text())
    assert math.isnan(row["kl"]) and row["entropy"] == math.inf and row["health/kl"] == 1.0
