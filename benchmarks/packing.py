"""Packed and shared-prompt vs padded: the learner's step and the reference's log-probs on one real rollout batch.

    python benchmarks/packing.py --configs default math --repeats 5
    python benchmarks/packing.py --configs default learner.pack_tokens=256   # another row budget

One learner and one reference per config; each timed call switches them between padded rows, the
step's real tokens packed into rows of learner.pack_tokens, and packed with each group's prompt run
once (learner.share_prompts; docs/performance_packing.md), the sides interleaved so that load drifts
hit all alike. Also reports the tokens each side runs the
model on. Writes benchmarks/results/packing.json. Not a test: figures only, on an idle machine.
"""

from __future__ import annotations

import argparse
import statistics
import time

import common  # first: the offline defaults, before Ray, torch and transformers load

import numpy as np
import torch
from lean import learner_times

from rayrlhf.actors.rl.logprobs import first_response_column
from rayrlhf.actors.rl.packing import packed_layout, shared_prompt_layout
from rayrlhf.actors.rl.trajectory import LearnerBatch, Rewards
from rayrlhf.jobs.config.run import load_config
from rayrlhf.jobs.data.sampler import PromptSampler
from rayrlhf.jobs.run.roles import role_table
from rayrlhf.jobs.train import prepare


def measure(config: str, overrides: list[str], repeats: int) -> dict:
    cfg = load_config(config, ["logging.wandb=disabled", *overrides])
    train_set, _ = prepare(cfg)
    single = cfg.model_copy(update={"learner": cfg.learner.model_copy(update={"num_ranks": 1})})
    roles = {role.name: role for role in role_table(single)}
    if "reference" not in roles:
        raise SystemExit(f"{config} runs no reference policy (kl.coef=0): set kl.coef to time one")
    worker, scorer, reference = (roles[name].instantiate() for name in ("rollout", "reward", "reference"))
    traj = worker.generate(PromptSampler(train_set, cfg.seed).draw(cfg.prompts_per_step))
    del worker
    rewards = scorer.score(traj)
    learner = roles["learner"].instantiate(master_addr="127.0.0.1", master_port=common.free_port())
    torch.set_num_threads(cfg.learner.torch_threads)
    budget = cfg.learner.pack_tokens
    sides = {"padded": (None, False), "packed": (budget, False), "shared": (budget, True)}

    def switch(pack_tokens, share_prompts):
        reference.pack_tokens = learner.engine.module.pack_tokens = pack_tokens
        reference.share_prompts = learner.engine.module.share_prompts = share_prompts

    batch = None
    times = {f"{part}_{side}": [] for part in ("reference", "learn") for side in sides}
    for i in range(repeats + 2):  # two warm-up rounds: the heap settles (actors/runtime/host_memory.py)
        for side, setting in sides.items():
            switch(*setting)
            t0 = time.perf_counter()
            ref = reference.logprobs(traj)
            ref_s = time.perf_counter() - t0
            if batch is None:
                scores = Rewards(rewards.total, rewards.raw_total, rewards.components)
                batch = LearnerBatch.join([traj], [scores], [ref])
            learn_s = learner_times(learner, batch, 1, False)[0]
            if i >= 2:
                times[f"reference_{side}"].append(ref_s)
                times[f"learn_{side}"].append(learn_s)
    medians = {f"{name}_s": statistics.median(t) for name, t in times.items()}
    mask = torch.from_numpy(traj.attention_mask)
    ids = torch.from_numpy(traj.input_ids)
    packed_ids = packed_layout(ids, mask, budget).input_ids
    start = first_response_column(torch.from_numpy(traj.response_mask))
    shared_ids = shared_prompt_layout(ids, mask, start, budget).input_ids
    return medians | {
        "rows": len(traj), "padded_tokens": mask.numel(), "real_tokens": int(mask.sum()),
        "packed_rows": packed_ids.shape[0], "packed_tokens": packed_ids.numel(), "pack_tokens": budget,
        "shared_rows": shared_ids.shape[0], "shared_tokens": shared_ids.numel(),
        "response_tokens": int(np.sum(traj.response_mask)),
        **{f"{part}_speedup_{side}": medians[f"{part}_padded_s"] / medians[f"{part}_{side}_s"]
           for part in ("learn", "reference") for side in ("packed", "shared")},
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=["default", "math"])
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per side (after two warm-up rounds)")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. learner.pack_tokens=256")
    args = parser.parse_args()
    report = {}
    for config in args.configs:
        r = report[config] = measure(config, args.overrides, args.repeats)
        print(f"{config}: {r['rows']} rows, {r['real_tokens']} real tokens in {r['padded_tokens']} padded / "
              f"{r['packed_tokens']} packed ({r['packed_rows']} rows of <= {r['pack_tokens']}) / "
              f"{r['shared_tokens']} with shared prompts ({r['shared_rows']} rows)")
        for part in ("learn", "reference"):
            print(f"  {part:9} padded {r[f'{part}_padded_s']:.3f} s   packed {r[f'{part}_packed_s']:.3f} s "
                  f"({r[f'{part}_speedup_packed']:.2f}x)   shared {r[f'{part}_shared_s']:.3f} s "
                  f"({r[f'{part}_speedup_shared']:.2f}x)")  # fmt: skip
    common.write_results("packing.json", {"overrides": args.overrides, **report})


if __name__ == "__main__":
    main()
