"""`rayrlhf sft`: supervised fine-tuning of the policy on prompt/response data, on Ray Train with
DeepSpeed inside.

Prompts are rendered with the chat template exactly as the RL rollout renders them, the loss is
the negative log-likelihood of the response tokens only (EOS included), and the result is a
Hugging Face directory (`<output_dir>/final`) that `rayrlhf train` takes as `policy.model`.
By default it trains on the built-in task's reference answers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rayrlhf.actors.runtime.models import load_policy, resolve_policy, resolve_policy_here, save_policy
from rayrlhf.actors.supervised.sft import collate, encode_example, response_nll
from rayrlhf.actors.rl.trajectory import Prompt
from rayrlhf.jobs.config.base import ConfigError
from rayrlhf.jobs.config.supervised import SFTConfig
from rayrlhf.jobs.data.supervised import load_sft_data
from rayrlhf.jobs.run.ray_trainer import Worker, check_data_fills_a_step, run_job, to_device

if TYPE_CHECKING:
    import torch


@dataclass
class SFTResult:
    output_dir: Path | str
    """A path for a path output_dir, the URI for a URI (so is final_dir)."""
    final_dir: Path | str
    before: dict[str, float]
    after: dict[str, float]


def prepare(cfg: SFTConfig) -> tuple[Path, list[Prompt], list[Prompt]]:
    """Everything that can fail on bad input, done before any cluster resource is claimed."""
    try:
        model_dir = resolve_policy(cfg.policy.model, cfg.policy.cache_dir)
    except (ValueError, FileNotFoundError, ModuleNotFoundError) as e:
        raise ConfigError(f"policy.model: {e}") from e
    try:
        train_set, eval_set = load_sft_data(
            cfg.data.train, cfg.data.eval, cfg.data.num_train, cfg.data.num_eval, cfg.seed
        )
    except ValueError as e:
        raise ConfigError(f"data: {e}") from e
    check_data_fills_a_step(len(train_set), cfg.trainer, "examples")
    return model_dir, train_set, eval_set


def sft(cfg: SFTConfig) -> SFTResult:
    model_dir, train_set, eval_set = prepare(cfg)
    # the name travels, not the driver's path: each worker resolves it on its own node
    inputs = {"model": cfg.policy.model, "cache_dir": cfg.policy.cache_dir, "train": train_set, "eval": eval_set}
    output_dir, final_dir, result = run_job(cfg, sft_loop, inputs, "final policy")
    return SFTResult(output_dir, final_dir, result["before"], result["after"])


# --- inside each Ray Train worker --------------------------------------------------------------


def sft_loop(config: dict[str, Any]) -> None:
    cfg = config["cfg"]
    worker = Worker(cfg["trainer"], cfg["seed"], config["output_dir"])
    dtype = "float32" if cfg["policy"]["dtype"] == "auto" else cfg["policy"]["dtype"]  # trained weights: fp32 unless told
    policy, tokenizer = load_policy(resolve_policy_here(config["model"], config["cache_dir"]), dtype)
    engine = worker.engine_for(policy.train())

    def encode(prompt: Prompt) -> tuple[list[int], list[int]]:
        return encode_example(
            tokenizer, prompt, use_chat_template=cfg["data"]["use_chat_template"],
            system_prompt=cfg["data"]["system_prompt"], max_prompt_tokens=cfg["policy"]["max_prompt_tokens"],
            max_response_tokens=cfg["max_response_tokens"],
        )

    train_examples = [encode(p) for p in config["train"]]
    eval_examples = [encode(p) for p in config["eval"]]

    def nll(rows: list[tuple[list[int], list[int]]]) -> tuple[torch.Tensor, torch.Tensor]:
        return response_nll(engine, to_device(collate(rows, tokenizer.pad_token_id), worker.device))

    def micro_step(indices: list[int]) -> float:
        total, tokens = nll([train_examples[i] for i in indices])
        loss = total / tokens.clamp(min=1.0)
        engine.backward(loss)
        engine.step()
        return loss.item()

    def evaluate() -> dict[str, float]:
        total, tokens = worker.sharded_sums(
            eval_examples, cfg["trainer"]["micro_batch_size"], lambda rows: [float(v) for v in nll(rows)]
        )
        mean = total / max(tokens, 1.0)
        return {"eval/nll": mean, "eval/perplexity": math.exp(min(mean, 50.0))}

    worker.run(
        len(train_examples), cfg["seed"], micro_step, evaluate,
        save_final=lambda after, folder: save_policy(policy, tokenizer, folder),
    )
