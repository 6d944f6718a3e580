"""A learned reward r_rm(x, y): a pretrained backbone with a scalar head.

Stored as a plain Hugging Face sequence-classification directory with one label
(`AutoModelForSequenceClassification.from_pretrained(dir)` loads backbone and head; other RLHF
tools read the same layout), plus `reward_model.json`, which marks the directory as a reward model
and records how its inputs are built. Encoders (BERT-like, with a [SEP] token) read prompt and
answer as a sentence pair and score from their pooled [CLS]; decoders read "prompt\\nanswer" and
score from the last real token.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from rayrlhf.actors.rewards.embeddings import BUILTIN_MODELS, resolve_embedding_model
from rayrlhf.actors.runtime.models import BUILTIN_POLICIES, resolve_policy

MARKER = "reward_model.json"


def prompt_as_text(prompt: str | list[dict[str, str]]) -> str:
    """The prompt the reward model reads: plain text, or the contents of chat messages, one a line."""
    if isinstance(prompt, str):
        return prompt
    return "\n".join(m["content"] for m in prompt)


def resolve_backbone(name: str, cache_dir: str | None = None) -> Path:
    """A local directory for a built-in name (all-minilm-l6-v2, tiny-gpt2, ...), a directory or a cached hub id."""
    if name in BUILTIN_MODELS:
        return Path(resolve_embedding_model(name))
    local = Path(name).expanduser()
    if name in BUILTIN_POLICIES or not local.is_dir():
        try:
            return resolve_policy(name, cache_dir)
        except ValueError as err:
            raise ValueError(
                f"{name!r} is neither a built-in backbone ({', '.join([*BUILTIN_MODELS, *BUILTIN_POLICIES])}), "
                "an existing Hugging Face directory, nor a hub id in the local cache"
            ) from err
    if not (local / "config.json").is_file():
        raise ValueError(f"{local} is not a Hugging Face model directory (no config.json)")
    return local


def check_reward_model_dir(path: str) -> Path:
    """The directory of a trained reward model, or a ValueError saying what is missing."""
    p = Path(path).expanduser()
    if not p.is_dir():
        raise ValueError(f"{path}: no such directory")
    for name in ("config.json", MARKER):
        if not (p / name).is_file():
            raise ValueError(f"{path}: not a reward model directory ({name} is missing; train one with `rayrlhf train-rm`)")
    return p


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """[B, H] unit-length mean of the hidden states over real tokens."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
    return nn.functional.normalize(pooled, dim=-1)


class RewardModel(nn.Module):
    """Backbone + scalar head; `forward` gives one reward per row (and embeddings on request)."""

    def __init__(self, model: nn.Module, tokenizer: Any, max_length: int, info: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.info = dict(info or {})
        self.pair_input = tokenizer.sep_token is not None

    @classmethod
    def from_backbone(cls, path: str | Path, max_length: int) -> RewardModel:
        """A fresh scalar head on a pretrained backbone."""
        tokenizer = AutoTokenizer.from_pretrained(path)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype=torch.float32)
        model.config.pad_token_id = tokenizer.pad_token_id
        return cls(model, tokenizer, max_length, {"backbone": str(path)})

    @classmethod
    def load(cls, path: str | Path) -> RewardModel:
        """A trained reward model saved by `save`, in eval mode."""
        info = json.loads((check_reward_model_dir(str(path)) / MARKER).read_text())
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32)
        return cls(model, tokenizer, int(info["max_length"]), info).eval()

    def save(self, path: str | Path, extra: dict[str, Any] | None = None) -> Path:
        """Safetensors + tokenizer + reward_model.json (never pickled weights)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(path, safe_serialization=True)
        self.tokenizer.save_pretrained(path)
        info = {**self.info, **(extra or {}), "max_length": self.max_length, "pair_input": self.pair_input}
        (path / MARKER).write_text(json.dumps(info, indent=2))
        return path

    def tokenize(self, prompts: list[str], responses: list[str] | None = None) -> dict[str, torch.Tensor]:
        """Right-padded model inputs; without responses, the prompts alone (triplet anchors)."""
        kwargs = dict(truncation=True, max_length=self.max_length, padding=True, return_tensors="pt")
        self.tokenizer.padding_side = "right"
        if responses is None:
            return dict(self.tokenizer(list(prompts), **kwargs))
        if self.pair_input:
            return dict(self.tokenizer(list(prompts), list(responses), **kwargs))
        return dict(self.tokenizer([f"{p}\n{r}" for p, r in zip(prompts, responses)], **kwargs))

    def forward(
        self, batch: dict[str, torch.Tensor], with_embeddings: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """([B] rewards, [B, H] unit-length mean-pooled embeddings or None)."""
        out = self.model(**batch, output_hidden_states=with_embeddings)
        rewards = out.logits.squeeze(-1).float()
        embeddings = mean_pool(out.hidden_states[-1], batch["attention_mask"]) if with_embeddings else None
        return rewards, embeddings

    @torch.no_grad()
    def score(self, prompts: list[str], responses: list[str], batch_size: int) -> np.ndarray:
        """[B] float32 rewards, `batch_size` rows per forward pass."""
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        was_training = self.training
        self.eval()
        device = next(self.parameters()).device
        parts = []
        for i in range(0, len(prompts), batch_size):
            batch = self.tokenize(prompts[i : i + batch_size], responses[i : i + batch_size])
            parts.append(self({k: v.to(device) for k, v in batch.items()})[0].cpu())
        self.train(was_training)
        return torch.cat(parts).numpy().astype(np.float32) if parts else np.zeros(0, dtype=np.float32)
