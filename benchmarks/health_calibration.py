"""Replay runs' per-step metrics through the health monitor: how often do healthy runs warn?

    python benchmarks/health_calibration.py outputs/default outputs/demo_seeds/seed1 ...

Each run folder's metrics.jsonl goes through `HealthMonitor` with the schema's default thresholds
(plus any `--set monitor.X=V`). Prints every warning, the false-alarm rate (runs that warned) and, per
check, the closest a run came to its limit (the check's value over its limit; above 1 warns), so a
threshold is chosen with a margin. The per-step series it read are written to
benchmarks/results/health_default_steps.json (tests/unit/test_health.py replays them).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from rayrlhf.jobs.config.run import MonitorConfig
from rayrlhf.jobs.run.health import HealthMonitor

KEYS = ("reward/length_ratio", "reward/truncated_frac", "entropy", "kl")


def series(run: Path) -> list[dict[str, float]]:
    """The training steps' health inputs, in order (evaluation rows carry none of them)."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [{"step": r["step"], **{k: r[k] for k in KEYS}} for r in rows if all(k in r for k in KEYS)]


def closest(steps: list[dict[str, float]], cfg: dict) -> dict[str, float]:
    """Per check, the largest value/limit over the run (the length check's growth over its baseline)."""
    w, ratios = cfg["window"], np.array([s["reward/length_ratio"] for s in steps])
    rolling = {k: np.array([np.mean([s[k] for s in steps[max(0, i - w + 1): i + 1]]) for i in range(len(steps))])
               for k in KEYS}  # fmt: skip
    growth = rolling["reward/length_ratio"][w:] / np.mean(ratios[:w])
    return {"length": float(growth.max() / cfg["max_length_growth"]),
            "truncation": float(rolling["reward/truncated_frac"].max() / cfg["max_truncated_frac"]),
            "entropy": float(cfg["min_entropy"] / rolling["entropy"].min()),
            "kl": float(rolling["kl"].max() / cfg["max_kl"])}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--set", action="append", default=[], help="monitor.X=V")
    args = parser.parse_args()
    cfg = MonitorConfig().model_dump()
    for item in args.set:
        key, value = item.removeprefix("monitor.").split("=", 1)
        cfg[key] = json.loads(value)
    print("thresholds:", {k: cfg[k] for k in ("window", "max_length_growth", "max_truncated_frac", "min_entropy", "max_kl")})
    warned, data = 0, {}
    for run in args.runs:
        steps = series(run)
        lines: list[str] = []
        monitor = HealthMonitor(cfg, [], lines.append)
        for s in steps:
            monitor.observe(int(s["step"]), {k: s[k] for k in KEYS})
        warned += bool(lines)
        data[str(run)] = steps
        margins = ", ".join(f"{k} {v:.2f}" for k, v in closest(steps, cfg).items())
        print(f"{run}: {len(steps)} steps, {len(lines)} warnings; closest to a limit (1 = warns): {margins}")
        for line in lines:
            print("   ", line)
    print(f"false alarms: {warned} of {len(args.runs)} runs warned")
    out = Path(__file__).resolve().parent / "results" / "health_default_steps.json"
    out.write_text(json.dumps(data, indent=1) + "\n")
    print(f"wrote {out}")
    sys.exit(0)


if __name__ == "__main__":
    main()
