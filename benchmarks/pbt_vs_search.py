"""Population-based training against a random search of the same space at the same total steps.

Both searches start from the same population size and run every trial for trial.steps, so both
train population x steps RL steps: PBT (ray_configs/tune_pbt.yaml) moves its trials' settings
during training, the random search keeps each trial's draw (no ASHA: nothing stops early). Each
search's best policy is then scored on the held-out prompts neither search ranked on (benchmarks/
tune_default.py's `score_on_unseen`), next to the untrained policy.

    .venv/bin/python benchmarks/pbt_vs_search.py --seeds 0 1 2 [--config tune_pbt] [--set trial.steps=8 ...] [--out F]

Writes benchmarks/results/pbt_vs_search.json (or --out). Not a test: figures only. Fresh experiment names per run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from typing import Any

import common  # first: the offline defaults, before Ray, torch and transformers load
from tune_default import score_on_unseen

from rayrlhf.jobs.config.tune import TuneSetup, load_tune_config
from rayrlhf.jobs.tune import tune_weights


def setups(config: str, seed: int, overrides: list[str]) -> dict[str, TuneSetup]:
    """The PBT search of `config` and its random-search twin (same space, population, steps, evaluations)."""
    stamp = time.strftime("%Y%m%d_%H%M%S")
    pbt = load_tune_config(config, [f"name=bench_pbt_s{seed}_{stamp}", f"search.seed={seed}", *overrides])
    if pbt.cfg.search.algorithm != "pbt":
        raise SystemExit(f"--config {config}: search.algorithm is {pbt.cfg.search.algorithm}, not pbt")
    random = load_tune_config(config, [
        f"name=bench_random_s{seed}_{stamp}", f"search.seed={seed}", *overrides, "search.algorithm=random",
        "asha.enabled=false", f"trial.eval_every={pbt.cfg.search.pbt.interval}",
    ])
    return {"pbt": pbt, "random": random}


def run_seed(config: str, seed: int, overrides: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {"seed": seed}
    best_policies = {}
    searches = setups(config, seed, overrides)
    for kind, setup in searches.items():
        start = time.perf_counter()
        summary = tune_weights(setup).summary
        best = summary.best
        out[kind] = {
            "experiment_dir": str(setup.cfg.experiment_dir()), "wall_s": round(time.perf_counter() - start, 1),
            "trials": len(summary.rows), "steps_each": setup.run_config({}).steps,
            "best": best and {k: best[k] for k in (*setup.cfg.search.weight_fields(), "objective", "trial")},
            "schedule": summary.schedule,
        }
        if best and best["checkpoint"]:
            best_policies[f"{kind}_best"] = best["checkpoint"]
    if best_policies:
        out["unseen_held_out"] = score_on_unseen(searches["pbt"], best_policies)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="search seeds (initial population draws)")
    parser.add_argument("--config", default="tune_pbt", help="a PBT tune config (tune_pbt_tiny: a quick check)")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--out", default="pbt_vs_search.json", help="file name under benchmarks/results/")
    parser.add_argument("--dry-run", action="store_true", help="validate both searches of every seed, run nothing")
    args = parser.parse_args(argv)
    if args.dry_run:
        for seed in args.seeds:
            for kind, setup in setups(args.config, seed, args.overrides).items():
                print(f"seed {seed} {kind}: {setup.cfg.search.samples()} trials x {setup.run_config({}).steps} steps "
                      f"-> {setup.cfg.experiment_dir()}")
        return
    load_before = os.getloadavg()
    runs = [run_seed(args.config, seed, args.overrides) for seed in args.seeds]
    metric = load_tune_config(args.config).cfg.objective.metric
    unseen = [r["unseen_held_out"] for r in runs if "unseen_held_out" in r]
    means = {k: statistics.mean(u[k] for u in unseen) for k in ("untrained", "pbt_best", "random_best")
             if unseen and all(k in u for u in unseen)}
    figures = {
        "command": "python benchmarks/pbt_vs_search.py --seeds " + " ".join(map(str, args.seeds))
                   + f" --config {args.config}" + "".join(f" --set {o}" for o in args.overrides),
        "metric": metric,
        "cpus": os.cpu_count(),
        "load_average_1_5_15_before": [round(x, 2) for x in load_before],
        "load_average_1_5_15_after": [round(x, 2) for x in os.getloadavg()],
        "mean_unseen_held_out": means,
        "pbt_beats_random_per_seed": [u["pbt_best"] > u["random_best"] for u in unseen
                                      if "pbt_best" in u and "random_best" in u],
        "runs": runs,
    }
    common.write_results(args.out, figures)
    shown = ("metric", "mean_unseen_held_out", "pbt_beats_random_per_seed")
    print(json.dumps({k: figures[k] for k in shown}, indent=2))


if __name__ == "__main__":
    main()
