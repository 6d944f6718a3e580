"""Is our GRPO update TRL's? One real rollout batch, the same weights: the gradient of our learner's loss
against the gradient of TRL 1.16's own GRPOTrainer loss (`_compute_loss`, its "dapo" default).

    pip install -e '.[bench]'
    python benchmarks/trl_gradient.py                  # the default config; seed=N to vary the batch

The batch is the default's (4 prompts x 4 samples of SmolLM2-135M-Instruct, scored by our reward,
reference log-probs from our ReferencePolicy); TRL gets its prompt/completion split, our advantages and
reference log-probs. Prints and writes the cosine between the two gradients and their norms
(benchmarks/results/trl_gradient.json). A check, not a timing: any machine load will do.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import common  # first: the offline defaults, before Ray, torch and transformers load

import numpy as np
import torch

from rayrlhf.actors.rl.advantages import grpo_advantages
from rayrlhf.actors.runtime.models import resolve_policy
from rayrlhf.actors.rl.token_batch import TokenBatch
from rayrlhf.actors.rl.trajectory import LearnerBatch
from rayrlhf.jobs.config.run import load_config
from rayrlhf.jobs.run.roles import role_table
from rayrlhf.jobs.data.sampler import PromptSampler
from rayrlhf.jobs.train import prepare


def our_gradient(learner, lb: LearnerBatch, kl_coef: float) -> dict[str, torch.Tensor]:
    """The learner's own advantage and loss code on the batch (one micro-batch), backward only."""
    batch = learner._with_advantages(TokenBatch.from_shard(lb, learner.device), kl_coef)
    (rows,) = batch.micro_batches(len(lb))
    loss, _, _ = learner._loss(rows, kl_coef)
    loss.backward()
    return {name: p.grad.detach().clone() for name, p in learner.policy.named_parameters()}


def trl_gradient(model_dir: Path, lb: LearnerBatch, kl_coef: float, k: int) -> dict[str, torch.Tensor]:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rows = len(lb)
    args = GRPOConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=rows, num_generations=k, beta=kl_coef,
                      use_cpu=True, bf16=False, report_to="none", max_steps=1)  # fmt: skip
    trainer = GRPOTrainer(model=model, reward_funcs=lambda completions, **_: [0.0] * len(completions), args=args,
                          train_dataset=Dataset.from_list([{"prompt": "x"}] * rows), processing_class=tokenizer)  # fmt: skip
    traj = lb.trajectory
    start = int(np.nonzero(traj.response_mask.any(0))[0][0])  # responses start together after the prompts
    ids, mask = torch.from_numpy(traj.input_ids), torch.from_numpy(traj.attention_mask)
    completion_mask = torch.from_numpy(traj.response_mask[:, start:]).long()
    inputs = {"prompt_ids": ids[:, :start], "prompt_mask": mask[:, :start], "completion_ids": ids[:, start:],
              "completion_mask": completion_mask, "num_items_in_batch": completion_mask.sum(),
              "advantages": grpo_advantages(torch.from_numpy(lb.scores), torch.from_numpy(traj.group_ids), True),
              "ref_per_token_logps": torch.from_numpy(lb.ref_logprobs[:, start:])}  # fmt: skip
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1  # set by its training loop, which this skips
    trainer._compute_loss(trainer.model, inputs).backward()
    return {name: p.grad.detach().clone() for name, p in trainer.model.named_parameters()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. seed=1")
    args = parser.parse_args()
    cfg = load_config("default", ["logging.wandb=disabled", "reward.overlong_penalty=0", "reward.truncation=keep",
                                  "learner.micro_batch_size=16", *args.overrides])  # fmt: skip
    train_set, _ = prepare(cfg)
    roles = {role.name: role for role in role_table(cfg)}
    learner = roles["learner"].instantiate(master_addr="127.0.0.1", master_port=common.free_port())
    worker, scorer, reference = (roles[name].instantiate() for name in ("rollout", "reward", "reference"))
    traj = worker.generate(PromptSampler(train_set, cfg.seed).draw(cfg.prompts_per_step))
    lb = LearnerBatch.join([traj], [scorer.score(traj)], [reference.logprobs(traj)])

    ours = our_gradient(learner, lb, cfg.kl.coef)
    theirs = trl_gradient(resolve_policy(cfg.policy.model, cfg.policy.cache_dir), lb, cfg.kl.coef,
                          cfg.rollout.samples_per_prompt)  # fmt: skip
    dot = sum(float((g * theirs[name]).sum()) for name, g in ours.items())
    norm_ours = sum(float((g * g).sum()) for g in ours.values()) ** 0.5
    norm_trl = sum(float((g * g).sum()) for g in theirs.values()) ** 0.5
    report = {"overrides": args.overrides, "rows": len(lb), "cosine": dot / (norm_ours * norm_trl),
              "grad_norm_ours": norm_ours, "grad_norm_trl": norm_trl, "max_abs_diff": max(
                  float((g - theirs[name]).abs().max()) for name, g in ours.items())}  # fmt: skip
    print(json.dumps(report, indent=2))
    common.write_results("trl_gradient.json", report)


if __name__ == "__main__":
    main()
