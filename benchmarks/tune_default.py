"""The embedded default search (`rayrlhf tune`, ray_configs/tune.yaml): its wall time, and whether
the best weights beat alpha = beta = 0.5 on the held-out objective.

    .venv/bin/python benchmarks/tune_default.py [--set trial.steps=2 ...]

Writes benchmarks/results/tune_default.json and prints the comparison. Not a test: figures only.
A fresh experiment name per run (the default one would be resumed, not measured).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cluster.offline import apply_offline_defaults  # noqa: E402

apply_offline_defaults()

from jobs.tune import tune_weights  # noqa: E402
from jobs.tune_config import load_tune_config  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="tune")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args(argv)
    name = f"bench_{time.strftime('%Y%m%d_%H%M%S')}"
    setup = load_tune_config(args.config, [f"name={name}", *args.overrides])
    load_before = os.getloadavg()
    start = time.perf_counter()
    outcome = tune_weights(setup)
    wall = time.perf_counter() - start
    rows = outcome.summary.rows
    reference = next((r for r in rows if r.get("reward.alpha") == 0.5 and r.get("reward.beta") == 0.5), None)
    best = outcome.summary.best
    untrained = None
    if reference is not None:
        eval_json = setup.cfg.experiment_dir() / reference["trial"] / "run" / "eval.json"
        if eval_json.exists():
            untrained = json.loads(eval_json.read_text())["before"].get(setup.cfg.objective.metric)
    figures = {
        "command": "python benchmarks/tune_default.py " + " ".join(f"--set {o}" for o in args.overrides),
        "experiment_dir": str(setup.cfg.experiment_dir()),
        "wall_s": round(wall, 1),
        "load_average_1_5_15_before": [round(x, 2) for x in load_before],
        "load_average_1_5_15_after": [round(x, 2) for x in os.getloadavg()],
        "cpus": os.cpu_count(),
        "metric": setup.cfg.objective.metric,
        "untrained_policy": untrained,
        "reference_alpha_beta_0.5": reference and reference["objective"],
        "best": best and {k: best[k] for k in ("reward.alpha", "reward.beta", "objective", "trial")},
        "best_beats_reference": bool(best and reference and best["objective"] > reference["objective"]),
        "trials": [{k: v for k, v in r.items() if k not in ("checkpoint",)} for r in rows],
        "trial_budget": setup.cfg.trial,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "tune_default.json").write_text(json.dumps(figures, indent=2, default=str))
    print(json.dumps({k: figures[k] for k in ("wall_s", "untrained_policy", "reference_alpha_beta_0.5", "best",
                                              "best_beats_reference", "load_average_1_5_15_before")}, indent=2))


if __name__ == "__main__":
    main()
