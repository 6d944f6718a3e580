"""Supervised fine-tuning pieces: an example as token ids with a response mask, and its loss.

The prompt is rendered exactly as the rollout worker renders it (`prompt_token_ids`: chat template
with the generation prompt), and the response ends with the EOS token the policy must learn to
emit, so a fine-tuned policy starts RL from the distribution it was trained on. The loss is the
mean negative log-likelihood of response tokens only: the prompt is given, not learned.
"""

from __future__ import annotations

import torch
from torch import nn

from rayrlhf.actors.rl.logprobs import policy_forward
from rayrlhf.actors.generation.tokens import prompt_token_ids
from rayrlhf.actors.rl.trajectory import Prompt


def encode_example(
    tokenizer, prompt: Prompt, *, use_chat_template: bool, system_prompt: str | None, max_prompt_tokens: int,
    max_response_tokens: int,
) -> tuple[list[int], list[int]]:
    """(token ids, 1 on response tokens) for prompt + response (`prompt.reference`) + EOS."""
    if not prompt.reference:
        raise ValueError(f"prompt {prompt.id} has no target response")
    if tokenizer.eos_token_id is None:
        raise ValueError("the policy's tokenizer has no EOS token: responses could never end")
    head = prompt_token_ids(
        tokenizer, prompt, use_chat_template=use_chat_template, system_prompt=system_prompt,
        max_prompt_tokens=max_prompt_tokens,
    )
    body = tokenizer(prompt.reference, add_special_tokens=False).input_ids[: max_response_tokens - 1]
    body.append(tokenizer.eos_token_id)
    return head + body, [0] * len(head) + [1] * len(body)


def collate(examples: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded input_ids, attention_mask and response_mask ([B, T] each)."""
    width = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    response_mask = torch.zeros((len(examples), width), dtype=torch.float32)
    for i, (ids, mask) in enumerate(examples):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        attention_mask[i, : len(ids)] = 1
        response_mask[i, : len(ids)] = torch.tensor(mask, dtype=torch.float32)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "response_mask": response_mask}


def response_nll(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of -log p over response tokens, number of response tokens); gradients flow if enabled."""
    logprobs = policy_forward(model, batch["input_ids"], batch["attention_mask"], temperature=1.0).logprobs
    mask = batch["response_mask"]
    return -(logprobs * mask).sum(), mask.sum()
