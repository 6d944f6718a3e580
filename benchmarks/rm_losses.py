"""Reward-model losses side by side: `rayrlhf train-rm` on the embedded default (all-MiniLM-L6-v2,
the built-in preference set, 2 Ray Train workers with DeepSpeed ZeRO-2 on 2 CPU cores), once per
loss, with held-out pairwise accuracy (overall and per rejection kind) and wall time.

    python benchmarks/rm_losses.py                      # every loss
    python benchmarks/rm_losses.py --losses bradley_terry hinge --set data.num_train=512

Writes benchmarks/results/rm_losses.json and prints a table. Not a test: figures only.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import common  # first: the offline defaults, before Ray, torch and transformers load

from rayrlhf.actors.supervised.rm_losses import LOSSES
from rayrlhf.cluster.local import init_ray, shutdown_ray
from rayrlhf.jobs.config.supervised import RMConfig, load_job_config
from rayrlhf.jobs.train_rm import train_rm

KINDS = ("wrong", "truncated", "off_topic", "corrupted")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="rm")
    parser.add_argument("--losses", nargs="+", default=list(LOSSES), choices=LOSSES)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE")
    args = parser.parse_args()
    report: dict = {"config": args.config, "overrides": args.overrides, "results": {}}
    init_ray()  # one Ray for every run: its start-up is not part of a run's time
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for loss in args.losses:
                cfg = load_job_config(
                    RMConfig, args.config,
                    [*args.overrides, f"loss.name={loss}", f"output_dir={tmp}/{loss}", "resume=false"], "rm.yaml",
                )
                start = time.perf_counter()
                result = train_rm(cfg)
                seconds = time.perf_counter() - start
                report["results"][loss] = {"seconds": seconds, "before": result.before, "after": result.after}
                report["settings"] = {
                    "model": cfg.model, "num_train": cfg.data.num_train, "num_eval": cfg.data.num_eval,
                    "workers": cfg.trainer.num_workers, "zero_stage": cfg.trainer.zero_stage,
                    "micro_batch_size": cfg.trainer.micro_batch_size, "epochs": cfg.trainer.epochs,
                    "lr": cfg.trainer.lr,
                }
    finally:
        shutdown_ray()
    print(f"\n{'loss':<15}{'before':>8}{'after':>8}" + "".join(f"{k:>11}" for k in KINDS) + f"{'seconds':>9}")
    for loss, r in report["results"].items():
        kinds = "".join(f"{r['after'].get(f'eval/accuracy_{k}', float('nan')):>11.3f}" for k in KINDS)
        before, after = r["before"]["eval/pairwise_accuracy"], r["after"]["eval/pairwise_accuracy"]
        print(f"{loss:<15}{before:>8.3f}{after:>8.3f}{kinds}{r['seconds']:>9.0f}")
    common.write_results("rm_losses.json", report)


if __name__ == "__main__":
    main()
