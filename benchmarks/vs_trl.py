"""rayrlhf vs TRL's GRPOTrainer on identical work, one after the other in one invocation.

    pip install -e '.[bench]'        # TRL 1.16: an optional extra, never a runtime dependency
    python benchmarks/vs_trl.py --steps 12          # the default's work (SmolLM2-135M-Instruct)
    python benchmarks/vs_trl.py --tiny              # smoke check: tiny GPT-2, 2 steps

The work is the run config's (ray_configs/default.yaml, or tiny.yaml with --tiny), handed to both:
model, built-in prompts, prompts_per_step x samples_per_prompt, max_new_tokens, temperature/top_p,
KL coefficient (TRL's beta), lr (constant), grad clip, fp32, torch threads. The reward is our
RewardScorer (same components, weights and running normalisation) wrapped as a TRL reward
function. Both policies are then scored the same way: greedy answers on the held-out prompts,
raw reward (alpha * r_freq + beta * r_sim), by one in-process evaluator. Seconds per step are
medians over the steps after the first (warm-up). Writes benchmarks/results/vs_trl[_tiny].json.
TRL gets the same prompts in the same order as ours draws them (its shuffling off), so the two
differ only in their sampling and their code. Left at TRL's default: its loss aggregation ("dapo":
token mean over the whole batch, as ours with one micro-batch).
"""

from __future__ import annotations

import argparse
import statistics
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


def run_trl(cfg: RunConfig, model_dir: Path, prompts, out_dir: Path) -> dict:
    """TRL's GRPOTrainer on `prompts`, in that order (prompts_per_step of them per step)."""
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=None, help="RL steps of each (default: the config's)")
    parser.add_argument("--tiny", action="store_true", help="smoke check on the tiny GPT-2 config")
    parser.add_argument("--work-dir", default=None, help="where both runs write (default: a temp dir)")
    parser.add_argument("overrides", nargs="*", help="config overrides for both sides, e.g. seed=1")
    args = parser.parse_args()
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="vs_trl-"))
    # TRL's reward function sees text only, so our length controls (token budget) are off: same reward
    overrides = ["logging.wandb=disabled", "logging.tensorboard=false", "logging.progress_bar=false",
                 "reward.overlong_penalty=0", "reward.truncation=keep",
                 f"output_dir={work / 'rayrlhf'}", *args.overrides]  # fmt: skip
    if args.steps is not None:
        overrides.append(f"steps={args.steps}")
    cfg = load_config("tiny" if args.tiny else "default", overrides)
    train_set, eval_set = prepare(cfg)
    model_dir = resolve_policy(cfg.policy.model, cfg.policy.cache_dir)

    before = held_out_reward(cfg, model_dir, eval_set)
    t0 = time.perf_counter()
    ours = run_ours(cfg)
    ours["wall_s"] = time.perf_counter() - t0
    ours["held_out_reward"] = held_out_reward(cfg, ours["final_dir"], eval_set)
    t0 = time.perf_counter()
    sampler = PromptSampler(train_set, cfg.seed)  # the order `train` draws them in
    trl = run_trl(cfg, model_dir, [p for _ in range(cfg.steps) for p in sampler.draw(cfg.prompts_per_step)], work / "trl")
    trl["wall_s"] = time.perf_counter() - t0
    trl["held_out_reward"] = held_out_reward(cfg, trl["final_dir"], eval_set)

    samples = cfg.steps * cfg.prompts_per_step * cfg.rollout.samples_per_prompt
    report = {
        "work": {"config": "tiny" if args.tiny else "default", "model": cfg.policy.model, "steps": cfg.steps,
                 "prompts_per_step": cfg.prompts_per_step, "samples_per_prompt": cfg.rollout.samples_per_prompt,
                 "max_new_tokens": cfg.rollout.max_new_tokens, "kl_coef": cfg.kl.coef, "lr": cfg.learner.lr,
                 "torch_threads": cfg.rollout.torch_threads, "samples": samples, "overrides": args.overrides,
                 "held_out_prompts": len(eval_set)},  # fmt: skip
        "held_out_reward_before": before,
        "rayrlhf": ours,
        "trl": trl,
        "samples_per_s_ratio": ours["samples_per_s"] / trl["samples_per_s"],
    }
    print(f"\n== {samples} samples each ({cfg.steps} steps of {cfg.prompts_per_step} x {cfg.rollout.samples_per_prompt}), "
          f"{cfg.policy.model}")  # fmt: skip
    print(f"{'':<10}{'s/step':>10}{'samples/s':>12}{'held-out':>10}  (before training {before:.4f})")
    for name, r in (("rayrlhf", ours), ("trl", trl)):
        print(f"{name:<10}{r['s_per_step']:>10.2f}{r['samples_per_s']:>12.3f}{r['held_out_reward']:>10.4f}")
    print("rayrlhf phases (s): " + ", ".join(f"{p} {ours['phases_s'][p]:.2f}" for p in PHASES))
    print(f"samples/s, rayrlhf / trl: {report['samples_per_s_ratio']:.2f}x")
    common.write_results("vs_trl_tiny.json" if args.tiny else "vs_trl.json", report)


if __name__ == "__main__":
    main()
