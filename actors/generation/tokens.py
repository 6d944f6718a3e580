"""Token-level helpers shared by every generator (rollout, Serve, SFT): which ids end a response,
how a prompt is rendered into ids, and how prompts are batched for a decoder-only model."""

from __future__ import annotations

import torch

from rayrlhf.actors.rl.trajectory import Prompt


def eos_token_ids(model: torch.nn.Module, tokenizer) -> list[int]:
    """Every id that ends a response: the generation config's (int or list) and the tokenizer's."""
    ids = model.generation_config.eos_token_id
    ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    if not ids:
        raise ValueError("the policy has no EOS token: responses could never end")
    return sorted(set(ids))


def prompt_token_ids(
    tokenizer, prompt: Prompt, *, use_chat_template: bool, system_prompt: str | None, max_prompt_tokens: int
) -> list[int]:
    """The prompt as the policy sees it: chat template with the generation prompt (or plain text),
    left-truncated to max_prompt_tokens. SFT renders its prompts with this too."""
    if use_chat_template:
        messages = prompt.text
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
            if system_prompt:
                messages.insert(0, {"role": "system", "content": system_prompt})
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        ids = tokenizer(text, add_special_tokens=False).input_ids  # the template has its own
    else:
        if not isinstance(prompt.text, str):
            raise ValueError(f"prompt {prompt.id}: chat messages need data.use_chat_template=true")
        ids = tokenizer(prompt.text).input_ids
    if not ids:
        raise ValueError(f"prompt {prompt.id} is empty after tokenisation")
    return ids[-max_prompt_tokens:]


def left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows right-aligned into one batch (input_ids, attention_mask): decoder-only models
    generate from the last column, so every prompt must end there."""
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, width - len(row) :] = torch.tensor(row)
        attention_mask[i, width - len(row) :] = 1
    return input_ids, attention_mask
