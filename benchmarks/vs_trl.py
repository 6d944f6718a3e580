"""rayrlhf vs TRL's GRPOTrainer on identical work, like with like: each trainer in its own process.

    pip install -e '.[bench]'        # TRL 1.16: an optional extra, never a runtime dependency
    python benchmarks/vs_trl.py --steps 10 --seeds 0 1 2    # the default's work (SmolLM2-135M-Instruct)
    python benchmarks/vs_trl.py --tiny --seeds 0            # smoke check: tiny GPT-2, 2 steps

The work is the run config's (ray_configs/default.yaml, or tiny.yaml with --tiny), handed to both:
model, built-in prompts, prompts_per_step x samples_per_prompt, max_new_tokens, temperature/top_p,
KL coefficient (TRL's beta), lr (constant), grad clip, fp32, torch threads. The reward is our
RewardScorer (same components, weights and running normalisation) wrapped as a TRL reward
function. Both policies are then scored the same way: greedy answers on the held-out prompts,
raw reward (alpha * r_freq + beta * r_sim), by one evaluator in a process of its own. Seconds per
step are medians over the steps after the first (warm-up). TRL gets the same prompts in the same
order as ours draws them (its shuffling off), so the two differ only in their sampling and their code.

Like with like: TRL 1.16's GRPOConfig turns gradient checkpointing on by default, which recomputes
every forward in the backward; we do not, so the fair line ("trl") turns it off. "trl_defaults"
(--trl-defaults) is TRL as it ships, a second line. Each side runs in a fresh process (`--side`), so
neither inherits the other's allocator settings (our roles set glibc's mallopt), threads or Ray, and
the sides alternate which goes first from seed to seed. The ratio is ours / TRL's samples/s per seed;
the report gives their median, min and max. Left at TRL's default: its loss aggregation ("dapo":
token mean over the whole batch, as our default). Writes benchmarks/results/vs_trl[_tiny].json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common  # first: the offline defaults, before Ray, torch and transformers load

import numpy as np
import torch

from rayrlhf.actors.runtime.models import resolve_policy
from rayrlhf.actors.reward_scorer import RewardScorer
from rayrlhf.actors.rollout_worker import RolloutWorker
from rayrlhf.actors.rl.trajectory import Trajectory
from rayrlhf.jobs.config.run import RunConfig, load_config
from rayrlhf.jobs.run.roles import actor_settings
from rayrlhf.jobs.data.sampler import PromptSampler
from rayrlhf.jobs.train import prepare, train

PHASES = ("generate", "score", "reference", "learn", "sync")


def held_out_reward(cfg: RunConfig, model_dir: str | Path, eval_set) -> float:
    """Mean raw reward of greedy answers on the held-out prompts (no normaliser involved)."""
    worker = RolloutWorker(
        model=str(model_dir), max_prompt_tokens=cfg.policy.max_prompt_tokens,
        use_chat_template=cfg.data.use_chat_template, system_prompt=cfg.data.system_prompt, seed=cfg.seed,
        **actor_settings(cfg.rollout),
    )  # fmt: skip
    scorer = RewardScorer(**actor_settings(cfg.reward))
    max_new = cfg.eval_max_new_tokens or cfg.rollout.max_new_tokens
    raw = []
    for i in range(0, len(eval_set), 16):
        traj = worker.generate(eval_set[i : i + 16], greedy=True, max_new_tokens=max_new)
        raw.append(scorer.score(traj, update_stats=False).raw_total)
    return float(np.concatenate(raw).mean())


def run_ours(cfg: RunConfig) -> dict:
    result = train(cfg)
    steps = [h["time/step"] for h in result.history]
    timed = result.history[1:] or result.history
    per_step = statistics.median(h["time/step"] for h in timed)
    return {
        "s_per_step": per_step,
        "samples_per_s": cfg.prompts_per_step * cfg.rollout.samples_per_prompt / per_step,
        "phases_s": {p: statistics.median(h[f"time/{p}"] for h in timed) for p in PHASES},
        "step_times_s": steps,
        "final_dir": str(result.final_dir),
        "own_eval_raw_after": result.after.get("eval/raw"),
        "kl_per_step": [h["kl"] for h in result.history],
    }


def run_trl(cfg: RunConfig, model_dir: Path, prompts, out_dir: Path, checkpointing: bool) -> dict:
    """TRL's GRPOTrainer on `prompts`, in that order (prompts_per_step of them per step); `checkpointing`:
    TRL's default gradient checkpointing (recomputes the forward in the backward), else off as ours."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    if not all(isinstance(p.text, str) for p in prompts):
        raise ValueError("this benchmark wraps plain-text prompts in a user message; got chat messages")
    torch.set_num_threads(cfg.rollout.torch_threads)
    scorer = RewardScorer(**actor_settings(cfg.reward))

    def reward(prompts, completions, reference, prompt_text, **_) -> list[float]:
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        n = len(texts)  # text only: no tokens, so the length controls (switched off in main) see an unknown budget
        none = np.zeros((n, 1), dtype=np.int64)
        batch = Trajectory(input_ids=none, attention_mask=none, response_mask=none.astype(np.float32),
                           old_logprobs=none.astype(np.float32), group_ids=none[:, 0], sample_ids=none[:, 0],
                           policy_version=0, responses=texts, references=list(reference),
                           prompt_texts=list(prompt_text), extras=[{}] * n, truncated=np.zeros(n, dtype=bool))  # fmt: skip
        return scorer.score(batch).total.tolist()

    rows = [{"prompt": ([{"role": "system", "content": cfg.data.system_prompt}] if cfg.data.system_prompt else [])
             + [{"role": "user", "content": p.text}], "reference": p.reference, "prompt_text": p.text}
            for p in prompts]  # fmt: skip
    k = cfg.rollout.samples_per_prompt
    args = GRPOConfig(
        output_dir=str(out_dir), max_steps=cfg.steps, per_device_train_batch_size=cfg.prompts_per_step * k,
        gradient_accumulation_steps=1, num_generations=k, max_completion_length=cfg.rollout.max_new_tokens,
        temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p, top_k=0, beta=cfg.kl.coef,
        epsilon=cfg.algorithm.clip_eps, num_iterations=cfg.algorithm.epochs,
        scale_rewards="group" if cfg.algorithm.normalize_std else "none",
        learning_rate=cfg.learner.lr, lr_scheduler_type="constant", warmup_steps=0,
        weight_decay=cfg.learner.weight_decay, max_grad_norm=cfg.learner.grad_clip,
        use_cpu=True, bf16=False, fp16=False, seed=cfg.seed, report_to="none", logging_steps=1,
        save_strategy="no", dataloader_num_workers=0, disable_tqdm=True, shuffle_dataset=False,
        gradient_checkpointing=checkpointing,
    )  # fmt: skip
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token

    times: list[float] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *_, **__):
            self.start = time.perf_counter()

        def on_step_end(self, *_, **__):
            times.append(time.perf_counter() - self.start)

    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=args, train_dataset=Dataset.from_list(rows),
                          processing_class=tokenizer, callbacks=[StepTimer()])  # fmt: skip
    trainer.train()
    final = out_dir / "final"
    trainer.save_model(str(final))
    tokenizer.save_pretrained(str(final))
    per_step = statistics.median(times[1:] or times)
    kl = [log["kl"] for log in trainer.state.log_history if "kl" in log]
    return {"s_per_step": per_step, "samples_per_s": cfg.prompts_per_step * k / per_step, "kl_per_step": kl,
            "step_times_s": times, "final_dir": str(final)}  # fmt: skip


