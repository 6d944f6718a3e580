"""Step-time breakdown, and what Ray costs: one RL step through Ray actors vs the same roles
called directly in one plain process (same model, batch and thread settings), side by side.

    python benchmarks/step_time.py --configs tiny default --steps 3

Writes benchmarks/results/step_time.json and prints a table. Not a test: figures only.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import time
from pathlib import Path

from rayrlhf.cluster.offline import apply_offline_defaults

apply_offline_defaults()

import torch

from rayrlhf.actors.trajectory import LearnerBatch
from rayrlhf.cluster.local import init_ray, shutdown_ray
from rayrlhf.jobs.config.run import load_config
from rayrlhf.jobs.roles import launch, role_table
from rayrlhf.jobs.train import PromptSampler, prepare, rl_step

RESULTS = Path(__file__).resolve().parent / "results"
PHASES = ("generate", "score", "reference", "learn", "sync", "step")


def ray_steps(cfg, sampler, steps: int) -> list[dict]:
    init_ray(cfg.cluster.address, cfg.cluster.num_cpus, cfg.cluster.object_store_mb)
    roles = launch(cfg)
    try:
        rl_step(cfg, roles, sampler.draw(cfg.prompts_per_step))  # warm-up
        return [
            {p: m[f"time/{p}"] for p in PHASES} | {"tokens": m["tokens"]}
            for m in (rl_step(cfg, roles, sampler.draw(cfg.prompts_per_step)) for _ in range(steps))
        ]
    finally:
        roles.shutdown()
        shutdown_ray()


def plain_steps(cfg, sampler, steps: int) -> list[dict]:
    """The same roles as plain objects in this process: the computation without Ray."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    single = cfg.model_copy(update={"learner": cfg.learner.model_copy(update={"num_ranks": 1})})
    roles = {role.name: role for role in role_table(single)}
    learner = roles["learner"].instantiate(master_addr="127.0.0.1", master_port=port)
    worker = roles["rollout"].instantiate()
    scorer = roles["reward"].instantiate()
    reference = roles["reference"].instantiate() if "reference" in roles else None
    torch.set_num_threads(cfg.rollout.torch_threads)

    def step() -> dict:
        t0 = time.perf_counter()
        traj = worker.generate(sampler.draw(cfg.prompts_per_step))
        t1 = time.perf_counter()
        rewards = scorer.score(traj)
        t2 = time.perf_counter()
        ref = reference.logprobs(traj) if reference else None
        t3 = time.perf_counter()
        metrics = learner.learn(LearnerBatch.join([traj], [rewards], [ref]))
        t4 = time.perf_counter()
        worker.load_weights(metrics["version"], learner.get_weights())
        t5 = time.perf_counter()
        return {"generate": t1 - t0, "score": t2 - t1, "reference": t3 - t2, "learn": t4 - t3,
                "sync": t5 - t4, "step": t5 - t0, "tokens": metrics["tokens"]}

    step()  # warm-up
    return [step() for _ in range(steps)]


def summarise(rows: list[dict]) -> dict:
    return {k: statistics.median(r[k] for r in rows) for k in rows[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=["tiny", "default"])
    parser.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up step")
    args = parser.parse_args()
    report = {"torch_threads": torch.get_num_threads(), "results": {}}
    for name in args.configs:
        # Single-rank learner on both sides, so the comparison isolates Ray, not ZeRO communication.
        cfg = load_config(name, ["logging.wandb=disabled"])
        train_set, _ = prepare(cfg)
        ray_rows = ray_steps(cfg, PromptSampler(train_set, cfg.seed), args.steps)
        plain_rows = plain_steps(cfg, PromptSampler(train_set, cfg.seed), args.steps)
        ray_med, plain_med = summarise(ray_rows), summarise(plain_rows)
        report["results"][name] = {
            "model": cfg.policy.model, "prompts_per_step": cfg.prompts_per_step,
            "samples_per_prompt": cfg.rollout.samples_per_prompt, "max_new_tokens": cfg.rollout.max_new_tokens,
            "ray_median_s": ray_med, "plain_median_s": plain_med,
            "ray_over_plain": ray_med["step"] / plain_med["step"],
            "sync_fraction_of_step": ray_med["sync"] / ray_med["step"],
            "ray_steps": ray_rows, "plain_steps": plain_rows,
        }
        print(f"\n== {name} ({cfg.policy.model}), median of {args.steps} steps, seconds")
        print(f"{'phase':<10}{'ray':>10}{'plain':>10}")
        for phase in PHASES:
            print(f"{phase:<10}{ray_med[phase]:>10.3f}{plain_med[phase]:>10.3f}")
        print(f"ray / plain step time: {ray_med['step'] / plain_med['step']:.3f}")
        print(f"weight sync (learner -> rollout, through the object store): {ray_med['sync'] / ray_med['step']:.1%} of the step")
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "step_time.json"
    out.write_text(json.dumps(report, indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
