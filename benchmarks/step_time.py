"""Step-time breakdown, and what Ray costs: one RL step through Ray actors vs the same roles
called directly in one plain process (same model, batch and thread settings), their steps
interleaved; the cost is the median over steps of Ray's step time over the plain one's.

    python benchmarks/step_time.py --configs tiny default --steps 6

Writes benchmarks/results/step_time.json and prints a table. Not a test: figures only.
"""

from __future__ import annotations

import argparse
import statistics
import time

import common  # first: the offline defaults, before Ray, torch and transformers load

import torch

from rayrlhf.actors.rl.trajectory import LearnerBatch
from rayrlhf.cluster.local import init_ray, shutdown_ray
from rayrlhf.jobs.config.run import load_config
from rayrlhf.jobs.run.roles import launch, role_table
from rayrlhf.jobs.data.sampler import PromptSampler
from rayrlhf.jobs.run.pipeline import rl_step
from rayrlhf.jobs.train import prepare

PHASES = ("generate", "score", "reference", "learn", "sync", "step")
"""Phases as the driver times them; "learn_compute" is the learner's own time inside its learn call."""


class RaySide:
    """The roles as `rayrlhf train` launches them: Ray actors, one step at a time through rl_step."""

    def __init__(self, cfg):
        init_ray(cfg.cluster.address, cfg.cluster.num_cpus, cfg.cluster.object_store_mb)
        self.cfg, self.roles = cfg, launch(cfg)

    def step(self, prompts) -> dict:
        m = rl_step(self.cfg, self.roles, prompts)
        return {p: m[f"time/{p}"] for p in PHASES} | {"learn_compute": m["learn_seconds"], "tokens": m["tokens"]}

    def close(self) -> None:
        self.roles.shutdown()
        shutdown_ray()


class PlainSide:
    """The same roles as plain objects in this process: the computation without Ray."""

    def __init__(self, cfg):
        port = common.free_port()
        single = cfg.model_copy(update={"learner": cfg.learner.model_copy(update={"num_ranks": 1})})
        roles = {role.name: role for role in role_table(single)}
        self.learner = roles["learner"].instantiate(master_addr="127.0.0.1", master_port=port)
        self.worker = roles["rollout"].instantiate()
        self.scorer = roles["reward"].instantiate()
        self.reference = roles["reference"].instantiate() if "reference" in roles else None
        torch.set_num_threads(cfg.rollout.torch_threads)

    def step(self, prompts) -> dict:
        t0 = time.perf_counter()
        traj = self.worker.generate(prompts)
        t1 = time.perf_counter()
        rewards = self.scorer.score(traj)
        t2 = time.perf_counter()
        ref = self.reference.logprobs(traj) if self.reference else None
        t3 = time.perf_counter()
        metrics = self.learner.learn(LearnerBatch.join([traj], [rewards], [ref]))
        t4 = time.perf_counter()
        self.worker.load_weights(metrics["version"], self.learner.get_weights())
        t5 = time.perf_counter()
        return {"generate": t1 - t0, "score": t2 - t1, "reference": t3 - t2, "learn": t4 - t3,
                "sync": t5 - t4, "step": t5 - t0, "learn_compute": metrics["learn_seconds"], "tokens": metrics["tokens"]}


def paired_steps(cfg, train_set, steps: int) -> tuple[list[dict], list[dict]]:
    """Both sides alive at once, their steps interleaved (the order alternating), so that a slow
    minute of a shared machine falls on both; each side draws the same prompts in the same order."""
    ray_side = RaySide(cfg)
    try:
        plain_side = PlainSide(cfg)
        samplers = {"ray": PromptSampler(train_set, cfg.seed), "plain": PromptSampler(train_set, cfg.seed)}
        sides = {"ray": ray_side, "plain": plain_side}
        rows: dict[str, list[dict]] = {"ray": [], "plain": []}
        for i in range(steps + 1):  # step 0 warms both up and is not kept
            for name in ("ray", "plain") if i % 2 == 0 else ("plain", "ray"):
                row = sides[name].step(samplers[name].draw(cfg.prompts_per_step))
                if i > 0:
                    rows[name].append(row)
        return rows["ray"], rows["plain"]
    finally:
        ray_side.close()


def summarise(rows: list[dict]) -> dict:
    return {k: statistics.median(r[k] for r in rows) for k in rows[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=["tiny", "default"])
    parser.add_argument("--steps", type=int, default=6, help="timed steps per side after one warm-up step")
    args = parser.parse_args()
    report = {"torch_threads": torch.get_num_threads(), "results": {}}
    for name in args.configs:
        # Single-rank learner on both sides, so the comparison isolates Ray, not ZeRO communication.
        cfg = load_config(name, ["logging.wandb=disabled"])
        train_set, _ = prepare(cfg)
        ray_rows, plain_rows = paired_steps(cfg, train_set, args.steps)
        ray_med, plain_med = summarise(ray_rows), summarise(plain_rows)
        step_ratios = [r["step"] / p["step"] for r, p in zip(ray_rows, plain_rows)]
        report["results"][name] = {
            "model": cfg.policy.model, "prompts_per_step": cfg.prompts_per_step,
            "samples_per_prompt": cfg.rollout.samples_per_prompt, "max_new_tokens": cfg.rollout.max_new_tokens,
            "ray_median_s": ray_med, "plain_median_s": plain_med,
            "ray_over_plain": statistics.median(step_ratios),
            "ray_over_plain_per_step": step_ratios,
            "sync_fraction_of_step": ray_med["sync"] / ray_med["step"],
            "ray_steps": ray_rows, "plain_steps": plain_rows,
        }
        print(f"\n== {name} ({cfg.policy.model}), median of {args.steps} steps, seconds")
        print(f"{'phase':<10}{'ray':>10}{'plain':>10}")
        for phase in (*PHASES, "learn_compute"):
            print(f"{phase:<10}{ray_med[phase]:>10.3f}{plain_med[phase]:>10.3f}")
        print(f"ray / plain step time: {statistics.median(step_ratios):.3f} (median of the {len(step_ratios)} paired steps: "
              f"{', '.join(f'{r:.3f}' for r in step_ratios)})")
        print(f"weight sync (learner -> rollout, through the object store): {ray_med['sync'] / ray_med['step']:.1%} of the step")
    common.write_results("step_time.json", report)


if __name__ == "__main__":
    main()