def run_side(side: str, cfg: RunConfig, work: Path) -> dict:
    """One trainer (or the evaluator) in this process: the parent gave it a process of its own."""
    train_set, eval_set = prepare(cfg)
    model_dir = resolve_policy(cfg.policy.model, cfg.policy.cache_dir)
    if side == "eval":  # the held-out reward of the model before training and of each side's final policy
        finals = {name: json.loads((work / f"{name}.json").read_text())["final_dir"]
                  for name in SIDES if (work / f"{name}.json").exists()}  # fmt: skip
        return {"before": held_out_reward(cfg, model_dir, eval_set),
                **{name: held_out_reward(cfg, final, eval_set) for name, final in finals.items()}}  # fmt: skip
    t0 = time.perf_counter()
    if side == "rayrlhf":
        result = run_ours(cfg)
    else:
        sampler = PromptSampler(train_set, cfg.seed)  # the order `train` draws them in
        prompts = [p for _ in range(cfg.steps) for p in sampler.draw(cfg.prompts_per_step)]
        result = run_trl(cfg, model_dir, prompts, work / side, checkpointing=side == "trl_defaults")
    result["wall_s"] = time.perf_counter() - t0
    return result


SIDES = ("rayrlhf", "trl", "trl_defaults")


def spawn(side: str, seed: int, args: argparse.Namespace, work: Path) -> dict:
    """`side` of one seed in a fresh interpreter; returns what it wrote."""
    cmd = [sys.executable, __file__, "--side", side, "--work-dir", str(work), "--seeds", str(seed)]
    cmd += ["--tiny"] if args.tiny else []
    cmd += ["--steps", str(args.steps)] if args.steps is not None else []
    print(f"-- seed {seed}: {side}", flush=True)
    subprocess.run([*cmd, *args.overrides], check=True)
    return json.loads((work / f"{side}.json").read_text())


