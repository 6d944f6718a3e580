"""The engine's one sampler, and its one RNG scheme.

Sampling is exactly softmax(logits / T) restricted by top_p (the smallest set of tokens holding
top_p of the mass, at least one); temperature 0 is greedy. Nothing else (top_k, repetition
penalties) plays a part.

The RNG scheme: every row (one sample of one prompt) draws from its own torch.Generator, seeded by
mix_seed(seed, row) from its request's seed and its index in the request (prompt * n + sample) only.
So a row's tokens are a pure function of the weights, its prompt, its settings, the seed and its
index: never of the rows beside it, the order in which rows joined the batch, or what else ran in
the process. Serve: the request's seed (a random one if it gives none), so a seeded request gets
the same text alone or in a busy batch. Rollout: the seed is mix_seed(run seed, policy version, call
counter), so a worker restarted in the job or resumed from a checkpoint, given back its version and
counter (RolloutWorker.state_dict), redraws exactly the samples the lost one would have drawn.
"""

from __future__ import annotations

import numpy as np
import torch


def mix_seed(*parts: int) -> int:
    """A 32-bit seed that depends on every part (non-negative ints), well mixed (numpy's SeedSequence)."""
    return int(np.random.SeedSequence(list(parts)).generate_state(1)[0])


def row_generator(seed: int, row: int) -> torch.Generator:
    """The generator of one row of a request: a function of the request's seed and the row's index only."""
    return torch.Generator().manual_seed(mix_seed(seed, row))


def scaled_logprobs(logits: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    """[n, V] log softmax(logits / T) of each row; greedy rows (T = 0) at T = 1."""
    temperature = torch.where(temperature > 0, temperature, 1.0)
    if bool((temperature == 1).all()):  # x / 1 == x: the same scores without a pass over the vocabulary
        return torch.log_softmax(logits, dim=-1)
    return torch.log_softmax(logits / temperature[:, None], dim=-1)


def nucleus(probs: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """[n, V] probabilities cut to the smallest set of tokens holding top_p of each row's mass (at least
    its most likely token), in vocabulary order, unnormalised."""
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    outside = (sorted_probs.cumsum(-1) - sorted_probs) >= top_p[:, None]  # the mass ranked above is enough
    outside[:, 0] = False
    return torch.zeros_like(probs).scatter_(-1, order, sorted_probs.masked_fill(outside, 0.0))


def sample_tokens(
    scores: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor, generators: list[torch.Generator]
) -> torch.Tensor:
    """One token per row: argmax where temperature is 0 (or top_p is: it keeps only the top token),
    else a draw from exp(scores) cut to top_p, with the row's own generator. scores: scaled_logprobs of
    the logits (a batch of greedy rows needs only their argmax: the raw logits do). A row's draw
    depends on its own scores and generator only."""
    drawn = (temperature > 0) & (top_p > 0)
    if not bool(drawn.any()):
        return scores.argmax(dim=-1)
    sampled = torch.nonzero(drawn).flatten()
    tokens = scores.new_zeros(len(scores), dtype=torch.long)
    if not bool(drawn.all()):  # an argmax over the vocabulary only for the greedy rows
        tokens[~drawn] = scores[~drawn].argmax(dim=-1)
        scores, top_p = scores[sampled], top_p[sampled]
    probs = scores.exp()
    cut = torch.nonzero(top_p < 1).flatten()
    if len(cut):  # a sort of the vocabulary per row is not free: only the rows that cut
        probs[cut] = nucleus(probs[cut], top_p[cut])
    uniform = torch.cat([torch.rand(1, generator=generators[row], dtype=torch.float64) for row in sampled.tolist()])
    tokens[sampled] = inverse_cdf(probs, uniform)
    return tokens


def inverse_cdf(probs: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """Per row, the token whose slice of the cumulative mass holds uniform x the row's total (uniform
    in [0, 1)): a draw from the unnormalised probs with a single random number per row, where
    torch.multinomial draws one per token of the vocabulary (several times slower at 49k tokens).
    Float64 throughout, so each token's chance is its probability and a token of probability 0 is
    never drawn."""
    cdf = probs.cumsum(-1, dtype=torch.float64)
    total = cdf[:, -1:]
    target = torch.minimum(uniform[:, None] * total, total.nextafter(torch.zeros_like(total)))  # below the total
    return torch.searchsorted(cdf, target, right=True).squeeze(-1)  # the first token whose cdf exceeds it
