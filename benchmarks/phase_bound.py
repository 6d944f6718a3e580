"""How far each phase of an RL step is from what this machine can do: measured time, analytic bound.

    python benchmarks/phase_bound.py --configs default math --steps 6

The bound of a phase is its work at the machine's measured rates, measured first in this process
with the roles' thread count: a matmul rate (fp32 GFLOP/s, the model's own shapes, the faster of MKL
and oneDNN) and a memory bandwidth (GB/s, a large copy). The work counts only the tokens a step needs
(no padding; with learner.share_prompts each group's prompt once):
- forward FLOPs per token: 2 x (the weights of every matmul, the LM head included) + the attention
  over the positions before it (4 x layers x width x position);
- generate: each prompt's prefill, then every decode step costs max(reading the weights once,
  the FLOPs of the rows still decoding), for the rows' measured answer lengths;
- reference: one forward over the real tokens; learn: three (forward and backward) plus AdamW's pass
  over its state (read parameter, gradient and two moments, write three: 28 bytes a parameter);
- score: a forward of the embedding model over answers and references (counted with the policy's
  tokenizer: an estimate); sync: the weights written and read once through the object store.
The step's bound is generate + max(score, reference) + learn + sync, the phases as the synchronous
step runs them (score and reference overlap). Writes benchmarks/results/phase_bound.json.
"""

from __future__ import annotations

import argparse
import statistics
import time

import common  # first: the offline defaults, before Ray, torch and transformers load

import numpy as np
import ray
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from rayrlhf.actors.runtime.models import resolve_policy
from rayrlhf.cluster.local import init_ray, shutdown_ray
from rayrlhf.jobs.config.run import RunConfig, load_config
from rayrlhf.jobs.data.sampler import PromptSampler
from rayrlhf.jobs.run.pipeline import collect, learn_and_sync
from rayrlhf.jobs.run.recovery import Recovery
from rayrlhf.jobs.run.roles import launch
from rayrlhf.jobs.train import prepare

PHASES = ("generate", "score", "reference", "learn", "sync")
EMBEDDER_PARAMS = 22.7e6  # all-MiniLM-L6-v2's matmul weights (6 layers of width 384)


def matmul_gflops(threads: int, width: int, repeats: int = 20) -> float:
    """fp32 GFLOP/s of [512, width] x [width, 4 width], the shape of a decoder's MLP on a batch: the faster
    of MKL's sgemm (what F.linear calls) and oneDNN's packed GEMM (actors/runtime/cpu_linear.py)."""
    torch.set_num_threads(threads)
    a, b = torch.randn(512, width), torch.randn(width, 4 * width)
    packed = torch.ops.mkldnn._reorder_linear_weight(b.T.contiguous(), 512)
    rates = []
    for product in (lambda: a @ b, lambda: torch.ops.mkldnn._linear_pointwise(a, packed, None, "none", [], "")):
        product()
        t0 = time.perf_counter()
        for _ in range(repeats):
            product()
        rates.append(2 * 512 * width * 4 * width * repeats / (time.perf_counter() - t0) / 1e9)
    return max(rates)


