"""Does the embedded default really improve the policy? `rayrlhf train` on default.yaml over
several seeds; held-out metrics before and after, wall time of each whole run.

    python benchmarks/demo_seeds.py --seeds 0 1 2

Writes benchmarks/results/demo_seeds.json and prints a table. The seed also draws the built-in
task, so each seed has its own held-out prompts and its own "before" (greedy, deterministic);
the change after - before is paired per seed, and its spread across seeds is the run-to-run
noise that the mean improvement must clear.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import common  # first: the offline defaults, before Ray, torch and transformers load

from rayrlhf.jobs.config.run import load_config
from rayrlhf.jobs.train import train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="default")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE")
    parser.add_argument("--out", default="demo_seeds.json", help="file name under benchmarks/results/")
    args = parser.parse_args()
    runs = []
    for seed in args.seeds:
        cfg = load_config(args.config, [
            f"seed={seed}", f"output_dir=outputs/demo_seeds/seed{seed}", "logging.wandb=disabled",
            "logging.progress_bar=false", *args.overrides,
        ])
        start = time.perf_counter()
        result = train(cfg)
        runs.append({"seed": seed, "wall_s": time.perf_counter() - start, "load_average_1_5_15": os.getloadavg(),
                     "median_step_s": statistics.median(h["time/step"] for h in result.history[1:] or result.history),
                     "before": result.before, "after": result.after})
        print(f"seed {seed}: {runs[-1]['wall_s']:.0f} s", flush=True)

    keys = list(runs[0]["before"])
    summary = {}
    for key in keys:
        deltas = [r["after"][key] - r["before"][key] for r in runs]
        summary[key] = {
            "before_mean": statistics.mean(r["before"][key] for r in runs),
            "after_mean": statistics.mean(r["after"][key] for r in runs),
            "delta_mean": statistics.mean(deltas),
            "delta_std": statistics.stdev(deltas) if len(deltas) > 1 else 0.0,
            "deltas": deltas,
        }
    report = {"config": args.config, "overrides": args.overrides, "seeds": args.seeds, "runs": runs,
              "summary": summary}
    print(f"\n{'held-out metric':<18}{'before':>9}{'after':>9}{'delta':>9}{'sd':>8}  per seed")
    for key, s in summary.items():
        per_seed = " ".join(f"{d:+.3f}" for d in s["deltas"])
        print(f"{key.removeprefix('eval/'):<18}{s['before_mean']:>9.4f}{s['after_mean']:>9.4f}"
              f"{s['delta_mean']:>+9.4f}{s['delta_std']:>8.4f}  {per_seed}")
    common.write_results(args.out, report)


if __name__ == "__main__":
    main()
