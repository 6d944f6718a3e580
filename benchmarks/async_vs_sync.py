"""Does overlapping rollout with learning pay? `rayrlhf train` with pipeline.max_staleness 0
(synchronous) and 1 (the next batch generated, scored and given reference log-probs while the
learner trains the current one), same config, same seeds, the same number of samples, one run
after the other in one invocation.

    python benchmarks/async_vs_sync.py                      # the default config, seeds 0 1 2
    python benchmarks/async_vs_sync.py --config tiny --steps 3 --seeds 0   # a quick check

Per run: mean s/step (all steps: the pipelined run's first step cannot overlap, so it is counted),
median s/step over steps 2.., samples/s (samples trained / summed step time) and the held-out raw
reward after training; per setting, mean and sd over seeds; and the ratios pipelined/synchronous.
Writes benchmarks/results/async_vs_sync.json (or --out). Timings mean something on an idle machine only.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import common  # first: the offline defaults, before Ray, torch and transformers load

from rayrlhf.jobs.config.run import load_config
from rayrlhf.jobs.train import train

FIGURES = ("s_per_step", "median_step_s", "samples_per_s", "held_out_raw_after")


def run_once(config: str, seed: int, staleness: int, overrides: list[str]) -> dict:
    cfg = load_config(config, [
        f"seed={seed}", f"pipeline.max_staleness={staleness}", f"output_dir=outputs/async_vs_sync/k{staleness}_seed{seed}",
        "logging.wandb=disabled", "logging.tensorboard=false", "logging.progress_bar=false", *overrides,
    ])
    start = time.perf_counter()
    result = train(cfg, resume="never")
    steps = [h["time/step"] for h in result.history]
    samples = sum(h["samples/trained"] for h in result.history)
    return {
        "seed": seed, "max_staleness": staleness, "steps": len(steps), "samples": samples,
        "wall_s": time.perf_counter() - start, "load_average_1_5_15": os.getloadavg(),
        "s_per_step": sum(steps) / len(steps),
        "median_step_s": statistics.median(steps[1:] or steps),
        "samples_per_s": samples / sum(steps),
        "held_out_raw_before": result.before["eval/raw"], "held_out_raw_after": result.after["eval/raw"],
        "before": result.before, "after": result.after,  # every held-out metric (demo_seeds.py's table)
        "phases_mean_s": {k: statistics.mean(h[k] for h in result.history) for k in result.history[0] if k.startswith("time/")},
        "mismatch_kl_mean": statistics.mean(h["pipeline/mismatch_kl"] for h in result.history),
        "is_clip_frac_mean": statistics.mean(h["pipeline/is_clip_frac"] for h in result.history),
    }


def summary(runs: list[dict]) -> dict:
    return {
        key: {"mean": statistics.mean(r[key] for r in runs),
              "sd": statistics.stdev(r[key] for r in runs) if len(runs) > 1 else 0.0}
        for key in FIGURES
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="default")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=None, help="default: the config's steps")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE")
    parser.add_argument("--out", default="async_vs_sync.json", help="file name under benchmarks/results/")
    args = parser.parse_args()
    overrides = [*args.overrides, *([f"steps={args.steps}"] if args.steps else [])]
    runs: dict[int, list[dict]] = {0: [], 1: []}
    for seed in args.seeds:
        for staleness in runs:  # sync then pipelined, per seed: load drifts hit both alike
            run = run_once(args.config, seed, staleness, overrides)
            runs[staleness].append(run)
            print(f"seed {seed} max_staleness {staleness}: {run['s_per_step']:.2f} s/step, "
                  f"{run['samples_per_s']:.3f} samples/s, held-out raw {run['held_out_raw_after']:+.4f}", flush=True)

    table = {f"max_staleness={k}": summary(v) for k, v in runs.items()}
    sync, pipelined = table["max_staleness=0"], table["max_staleness=1"]
    ratios = {
        "samples_per_s": pipelined["samples_per_s"]["mean"] / sync["samples_per_s"]["mean"],
        "s_per_step": pipelined["s_per_step"]["mean"] / sync["s_per_step"]["mean"],
        "held_out_raw_after_diff": pipelined["held_out_raw_after"]["mean"] - sync["held_out_raw_after"]["mean"],
    }
    print(f"\n{'':<18}" + "".join(f"{f:>22}" for f in FIGURES))
    for name, figures in table.items():
        print(f"{name:<18}" + "".join(f"{figures[f]['mean']:>13.4f} ± {figures[f]['sd']:<6.4f}" for f in FIGURES))
    print(f"\npipelined / synchronous: samples/s x{ratios['samples_per_s']:.3f}, s/step x{ratios['s_per_step']:.3f}, "
          f"held-out raw {ratios['held_out_raw_after_diff']:+.4f}")
    report = {"config": args.config, "overrides": overrides, "seeds": args.seeds, "runs": runs[0] + runs[1],
              "summary": table, "ratio_pipelined_over_sync": ratios}
    common.write_results(args.out, report)


if __name__ == "__main__":
    main()
