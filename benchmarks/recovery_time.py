"""Seconds from a rollout worker's death to the next finished step, beside a step without a fault.

    python benchmarks/recovery_time.py                                    # the default config
    python benchmarks/recovery_time.py --config tiny --steps 3 --kill-step 2 --num-eval 4   # a check that it runs

The rollout worker is killed (SIGKILL) in the middle of its generate call of step `--kill-step`.
The run restarts it (Ray reruns its constructor: the model loads again), loads the current weights
and sampling counter into it and redoes the step from its start. Reported: seconds from the kill to
the end of that step, the median time of the other steps after the first (warm-up) one, and the
difference (what the fault cost).
Writes benchmarks/results/recovery_time_<config>.json. Not a test: figures only, on an idle machine.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import common  # first: the offline defaults, before Ray, torch and transformers load

from rayrlhf.cluster.faults import Fault
from rayrlhf.jobs.config.run import load_config
from rayrlhf.jobs.train import train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="default")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--kill-step", type=int, default=3, help="the step whose generation is interrupted (>= 2)")
    parser.add_argument("--num-eval", type=int, default=8, help="held-out prompts (evaluation is not timed)")
    args = parser.parse_args()
    if not 2 <= args.kill_step <= args.steps or args.steps < 3:
        parser.error("--kill-step must be between 2 and --steps, and --steps at least 3 (a step to compare with)")
    cfg = load_config(args.config, [
        f"steps={args.steps}", f"data.num_eval={args.num_eval}", "logging.wandb=disabled",
        f"output_dir=outputs/bench_recovery_{args.config}",
    ])
    fault = Fault("RolloutWorker", "generate", after=args.kill_step - 1)
    ends: dict[int, float] = {}

    def on_step(step: int, metrics: dict[str, float]) -> None:
        ends[step] = time.perf_counter()
        fault.on_step(step, metrics)

    result = train(cfg, on_step=on_step)
    killed_step = next(h for h in result.history if h["step"] == args.kill_step)
    recovered_s = ends[args.kill_step] - fault.at
    normal_s = statistics.median(h["time/step"] for h in result.history if h["step"] not in (1, args.kill_step))
    report = {
        "config": args.config, "model": cfg.policy.model, "steps": args.steps, "kill_step": args.kill_step,
        "killed_in_generate": fault.in_call, "kill_to_step_end_s": recovered_s, "other_steps_median_s": normal_s,
        "fault_cost_s": recovered_s - normal_s, "restarts": killed_step["faults/restarts/rollout"],
        "redone_phases": killed_step["faults/redone"], "load_average_after": os.getloadavg(),
        "step_times_s": [h["time/step"] for h in result.history],
    }
    print(f"\n== {args.config}: rollout worker killed during step {args.kill_step}'s generate "
          f"(in the call: {fault.in_call})")
    print(f"kill -> end of that step   {recovered_s:8.2f} s")
    print(f"other steps (median)       {normal_s:8.2f} s   (step 1, the warm-up, left out)")
    print(f"cost of the fault          {recovered_s - normal_s:8.2f} s")
    common.write_results(f"recovery_time_{args.config}.json", report)


if __name__ == "__main__":
    main()
