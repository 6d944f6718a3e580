"""Does DAPO's recipe help on the verifiable-reward task? ray_configs/math.yaml against math_dapo.yaml
(dynamic sampling, clip-higher, token-mean: docs/verifiable_rewards.md) on the same seeds.

    python benchmarks/math_recipe.py --seeds 0 1 2

Each run is `rayrlhf train --config C --set seed=S --set output_dir=...` in its own process (so one
run's Ray and memory cannot leak into the next). Per run: held-out accuracy before and after
(eval.json), the mean kept fraction and draws of dynamic sampling, the median step time and prompts
drawn (metrics.jsonl), wall time. Writes benchmarks/results/math_recipe.json and prints a table;
the change after - before is paired per seed. math_dapo generates more per step (refills): compare
accuracy per wall-clock too, not only per step.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import common  # first: the offline defaults, before Ray, torch and transformers load


def run(config: str, seed: int, output_dir: Path, overrides: list[str], step_metrics: list[str]) -> dict:
    """One training run in its own process; its figures from the files it wrote."""
    command = [sys.executable, "-m", "rayrlhf.jobs.cli", "train", "--config", config, "--resume", "never",
               "--set", f"seed={seed}", "--set", f"output_dir={output_dir}", "--set", "logging.wandb=disabled",
               "--set", "logging.progress_bar=false", *(x for o in overrides for x in ("--set", o))]  # fmt: skip
    load_at_start, start = os.getloadavg(), time.perf_counter()
    subprocess.run(command, check=True, env=os.environ)
    wall = time.perf_counter() - start
    evaluated = json.loads((output_dir / "eval.json").read_text())
    steps = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()][1:-1]

    def mean(key: str) -> float | None:
        values = [s[key] for s in steps if key in s]
        return statistics.mean(values) if values else None

    return {"config": config, "seed": seed, "wall_s": wall, "load_average_1_5_15": os.getloadavg(),
            "load_average_at_start": load_at_start, "step_means": {k: mean(k) for k in step_metrics},
            "median_step_s": statistics.median(s["time/step"] for s in steps), "steps": len(steps),
            "kept_frac_mean": mean("dynamic_sampling/kept_frac"), "draws_mean": mean("dynamic_sampling/draws"),
            "prompts_drawn": sum(s.get("dynamic_sampling/prompts_drawn", 0) for s in steps) or None,
            "before": evaluated["before"], "after": evaluated["after"]}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=["math", "math_dapo"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--metric", default="eval/math_exact_match", help="the held-out accuracy to compare")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                        help="applied to every run (e.g. steps=2 for a quick check)")
    parser.add_argument("--step-metrics", nargs="*", default=[], metavar="KEY",
                        help="metrics.jsonl keys whose mean over the steps is reported per run (e.g. reward/env_turns)")
    parser.add_argument("--out", default="math_recipe.json", help="file name under benchmarks/results/")
    parser.add_argument("--outputs", default="outputs/math_recipe", help="where the runs write")
    args = parser.parse_args()
    runs = [run(config, seed, Path(args.outputs) / f"{config}_seed{seed}", args.overrides, args.step_metrics)
            for config in args.configs for seed in args.seeds]  # fmt: skip

    summary = {}
    for config in args.configs:
        mine = [r for r in runs if r["config"] == config]
        deltas = [r["after"][args.metric] - r["before"][args.metric] for r in mine]
        summary[config] = {
            "before_mean": statistics.mean(r["before"][args.metric] for r in mine),
            "after_mean": statistics.mean(r["after"][args.metric] for r in mine),
            "delta_mean": statistics.mean(deltas), "delta_std": statistics.stdev(deltas) if len(deltas) > 1 else 0.0,
            "deltas": deltas, "median_step_s": statistics.median(r["median_step_s"] for r in mine),
            "wall_s_mean": statistics.mean(r["wall_s"] for r in mine),
            "kept_frac_mean": None if mine[0]["kept_frac_mean"] is None  # no dynamic sampling
            else statistics.mean(r["kept_frac_mean"] for r in mine),
            "step_means": {k: statistics.mean(r["step_means"][k] for r in mine) for k in args.step_metrics},
        }  # fmt: skip
    report = {"configs": args.configs, "seeds": args.seeds, "metric": args.metric, "overrides": args.overrides,
              "summary": summary, "runs": runs}  # fmt: skip
    print(f"\n{args.metric}: {'config':<12}{'before':>8}{'after':>8}{'delta':>8}{'sd':>7}{'step s':>8}{'kept':>6}")
    for config, s in summary.items():
        kept = "" if s["kept_frac_mean"] is None else f"{s['kept_frac_mean']:.2f}"
        print(f"{'':<{len(args.metric) + 2}}{config:<12}{s['before_mean']:>8.3f}{s['after_mean']:>8.3f}"
              f"{s['delta_mean']:>+8.3f}{s['delta_std']:>7.3f}{s['median_step_s']:>8.1f}{kept:>6}")
    common.write_results(args.out, report)


if __name__ == "__main__":
    main()
