"""From a stop to a saved checkpoint: SIGTERM to a running `rayrlhf train`, seconds until it has exited
with its checkpoint written (what `ray job stop` or a preemption must fit in its grace period).

    python benchmarks/stop_to_saved.py --config default --after-steps 2 --repeats 2

Each repeat starts the run in its own process (a fresh output_dir), waits until `metrics.jsonl` has
`--after-steps` steps, sends SIGTERM to the driver, and times: the signal to the checkpoint's
manifest, and the signal to the driver's exit (it finishes the step under way, saves, then stops
its roles). Also reports the default's time-based checkpointing cost per hour from the measured
save (`checkpoint.every_minutes`). Writes benchmarks/results/stop_to_saved.json.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common  # first: the offline defaults

from rayrlhf.jobs.config.run import load_config


def steps_logged(metrics: Path) -> int:
    return sum(1 for _ in metrics.open()) if metrics.exists() else 0


def one_stop(config: str, after_steps: int, folder: Path, timeout: float) -> dict:
    cmd = [sys.executable, "-m", "rayrlhf.jobs.cli", "train", "--config", config, "--set", f"output_dir={folder}",
           "--set", "logging.wandb=disabled", "--set", "eval_every=0", "--set", "data.num_eval=8"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=dict(os.environ))
    try:
        deadline = time.monotonic() + timeout
        while steps_logged(folder / "metrics.jsonl") < after_steps:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the run ended or stalled before step {after_steps} (exit {proc.poll()})")
            time.sleep(0.2)
        start = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        saved = None
        while proc.poll() is None:
            if saved is None and list(folder.glob("checkpoints/step_*/manifest.json")):
                saved = time.monotonic() - start
            if time.monotonic() > deadline:
                raise RuntimeError("the run did not stop")
            time.sleep(0.05)
        exited = time.monotonic() - start
        saved = saved if saved is not None else (exited if list(folder.glob("checkpoints/step_*/manifest.json")) else None)
        steps = sorted(p.name for p in folder.glob("checkpoints/step_*"))
        return {"exit_code": proc.returncode, "signal_to_saved_s": saved, "signal_to_exit_s": exited, "checkpoints": steps}
    finally:
        if proc.poll() is None:
            proc.kill()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="default")
    parser.add_argument("--after-steps", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=900)
    args = parser.parse_args()
    runs = []
    for i in range(args.repeats):
        with tempfile.TemporaryDirectory(prefix="stop_to_saved-") as tmp:
            run = one_stop(args.config, args.after_steps, Path(tmp) / "run", args.timeout)
        print(f"repeat {i}: {json.dumps(run)}", flush=True)
        runs.append(run)
    cfg = load_config(args.config)
    saved = [r["signal_to_saved_s"] for r in runs if r["signal_to_saved_s"] is not None]
    report = {"config": args.config, "after_steps": args.after_steps, "runs": runs,
              "median_signal_to_saved_s": statistics.median(saved) if saved else None,
              "median_signal_to_exit_s": statistics.median(r["signal_to_exit_s"] for r in runs),
              "checkpoint_every_minutes": cfg.checkpoint.every_minutes, "checkpoint_keep": cfg.checkpoint.keep}  # fmt: skip
    print(f"signal to checkpoint: median {report['median_signal_to_saved_s']} s; to exit: "
          f"{report['median_signal_to_exit_s']:.1f} s")
    common.write_results(f"stop_to_saved_{args.config}.json", report)


if __name__ == "__main__":
    main()
