"""What keeping freed host memory is worth (actors/runtime/host_memory.py): the learner's learn call with and
without the allocator setting, on the same batch, in two Ray actors whose calls alternate.

    python benchmarks/host_memory.py --rounds 8

Each round trains both learners once on the same rollout batch of the default config (SmolLM2, 16
rows), which goes first alternating. Reports per call: seconds, minor page faults and resident memory,
and the median over rounds after the first two (glibc's heap settles by then); writes
benchmarks/results/host_memory.json. Not a test: figures only, and only on an idle machine.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import time
from dataclasses import replace
from pathlib import Path

import common  # first: the offline defaults, before Ray, torch and transformers load

import ray

import rayrlhf.actors.learner as learner_module
from rayrlhf.actors.learner import Learner
from rayrlhf.actors.rl.trajectory import LearnerBatch
from rayrlhf.cluster.local import init_ray, shutdown_ray
from rayrlhf.jobs.config.run import load_config
from rayrlhf.jobs.run.roles import role_table
from rayrlhf.jobs.data.sampler import PromptSampler
from rayrlhf.jobs.train import prepare

SETTLED = 2
"""Rounds left out of the medians: the first calls fault their working set in either way."""


class MeasuredLearner(Learner):
    """The learner plus one timed call; `keep=False` skips the allocator setting in this process."""

    def __init__(self, keep: bool, **settings):
        if not keep:
            learner_module.keep_freed_memory = lambda device: False
        super().__init__(**settings)

    def measured_learn(self, batch: LearnerBatch) -> dict:
        batch = replace(batch, trajectory=replace(batch.trajectory, policy_version=self.version))
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        start = time.perf_counter()
        self.learn(batch)
        seconds = time.perf_counter() - start
        rss_pages = int(Path("/proc/self/statm").read_text().split()[1])
        return {"s": seconds, "page_faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults,
                "rss_mb": rss_pages * os.sysconf("SC_PAGE_SIZE") / 2**20}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=8)
    args = parser.parse_args()
    if args.rounds <= SETTLED:
        parser.error(f"--rounds must exceed the {SETTLED} settling rounds")
    cfg = load_config("default", ["logging.wandb=disabled"])
    train_set, _ = prepare(cfg)
    roles = {role.name: role for role in role_table(cfg)}
    worker, scorer, reference = (roles[name].instantiate() for name in ("rollout", "reward", "reference"))
    traj = worker.generate(PromptSampler(train_set, cfg.seed).draw(cfg.prompts_per_step))
    batch = LearnerBatch.join([traj], [scorer.score(traj)], [reference.logprobs(traj)])
    del worker, scorer, reference

    init_ray(cfg.cluster.address, cfg.cluster.num_cpus, cfg.cluster.object_store_mb)
    try:
        learner = roles["learner"]
        remote = ray.remote(MeasuredLearner).options(num_cpus=learner.num_cpus)
        sides = {}
        for name, keep in (("kept", True), ("glibc_default", False)):
            port = common.free_port()  # each learner is a world of one: its own port for its gloo group
            sides[name] = remote.remote(keep, **learner.settings(0), master_addr="127.0.0.1", master_port=port)
        batch_ref = ray.put(batch)
        rows = {name: [] for name in sides}
        for i in range(args.rounds):
            for name in list(sides) if i % 2 == 0 else list(sides)[::-1]:
                rows[name].append(ray.get(sides[name].measured_learn.remote(batch_ref)))
            print(i, {name: {k: round(v, 2) for k, v in r[-1].items()} for name, r in rows.items()}, flush=True)
    finally:
        shutdown_ray()
    median = {name: {k: statistics.median(r[k] for r in rs[SETTLED:]) for k in rs[0]} for name, rs in rows.items()}
    ratios = [k["s"] / d["s"] for k, d in zip(rows["kept"][SETTLED:], rows["glibc_default"][SETTLED:])]
    report = {"rows": len(traj), "tokens": float(traj.response_mask.sum()), "rounds": rows, "median": median,
              "kept_over_default_s": statistics.median(ratios)}  # fmt: skip
    print(f"\nmedian of rounds {SETTLED}..{args.rounds - 1}:")
    for name, m in median.items():
        print(f"{name:<14} {m['s']:7.2f} s  {m['page_faults']:>9.0f} page faults  {m['rss_mb']:7.0f} MB resident")
    print(f"kept / default learn time (median of paired rounds): {report['kept_over_default_s']:.3f}")
    common.write_results("host_memory.json", report)


if __name__ == "__main__":
    main()
