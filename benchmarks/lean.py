"""How close the learner and the rollout worker come to bare PyTorch on the same work.

    python benchmarks/lean.py --config default --repeats 5

Two rows, each timed back to back in this one process on the same batch:
- learn: `Learner.learn` on a real rollout batch vs a plain forward + backward + AdamW loop over the
  same rows (one pass, logits only over the response columns, the same GRPO + k3 KL loss), with
  torch's default AdamW and with the fused one the learner uses;
- generate: `RolloutWorker.generate` vs a bare `model.generate(num_return_sequences=k)` of the stock
  model on the same prompts, and vs the worker with HF's own LM head instead of the transposed one,
  as generated tokens per second (tokens actually kept: EOS cuts the rest).
`--profile` prints the torch profiler's top operators of one learn call. Writes
benchmarks/results/lean.json. Not a test: figures only, and only on an idle machine.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import replace

import common  # first: the offline defaults, before Ray, torch and transformers load

import numpy as np
import torch

from rayrlhf.actors.rl.advantages import expand_to_tokens, grpo_advantages, masked_mean
from rayrlhf.actors.rl.logprobs import first_response_column, position_ids
from rayrlhf.actors.rl.losses import kl_penalty
from rayrlhf.actors.runtime.models import load_policy, resolve_policy
from rayrlhf.actors.rl.trajectory import LearnerBatch, Rewards
from rayrlhf.jobs.config.run import load_config
from rayrlhf.jobs.run.roles import role_table
from rayrlhf.jobs.data.sampler import PromptSampler
from rayrlhf.jobs.train import prepare


def plain_loop(model_dir: str, cfg, fused: bool):
    """The bar: the same rows through one forward + backward + clip + AdamW, nothing else."""
    model, _ = load_policy(model_dir)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.learner.lr, weight_decay=cfg.learner.weight_decay,
                                  fused=fused)  # fmt: skip
    return lambda batch, repeats: plain_steps(model, optimizer, cfg, batch, repeats)


def plain_steps(model, optimizer, cfg, batch: LearnerBatch, repeats: int) -> list[float]:
    traj = batch.trajectory
    ids, mask = torch.from_numpy(traj.input_ids), torch.from_numpy(traj.attention_mask)
    resp = torch.from_numpy(traj.response_mask)
    first = first_response_column(resp)
    old, ref = torch.from_numpy(traj.old_logprobs), torch.from_numpy(batch.ref_logprobs)
    adv = expand_to_tokens(grpo_advantages(torch.from_numpy(batch.scores), torch.from_numpy(traj.group_ids), True), resp)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask),
                       logits_to_keep=ids.shape[1] - first + 1, use_cache=False).logits[:, :-1]  # fmt: skip
        logp = logits.gather(-1, ids[:, first:].unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, -1)
        m = resp[:, first:]
        ratio = torch.exp(logp - old[:, first:])
        pg = -torch.min(ratio * adv[:, first:], ratio.clamp(0.8, 1.2) * adv[:, first:])
        loss = masked_mean(pg, m) + cfg.kl.coef * masked_mean(kl_penalty(logp, ref[:, first:], "k3"), m)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.learner.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    return times


def learner_times(learner, batch: LearnerBatch, repeats: int, profile: bool) -> list[float]:
    times = []
    for i in range(repeats):
        step = replace(batch, trajectory=replace(batch.trajectory, policy_version=learner.version))
        t0 = time.perf_counter()
        if profile and i == repeats - 1:
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                learner.learn(step)
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
        else:
            learner.learn(step)
        times.append(time.perf_counter() - t0)
    return times


def kept_tokens(traj) -> int:
    return int(traj.response_mask.sum())


def bare_generate_tokens(model, worker, ids, mask) -> int:
    with torch.no_grad():
        seqs = model.generate(
            input_ids=ids, attention_mask=mask, do_sample=True, temperature=worker.temperature, top_p=1.0,
            top_k=0, num_return_sequences=worker.samples_per_prompt, max_new_tokens=worker.max_new_tokens,
        )  # fmt: skip
    response = seqs[:, ids.shape[1]:]
    is_eos = torch.isin(response, torch.tensor(worker.eos_ids)).long()
    return int(((is_eos.cumsum(1) - is_eos) == 0).sum())


def generate_rows(worker, stock_head_worker, bare_model, prompts, repeats: int) -> dict:
    """Tokens/s of the worker, of the worker with HF's own LM head (not transposed), and of a bare
    HF generate (stock model, no log-prob recording) on the same prompts, interleaved."""
    times = {"ours": [], "ours_stock_head": [], "bare_generate": []}
    ids, mask = worker._left_padded(prompts)
    calls = {
        "ours": lambda: kept_tokens(worker.generate(prompts)),
        "ours_stock_head": lambda: kept_tokens(stock_head_worker.generate(prompts)),
        "bare_generate": lambda: bare_generate_tokens(bare_model, worker, ids, mask),
    }
    for _ in range(repeats):
        for name, call in calls.items():
            t0 = time.perf_counter()
            tokens = call()
            times[name].append(tokens / (time.perf_counter() - t0))
    rates = {f"{name}_tokens_per_s": statistics.median(t) for name, t in times.items()}
    return rates | {"ours_over_bare": rates["ours_tokens_per_s"] / rates["bare_generate_tokens_per_s"],
                    "ours_over_stock_head": rates["ours_tokens_per_s"] / rates["ours_stock_head_tokens_per_s"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="default")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per side (after one warm-up)")
    parser.add_argument("--profile", action="store_true", help="torch profiler table of the last learn call")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. learner.zero_stage=2")
    args = parser.parse_args()
    cfg = load_config(args.config, ["logging.wandb=disabled", *args.overrides])
    train_set, _ = prepare(cfg)
    model_dir = resolve_policy(cfg.policy.model, cfg.policy.cache_dir)
    single = cfg.model_copy(update={"learner": cfg.learner.model_copy(update={"num_ranks": 1})})
    roles = {role.name: role for role in role_table(single)}
    worker = roles["rollout"].instantiate()
    scorer = roles["reward"].instantiate()
    reference = roles["reference"].instantiate() if "reference" in roles else None
    torch.set_num_threads(cfg.rollout.torch_threads)
    prompts = PromptSampler(train_set, cfg.seed).draw(cfg.prompts_per_step)

    stock_head_worker = roles["rollout"].instantiate()
    vars(stock_head_worker.model.get_output_embeddings()).pop("forward", None)  # HF's x @ W^T (actors/runtime/models.py)
    bare_model, _ = load_policy(model_dir)
    for warm_up in (worker, stock_head_worker):
        warm_up.generate(prompts)
    gen = generate_rows(worker, stock_head_worker, bare_model, prompts, args.repeats)
    del stock_head_worker, bare_model

    traj = worker.generate(prompts)
    rewards = scorer.score(traj)
    ref = reference.logprobs(traj) if reference else np.zeros_like(traj.old_logprobs)
    batch = LearnerBatch.join([traj], [Rewards(rewards.total, rewards.raw_total, rewards.components)], [ref])
    learner = roles["learner"].instantiate(master_addr="127.0.0.1", master_port=common.free_port())
    torch.set_num_threads(cfg.learner.torch_threads)
    plain, fused = plain_loop(str(model_dir), cfg, False), plain_loop(str(model_dir), cfg, True)
    for _ in range(2):  # warm-up: the heap settles after two calls of each (actors/runtime/host_memory.py)
        learner_times(learner, batch, 1, False)
        plain(batch, 1)
        fused(batch, 1)
    ours, bare, bare_fused = [], [], []
    for _ in range(args.repeats):  # interleaved, so that load drifts hit every side alike
        ours += learner_times(learner, batch, 1, False)
        bare += plain(batch, 1)
        bare_fused += fused(batch, 1)
    if args.profile:
        learner_times(learner, batch, 1, True)
    learn = {"learner_s": statistics.median(ours), "plain_torch_s": statistics.median(bare),
             "learner_over_plain": statistics.median(ours) / statistics.median(bare),
             "plain_torch_fused_adamw_s": statistics.median(bare_fused),
             "learner_over_plain_fused": statistics.median(ours) / statistics.median(bare_fused)}  # fmt: skip
    report = {"config": args.config, "overrides": args.overrides, "rows": len(traj),
              "response_tokens": kept_tokens(traj), "learn": learn, "generate": gen}  # fmt: skip
    print(f"learn:    learner {learn['learner_s']:.3f} s   plain torch {learn['plain_torch_s']:.3f} s   "
          f"ratio {learn['learner_over_plain']:.2f}x   (plain with fused AdamW {learn['plain_torch_fused_adamw_s']:.3f} s, "
          f"ratio {learn['learner_over_plain_fused']:.2f}x)")
    print(f"generate: ours {gen['ours_tokens_per_s']:.1f} tok/s   bare generate {gen['bare_generate_tokens_per_s']:.1f} "
          f"tok/s   ratio {gen['ours_over_bare']:.2f}x   (ours with HF's LM head {gen['ours_stock_head_tokens_per_s']:.1f} "
          f"tok/s, ratio {gen['ours_over_stock_head']:.2f}x)")  # fmt: skip
    common.write_results(f"lean_{args.config}.json", report)


if __name__ == "__main__":
    main()
