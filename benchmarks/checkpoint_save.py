"""Run checkpoints: size on disk and seconds per save (and per restore) on a config's roles.

    python benchmarks/checkpoint_save.py --config default --saves 3
    python benchmarks/checkpoint_save.py --config default --saves 3 --uri   # output_dir a file:// URI

Launches the config's roles, takes one RL step (so the optimizer state exists, as in any real
checkpoint), then writes `--saves` checkpoints through the same code as `rayrlhf train`
(jobs/run/state.py RunState.save -> jobs/run/checkpoint.py) and restores the last one. Writes
benchmarks/results/checkpoint_save.json and prints a table. Not a test: figures only. With --uri the
run's output_dir is a file:// URI, which takes the road an object store does (each rank stages its
state and uploads it; a restore downloads it on each rank's node).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import common  # first: the offline defaults, before Ray, torch and transformers load

from rayrlhf.cluster.local import init_ray, shutdown_ray
from rayrlhf.cluster.storage import Storage
from rayrlhf.jobs.config.run import load_config
from rayrlhf.jobs.run.health import HealthMonitor, weighted_components
from rayrlhf.jobs.run.pipeline import Pipeline
from rayrlhf.jobs.run.recovery import Recovery
from rayrlhf.jobs.run.roles import launch
from rayrlhf.jobs.run.state import RunState
from rayrlhf.jobs.run.tracking import Tracker
from rayrlhf.jobs.data.sampler import PromptSampler
from rayrlhf.jobs.run.pipeline import rl_step
from rayrlhf.jobs.train import prepare


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def measure(name: str, saves: int, overrides: list[str], uri: bool = False) -> dict:
    with tempfile.TemporaryDirectory(prefix="rayrlhf-ckpt-bench-") as tmp:
        location = f"file://{tmp}/bucket" if uri else tmp
        driver = Path(tmp) / "driver" if uri else Path(tmp)  # the driver's own copy of a URI run
        cfg = load_config(name, [f"output_dir={location}", "logging.wandb=disabled", "logging.tensorboard=false",
                                 "logging.progress_bar=false", f"checkpoint.keep={saves}", *overrides])
        train_set, _ = prepare(cfg)
        init_ray(cfg.cluster.address, cfg.cluster.num_cpus, cfg.cluster.object_store_mb)
        roles = launch(cfg)
        tracker = Tracker(driver, run_name=cfg.name, config={}, total_steps=1, wandb_mode="disabled",
                          wandb_project="", tensorboard=False, progress_bar=False)
        monitor = HealthMonitor(cfg.monitor.model_dump(), weighted_components(cfg.reward))
        sampler, recovery = PromptSampler(train_set, cfg.seed), Recovery(roles, cfg.fault_tolerance)
        pipeline = Pipeline(cfg, roles, recovery, sampler)
        run = RunState(cfg, driver, roles, sampler, tracker, recovery, monitor, pipeline,
                       remote=Storage(location) if uri else None)
        try:
            rl_step(cfg, roles, run.sampler.draw(cfg.prompts_per_step))
            run.step = 1
            seconds, path = [], None
            for i in range(saves):
                run.step = 1 + i
                start = time.perf_counter()
                path = run.save()
                seconds.append(time.perf_counter() - start)
            start = time.perf_counter()
            run.restore(path)
            restore_s = time.perf_counter() - start
            stored = Path(tmp) / "bucket" / "checkpoints" / path.name if uri else path
            size = folder_bytes(stored)
            learner = folder_bytes(stored / "learner")
        finally:
            tracker.close()
            roles.shutdown()
            shutdown_ray()
    return {
        "model": cfg.policy.model, "learner_ranks": cfg.learner.num_ranks, "zero_stage": cfg.learner.zero_stage,
        "bytes": size, "learner_bytes": learner, "save_s": seconds, "save_median_s": statistics.median(seconds),
        "restore_s": restore_s, "output_dir": "file:// URI" if uri else "path",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="default")
    parser.add_argument("--saves", type=int, default=3)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE")
    parser.add_argument("--uri", action="store_true", help="output_dir as a file:// URI (staged and uploaded)")
    args = parser.parse_args()
    row = measure(args.config, args.saves, args.overrides, args.uri)
    print(f"\n== {args.config} ({row['model']}, {row['learner_ranks']} rank(s), ZeRO-{row['zero_stage']}, "
          f"output_dir a {row['output_dir']})")
    print(f"checkpoint size     {row['bytes'] / 2**20:10.1f} MiB (learner state {row['learner_bytes'] / 2**20:.1f} MiB)")
    print(f"seconds per save    {row['save_median_s']:10.2f} (median of {args.saves}: {row['save_s']})")
    print(f"seconds to restore  {row['restore_s']:10.2f}")
    common.write_results("checkpoint_save_uri.json" if args.uri else "checkpoint_save.json", {args.config: row})


if __name__ == "__main__":
    main()