def bandwidth_gbs(threads: int, mb: int = 512, repeats: int = 5) -> float:
    """GB/s of a copy (bytes read + bytes written) of a buffer far larger than the caches."""
    torch.set_num_threads(threads)
    src = torch.ones(mb * 2**20 // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)
    t0 = time.perf_counter()
    for _ in range(repeats):
        dst.copy_(src)
    return 2 * src.numel() * 4 * repeats / (time.perf_counter() - t0) / 1e9


class Model:
    """What the bound needs of the policy: its matmul weights, all its parameters, its shape."""

    def __init__(self, path: str) -> None:
        config = AutoConfig.from_pretrained(path)
        model = AutoModelForCausalLM.from_config(config)
        self.params = sum(p.numel() for p in model.parameters())
        embedding, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
        rest = self.params - embedding.numel() - (0 if head is embedding else head.numel())
        self.matmul = rest + head.numel()
        self.layers = config.num_hidden_layers
        self.width = config.hidden_size

    def forward_flops(self, lengths: np.ndarray, starts: np.ndarray | int = 0) -> float:
        """One forward over runs of tokens at positions start .. start + length - 1 (each attends to
        every position before it): whole sequences, or answers after a prompt already in the cache."""
        tokens = float(lengths.sum())
        positions = lengths * starts + lengths * (lengths - 1) / 2
        return 2 * self.matmul * tokens + 4 * self.layers * self.width * float(positions.sum())


def decode_seconds(model: Model, prompt_lens: np.ndarray, answer_lens: np.ndarray, k: int, flops: float, bw: float) -> float:
    """Prefill each prompt once for its k rows, then one weight read or the rows' FLOPs per decode step."""
    prefill = model.forward_flops(prompt_lens[::k]) / flops
    weight_read = model.params * 4 / bw
    steps = int(answer_lens.max())
    decode = sum(max(weight_read, 2 * model.matmul * int((answer_lens > t).sum()) / flops) for t in range(steps))
    return prefill + decode


def bounds(cfg: RunConfig, model: Model, traj, flops: float, bw: float) -> dict[str, float]:
    mask, answer = traj.attention_mask, traj.response_mask
    answer_lens = answer.sum(axis=1)
    prompt_lens = mask.sum(axis=1) - answer_lens
    real = mask.sum(axis=1)
    if cfg.learner.share_prompts:  # each group's prompt once, its answers after it (the shared layout)
        k = cfg.rollout.samples_per_prompt
        forward = model.forward_flops(prompt_lens[::k]) + model.forward_flops(answer_lens, prompt_lens)
        needed = prompt_lens[::k].sum() + answer_lens.sum()
    else:
        forward, needed = model.forward_flops(real), real.sum()
    score_tokens = 2 * answer_lens.sum()  # answers and references of about the same length
    return {
        "generate": decode_seconds(model, prompt_lens, answer_lens, cfg.rollout.samples_per_prompt, flops, bw),
        "score": 2 * EMBEDDER_PARAMS * score_tokens / flops,
        "reference": forward / flops,
        "learn": 3 * forward / flops + 28 * model.params / bw,
        "sync": 2 * model.params * 4 / bw,
        "real_tokens": float(real.sum()),
        "needed_tokens": float(needed),
        "padded_tokens": float(mask.size),
    }


def measure(cfg: RunConfig, steps: int) -> list[dict[str, float]]:
    """Each step's phase times (the driver's) and bounds (of the step's own trajectories)."""
    train_set, _ = prepare(cfg)
    threads = cfg.learner.torch_threads
    model = Model(str(resolve_policy(cfg.policy.model, cfg.policy.cache_dir)))
    flops, bw = matmul_gflops(threads, max(model.width, 256)) * 1e9, bandwidth_gbs(threads) * 1e9
    init_ray(cfg.cluster.address, cfg.cluster.num_cpus, cfg.cluster.object_store_mb)
    roles = launch(cfg)
    try:
        recovery, sampler, rows = Recovery(roles, cfg.fault_tolerance), PromptSampler(train_set, cfg.seed), []
        for i in range(steps + 1):  # step 0 warms up and is not kept
            t0 = time.perf_counter()
            experience = collect(roles, sampler.draw(cfg.prompts_per_step), recovery)
            trajectories = ray.get(experience.trajectories)
            metrics, _ = learn_and_sync(roles, experience, recovery, t0, lambda: None)
            joined = [bounds(cfg, model, t, flops, bw) for t in trajectories]
            row = {f"bound/{k}": sum(j[k] for j in joined) for k in joined[0]}
            row.update({p: metrics[f"time/{p}"] for p in PHASES})
            row["step"] = row["generate"] + max(row["score"], row["reference"]) + row["learn"] + row["sync"]
            row["bound/step"] = (row["bound/generate"] + max(row["bound/score"], row["bound/reference"])
                                 + row["bound/learn"] + row["bound/sync"])  # fmt: skip
            if i > 0:
                rows.append(row)
    finally:
        roles.shutdown()
        shutdown_ray()
    for row in rows:
        row["matmul_gflops"], row["bandwidth_gbs"] = flops / 1e9, bw / 1e9
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=["default"])
    parser.add_argument("--steps", type=int, default=6, help="timed steps after one warm-up step")
    args = parser.parse_args()
    report = {}
    for name in args.configs:
        cfg = load_config(name, ["logging.wandb=disabled", "logging.tensorboard=false", f"output_dir=/tmp/phase_bound_{name}"])
        rows = measure(cfg, args.steps)
        median = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
        report[name] = {"median": median, "steps": rows}
        print(f"\n== {name} ({cfg.policy.model}): medians of {args.steps} steps; matmul {median['matmul_gflops']:.0f} "
              f"GFLOP/s, copy {median['bandwidth_gbs']:.1f} GB/s; {median['bound/needed_tokens']:.0f} needed, "
              f"{median['bound/real_tokens']:.0f} real, {median['bound/padded_tokens']:.0f} padded tokens")  # fmt: skip
        print(f"{'phase':<11}{'measured s':>11}{'bound s':>10}{'ratio':>8}")
        for phase in (*PHASES, "step"):
            m, b = median[phase], median[f"bound/{phase}"]
            print(f"{phase:<11}{m:>11.2f}{b:>10.2f}{m / b:>8.2f}")
    common.write_results("phase_bound.json", report)


if __name__ == "__main__":
    main()
