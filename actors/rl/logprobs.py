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
from typing import Any
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from rayrlhf.actors.rl.losses import entropy_from_logits
from rayrlhf.actors.rl.packing import Layout, packed_layout, padded_layout, shared_prompt_layout


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
    """[B, T, H] the last hidden state that predicted token t (zeros where unscored); for a value head."""


def _chunk_logprobs(
    head: nn.Module, hidden: torch.Tensor, tokens: torch.Tensor, temperature: float, with_entropy: bool,
    entropy_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    logits = head(hidden).float()  # the float() is a no-op on fp32 models
    if temperature != 1.0:  # [N, vocab]: skip the copy when it changes nothing
        logits = logits / temperature
    lse = torch.logsumexp(logits, dim=-1)
    logp = logits.gather(-1, tokens.unsqueeze(-1)).squeeze(-1) - lse
    if not with_entropy:
        return logp, None
    if torch.is_grad_enabled() and entropy_grad:
        return logp, entropy_from_logits(logits)
    with torch.no_grad():
        return logp, entropy_metric(logits, lse)


def head_logprobs(
    head: nn.Module, hidden: torch.Tensor, tokens: torch.Tensor, temperature: float, chunk: int, *,
    with_entropy: bool = False, entropy_grad: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """[N] log p(tokens[i] | hidden[i]) (and the entropy) through the LM head, `chunk` positions at a
    time, so only one chunk's [chunk, vocab] logits exist at once. With gradients and more than one
    chunk, each chunk's logits are recomputed in the backward pass (activation checkpointing)
    instead of kept: the memory stays flat as responses grow, for one more LM-head forward."""
    pieces = list(zip(hidden.split(chunk), tokens.split(chunk)))
    recompute = torch.is_grad_enabled() and len(pieces) > 1
    outs: list[Any] = [
        checkpoint(_chunk_logprobs, head, h, t, temperature, with_entropy, entropy_grad, use_reentrant=False)
        if recompute else _chunk_logprobs(head, h, t, temperature, with_entropy, entropy_grad)
        for h, t in pieces
    ]  # fmt: skip
    logp = torch.cat([o[0] for o in outs])
    return logp, torch.cat([o[1] for o in outs]) if with_entropy else None


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
    pack_tokens: int | None = None,
    share_prompts: bool = False,
    logits_chunk: int = 1024,
) -> PolicyOutput:
    """One forward pass; gradients flow if the caller has them enabled.

    entropy_grad=False computes the entropy as a metric only, without keeping the
    [N, vocab] softmax alive for backward.
    first_scored: columns before it (the prompt) get 0 and the LM head skips them; with a
    49k vocabulary that head is a fifth of the model's compute.
    pack_tokens: run the model on the real tokens packed into rows of about this many
    (actors/rl/packing.py) instead of on the padded rows; None: padded. The values are the same.
    share_prompts: with pack_tokens, rows that repeat the tokens before first_scored (a group's
    prompt) run them once (packing.shared_prompt_layout). The values are the same.
    logits_chunk: positions per LM-head chunk (head_logprobs).
    """
    batch, width = input_ids.shape
    if not 1 <= first_scored <= width:
        raise ValueError(f"first_scored={first_scored} is outside the {width} columns")
    if pack_tokens is None:
        if share_prompts:
            raise ValueError("share_prompts runs packed rows: it needs pack_tokens")
        layout = padded_layout(input_ids, attention_mask, position_ids(attention_mask))
    elif share_prompts:
        layout = shared_prompt_layout(input_ids, attention_mask, first_scored, pack_tokens)
    else:
        layout = packed_layout(input_ids, attention_mask, pack_tokens)
    # the decoder and the LM head called apart, so the head sees only the scored positions
    # nn.Module.__getattr__ hides PreTrainedModel's methods from the type checker
    decoder: Any = model.get_decoder()  # type: ignore[operator]
    head: Any = model.get_output_embeddings()  # type: ignore[operator]
    hidden = decoder(
        input_ids=layout.input_ids, attention_mask=model_mask(model, layout), position_ids=layout.position_ids,
        use_cache=False,
    ).last_hidden_state  # fmt: skip
    scored = scored_positions(attention_mask)
    scored[:, :first_scored] = False
    keep = scored.reshape(-1)[layout.source]
    source = layout.source[keep]
    # where each real token of the padded batch sits in the model's rows; a scored token's predecessor
    # (the one before it in its padded row) gives the hidden state that predicts it
    placed = torch.full((batch * width,), -1, dtype=torch.long, device=input_ids.device)
    placed[layout.source] = layout.target
    predicting = hidden.reshape(-1, hidden.shape[-1])[placed[source - 1]]
    tokens = input_ids.reshape(-1)[source]
    logp, entropy = head_logprobs(
        head, predicting, tokens, temperature, logits_chunk,
        with_entropy=with_entropy, entropy_grad=entropy_grad,
    )  # fmt: skip

    def scatter(values: torch.Tensor) -> torch.Tensor:
        out = values.new_zeros(batch * width, *values.shape[1:]).index_copy(0, source, values)
        return out.reshape(batch, width, *values.shape[1:])

    return PolicyOutput(
        logprobs=scatter(logp),
        entropy=None if entropy is None else scatter(entropy),
        hidden=scatter(predicting) if with_hidden else None,
    )


def model_mask(model: nn.Module, layout: Layout) -> torch.Tensor | None:
    """The layout's attention mask as the model's attention takes it: SDPA a boolean one, eager an
    additive one (a boolean there would be added as 0/1); other kernels take no 4D mask."""
    mask = layout.attention_mask
    if mask is None or mask.dim() != 4:
        return mask
    kind = getattr(model.config, "_attn_implementation", None)
    if kind == "sdpa":
        return mask
    if kind == "eager":
        dtype = next(model.parameters()).dtype
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, torch.finfo(dtype).min)
    raise ValueError(f"learner.share_prompts needs SDPA or eager attention; the model runs {kind}")


@torch.no_grad()
def token_logprobs(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    temperature: float,
    chunk_size: int = 8,
    first_scored: int = 1,
    pack_tokens: int | None = None,
    share_prompts: bool = False,
    logits_chunk: int = 1024,
) -> torch.Tensor:
    """[B, T] float32 log-probs without gradients. Padded (pack_tokens None): `chunk_size` rows at a
    time, to bound the activations of the padded rows; packed: the whole batch in one pass."""
    step = input_ids.shape[0] if pack_tokens is not None else chunk_size
    parts = [
        policy_forward(
            model, input_ids[i : i + step], attention_mask[i : i + step], temperature,
            first_scored=first_scored, pack_tokens=pack_tokens, share_prompts=share_prompts,
            logits_chunk=logits_chunk,
        ).logprobs
        for i in range(0, input_ids.shape[0], step)
    ]  # fmt: skip
    return torch.cat(parts, dim=0)
