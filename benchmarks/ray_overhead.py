"""What a Ray worker process costs a fixed torch workload, and why: thread settings and niceness.

    python benchmarks/ray_overhead.py --repeats 3

The same 2-thread matmul loop runs in this process and in a 0.5-CPU actor of a local Ray started
(a) as `ray.init` does by default (workers at nice 15) and (b) as rayrlhf's `init_ray` does
(worker_niceness 0), interleaved so that load drifts hit every side alike. Also prints what the
actor sees: OMP_NUM_THREADS (Ray sets it to the actor's CPU count, at least 1), torch threads
before/after `torch.set_num_threads`, and its niceness. Writes benchmarks/results/ray_overhead.json.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import common  # first: the offline defaults, before Ray, torch and transformers load
import ray

from rayrlhf.cluster.offline import dead_end_proxy


def workload(threads: int) -> float:
    import torch

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    a = torch.randn(1024, 1024)
    start = time.perf_counter()
    for _ in range(40):
        a = torch.tanh(a @ a.T / 32)
    return time.perf_counter() - start


class Probe:
    def info(self) -> dict:
        import torch

        before = torch.get_num_threads()
        torch.set_num_threads(2)
        return {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"), "torch_threads_before": before,
                "torch_threads_after": torch.get_num_threads(), "nice": os.nice(0)}  # fmt: skip

    def work(self, threads: int) -> float:
        return workload(threads)


def measure(worker_niceness: int | None, repeats: int) -> dict:
    system = {} if worker_niceness is None else {"_system_config": {"worker_niceness": worker_niceness}}
    with dead_end_proxy():  # Ray's cloud-metadata probe must not leave the machine
        ray.init(address="local", num_cpus=2, object_store_memory=256 << 20, include_dashboard=False, **system)
    try:
        probe = ray.remote(num_cpus=0.5)(Probe).remote()
        info = ray.get(probe.info.remote())
        ray.get(probe.work.remote(2))  # warm-up
        plain, actor = [], []
        for _ in range(repeats):
            plain.append(workload(2))
            actor.append(ray.get(probe.work.remote(2)))
    finally:
        ray.shutdown()
    return {"actor_sees": info, "plain_s": statistics.median(plain),
            "actor_s": statistics.median(actor), "actor_over_plain": statistics.median(actor) / statistics.median(plain)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    report = {"ray_default": measure(None, args.repeats), "worker_niceness_0": measure(0, args.repeats)}
    for name, r in report.items():
        print(f"{name:<18} actor sees {r['actor_sees']}   plain {r['plain_s']:.2f} s   actor {r['actor_s']:.2f} s   "
              f"ratio {r['actor_over_plain']:.2f}x")  # fmt: skip
    common.write_results("ray_overhead.json", report)


if __name__ == "__main__":
    main()