def config(args: argparse.Namespace, seed: int, work: Path) -> RunConfig:
    # TRL's reward function sees text only, so our length controls (token budget) are off: same reward
    overrides = ["logging.wandb=disabled", "logging.tensorboard=false", "logging.progress_bar=false",
                 "reward.overlong_penalty=0", "reward.truncation=keep", f"seed={seed}",
                 f"output_dir={work / 'rayrlhf'}", *args.overrides]  # fmt: skip
    if args.steps is not None:
        overrides.append(f"steps={args.steps}")
    return load_config("tiny" if args.tiny else "default", overrides)


def summary(per_seed: dict[int, dict]) -> dict:
    ratios = {name: [r["rayrlhf"]["samples_per_s"] / r[name]["samples_per_s"] for r in per_seed.values()]
              for name in SIDES[1:] if all(name in r for r in per_seed.values())}
    return {f"samples_per_s_ratio_vs_{name}": {"median": statistics.median(v), "min": min(v), "max": max(v),
                                               "per_seed": v} for name, v in ratios.items()}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=None, help="RL steps of each (default: the config's)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="one side-by-side run per seed")
    parser.add_argument("--tiny", action="store_true", help="smoke check on the tiny GPT-2 config")
    parser.add_argument("--trl-defaults", action="store_true", help="also run TRL with its own defaults")
    parser.add_argument("--work-dir", default=None, help="where the runs write (default: a temp dir)")
    parser.add_argument("--side", choices=(*SIDES, "eval"), help=argparse.SUPPRESS)  # a child process
    parser.add_argument("overrides", nargs="*", help="config overrides for both sides, e.g. kl.coef=0.1")
    args = parser.parse_args()
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="vs_trl-"))
    if args.side:
        result = run_side(args.side, config(args, args.seeds[0], work), work)
        (work / f"{args.side}.json").write_text(json.dumps(result, indent=2, default=str))
        return

    per_seed: dict[int, dict] = {}
    for i, seed in enumerate(args.seeds):
        folder = work / f"seed{seed}"
        folder.mkdir(parents=True, exist_ok=True)
        sides = ["rayrlhf", "trl"] if i % 2 == 0 else ["trl", "rayrlhf"]
        sides += ["trl_defaults"] if args.trl_defaults else []
        runs = {side: spawn(side, seed, args, folder) for side in sides}
        held_out = spawn("eval", seed, args, folder)
        for side, run in runs.items():
            run["held_out_reward"] = held_out[side]
        per_seed[seed] = {**runs, "held_out_reward_before": held_out["before"], "order": sides}

    cfg = config(args, args.seeds[0], work)
    report = {
        "work": {"config": "tiny" if args.tiny else "default", "model": cfg.policy.model, "steps": cfg.steps,
                 "prompts_per_step": cfg.prompts_per_step, "samples_per_prompt": cfg.rollout.samples_per_prompt,
                 "max_new_tokens": cfg.rollout.max_new_tokens, "kl_coef": cfg.kl.coef, "lr": cfg.learner.lr,
                 "torch_threads": cfg.rollout.torch_threads, "seeds": args.seeds, "overrides": args.overrides,
                 "trl": "gradient_checkpointing off; trl_defaults: TRL's own GRPOConfig defaults",
                 "processes": "one fresh process per side and seed; the evaluator in its own"},  # fmt: skip
        "per_seed": per_seed,
        **summary(per_seed),
    }
    print(f"\n== {cfg.steps} steps of {cfg.prompts_per_step} x {cfg.rollout.samples_per_prompt}, {cfg.policy.model}")
    print(f"{'seed':<6}{'side':<14}{'s/step':>10}{'samples/s':>12}{'held-out':>10}")
    for seed, r in per_seed.items():
        for side in r["order"]:
            print(f"{seed:<6}{side:<14}{r[side]['s_per_step']:>10.2f}{r[side]['samples_per_s']:>12.3f}"
                  f"{r[side]['held_out_reward']:>10.4f}")
        print(f"{seed:<6}{'(before)':<14}{'':>22}{r['held_out_reward_before']:>10.4f}")
        print("      rayrlhf phases (s): " + ", ".join(f"{p} {r['rayrlhf']['phases_s'][p]:.2f}" for p in PHASES))
    for key, value in summary(per_seed).items():
        print(f"{key}: median {value['median']:.2f}x (min {value['min']:.2f}, max {value['max']:.2f})")
    common.write_results("vs_trl_tiny.json" if args.tiny else "vs_trl.json", report)


if __name__ == "__main__":
    main()
