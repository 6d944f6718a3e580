"""Per-token log-probabilities of a batch under a causal LM, as every role must compute them.

The reference policy and the learner call these functions, so the two agree to the last bit when
their weights agree (the rollout worker records its log-probs while sampling, from the same
logits). Prompts are LEFT-padded, hence the explicit position ids: without them a padded row
would see shifted positions and other numbers.

Convention: position t holds log p(input_ids[t] | input_ids[<t]). A position whose predecessor
is padding (position 0, and the first real token of a left-padded row) holds 0, so padding a
row never changes its values.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from rayrlhf.actors.rl.losses import entropy_from_logits


def from_numpy(array: np.ndarray) -> torch.Tensor:
    """A tensor sharing the array's memory. Arrays out of Ray's object store are read-only;
    every caller here only reads them, so torch's warning about that is silenced."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(np.asarray(array))


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens only (left padding gets 0), as HF `generate` does."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def first_response_column(response_mask: torch.Tensor) -> int:
    """The first column any row's response occupies (responses start together after the
    left-padded prompts); everything before it needs no logits."""
    used = response_mask.bool().any(dim=0).nonzero()
    return max(1, int(used[0])) if len(used) else response_mask.shape[1]


def scored_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """[B, T] bool: positions that are real tokens and follow a real token."""
    real = attention_mask.bool()
    scored = torch.zeros_like(real)
    scored[:, 1:] = real[:, 1:] & real[:, :-1]
    return scored


def entropy_metric(logits: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """Entropy as a metric (no gradient) of finite logits (the model's raw ones), from the logsumexp
    the log-probs already needed: two [B, T, vocab] buffers instead of entropy_from_logits' four."""
    logp = logits - lse.unsqueeze(-1)
    return -logp.exp().mul_(logp).sum(dim=-1)


@dataclass
class PolicyOutput:
    """What the learner needs from one forward pass; all [B, T], aligned with input_ids."""

    logprobs: torch.Tensor
    entropy: torch.Tensor | None = None
    """Entropy of the (temperature-scaled) distribution that predicted token t; 0 where unscored."""
    hidden: torch.Tensor | None = None
    """[B, T, H] the last hidden state that predicted token t (zeros at t=0); for a value head."""


def policy_forward(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    temperature: float,
    *,
    with_entropy: bool = False,
    entropy_grad: bool = True,
    with_hidden: bool = False,
    first_scored: int = 1,
) -> PolicyOutput:
    """One forward pass; gradients flow if the caller has them enabled.

    entropy_grad=False computes the entropy as a metric only, without keeping the
    [B, T, vocab] softmax alive for backward.
    first_scored: columns before it (the prompt) get 0 and the LM head skips them; with a
    49k vocabulary that head is a fifth of the model's compute.
    """
    width = input_ids.shape[1]
    if not 1 <= first_scored <= width:
        raise ValueError(f"first_scored={first_scored} is outside the {width} columns")
    # logits[t] predicts token t+1: keep positions first_scored-1 .. width-2.
    keep = {"logits_to_keep": width - first_scored + 1} if first_scored > 1 else {}
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids(attention_mask),
        output_hidden_states=with_hidden,
        use_cache=False,
        **keep,
    )
    logits = out.logits[:, :-1].float()  # a no-op on fp32 models
    if temperature != 1.0:  # [B, T, vocab]: skip the copy when it changes nothing
        logits = logits / temperature
    targets = input_ids[:, first_scored:].unsqueeze(-1)
    lse = torch.logsumexp(logits, dim=-1)
    token_logp = logits.gather(-1, targets).squeeze(-1) - lse
    scored = scored_positions(attention_mask)
    skipped = token_logp.new_zeros(token_logp.shape[0], first_scored)
    logprobs = torch.where(scored, torch.cat([skipped, token_logp], dim=1), 0.0)
    entropy = None
    if with_entropy:
        if torch.is_grad_enabled() and entropy_grad:
            token_entropy = entropy_from_logits(logits)
        else:
            with torch.no_grad():
                token_entropy = entropy_metric(logits, lse)
        entropy = torch.where(scored, torch.cat([skipped, token_entropy], dim=1), 0.0)
    hidden = None
    if with_hidden:  # shift so that hidden[:, t] is the state in which token t is chosen
        last = out.hidden_states[-1]
        hidden = torch.cat([torch.zeros_like(last[:, :1]), last[:, :-1]], dim=1)
    return PolicyOutput(logprobs=logprobs, entropy=entropy, hidden=hidden)


@torch.no_grad()
def token_logprobs(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    temperature: float,
    chunk_size: int = 8,
    first_scored: int = 1,
) -> torch.Tensor:
    """[B, T] float32 log-probs without gradients, `chunk_size` rows at a time to bound the
    [rows, T, vocab] logits tensor (49k vocab x 300 tokens x 8 rows is ~470 MB in fp32)."""
    parts = [
        policy_forward(
            model, input_ids[i : i + chunk_size], attention_mask[i : i + chunk_size], temperature,
            first_scored=first_scored,
        ).logprobs
        for i in range(0, input_ids.shape[0], chunk_size)
    ]
    return torch.cat(parts, dim=0)
