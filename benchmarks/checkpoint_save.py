"""Run checkpoints: size on disk and seconds per save (and per restore) on a config's roles.

    python benchmarks/checkpoint_save.py --config default --saves 3

Launches the config's roles, takes one RL step (so the optimizer state exists, as in any real
checkpoint), then writes `--saves` checkpoints through the same code as `rayrlhf train`
(jobs/run_state.py RunState.save -> jobs/checkpoint.py) and restores the last one. Writes
benchmarks/results/checkpoint_save.json and prints a table. Not a test: figures only.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from rayrlhf.cluster.offline import apply_offline_defaults

apply_offline_defaults()

from rayrlhf.cluster.local import init_ray, shutdown_ray
from rayrlhf.jobs.config.run import load_config
from rayrlhf.jobs.health import HealthMonitor, weighted_components
from rayrlhf.jobs.pipeline import Pipeline
from rayrlhf.jobs.recovery import Recovery
from rayrlhf.jobs.roles import launch
from rayrlhf.jobs.run_state import RunState
from rayrlhf.jobs.tracking import Tracker
from rayrlhf.jobs.train import PromptSampler, prepare, rl_step

RESULTS = Path(__file__).resolve().parent / "results"


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def measure(name: str, saves: int, overrides: list[str]) -> dict:
    with tempfile.TemporaryDirectory(prefix="rayrlhf-ckpt-bench-") as tmp:
        cfg = load_config(name, [f"output_dir={tmp}", "logging.wandb=disabled", "logging.tensorboard=false",
                                 "logging.progress_bar=false", f"checkpoint.keep={saves}", *overrides])
        train_set, _ = prepare(cfg)
        init_ray(cfg.cluster.address, cfg.cluster.num_cpus, cfg.cluster.object_store_mb)
        roles = launch(cfg)
        tracker = Tracker(Path(tmp), run_name=cfg.name, config={}, total_steps=1, wandb_mode="disabled",
                          wandb_project="", tensorboard=False, progress_bar=False)
        monitor = HealthMonitor(cfg.monitor.model_dump(), weighted_components(cfg.reward))
        sampler, recovery = PromptSampler(train_set, cfg.seed), Recovery(roles, cfg.fault_tolerance)
        pipeline = Pipeline(cfg, roles, recovery, lambda: sampler.draw(cfg.prompts_per_step))
        run = RunState(cfg, Path(tmp), roles, sampler, tracker, recovery, monitor, pipeline)
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
            size = folder_bytes(path)
            learner = folder_bytes(path / "learner")
        finally:
            tracker.close()
            roles.shutdown()
            shutdown_ray()
    return {
        "model": cfg.policy.model, "learner_ranks": cfg.learner.num_ranks, "zero_stage": cfg.learner.zero_stage,
        "bytes": size, "learner_bytes": learner, "save_s": seconds, "save_median_s": statistics.median(seconds),
        "restore_s": restore_s,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="default")
    parser.add_argument("--saves", type=int, default=3)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE")
    args = parser.parse_args()
    row = measure(args.config, args.saves, args.overrides)
    print(f"\n== {args.config} ({row['model']}, {row['learner_ranks']} rank(s), ZeRO-{row['zero_stage']})")
    print(f"checkpoint size     {row['bytes'] / 2**20:10.1f} MiB (learner state {row['learner_bytes'] / 2**20:.1f} MiB)")
    print(f"seconds per save    {row['save_median_s']:10.2f} (median of {args.saves}: {row['save_s']})")
    print(f"seconds to restore  {row['restore_s']:10.2f}")
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "checkpoint_save.json"
    out.write_text(json.dumps({args.config: row}, indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
