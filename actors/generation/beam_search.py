"""Beam search for a Serve request (the `num_beams` extension field), outside the continuous batch.

A beam request keeps num_beams hypotheses per prompt and returns the best n of them, so it does
not fit the one-row-per-choice decode loop; it runs the engine's beam search (LocalEngine.beam_search,
also the rollout's for held-out evaluation) on its own, bounded by the request's deadline. Between
two of its tokens it calls `between_tokens` (the server's decode steps run there, so sampled requests
keep flowing while a long beam search runs), and stops early once its caller left or its deadline
passed. Beam search is deterministic: temperature, top_p and seed do not apply. Its text arrives as
one Update at the end (a stream gets it in one event).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from rayrlhf.actors.generation.engine import LocalEngine
from rayrlhf.actors.generation.requests import ChoiceDelta, GenerationRequest, Update
from rayrlhf.actors.generation.text_stream import find_stop


def beam_update(
    engine: LocalEngine, request: GenerationRequest, between_tokens: Callable[[], None] = lambda: None
) -> Update:
    """The best `n` beams of each prompt as finished choices (index prompt * n + k)."""
    params = request.params

    def ends() -> bool:  # after each token: the other work, then whether anyone still waits for the search
        between_tokens()
        return request.cancelled or time.monotonic() >= request.deadline

    if ends():
        return _ended(request, "cancelled" if request.cancelled else "timeout")
    out = engine.beam_search(request.prompts, request.n, request.num_beams, params.max_tokens, between_tokens=ends)
    if request.cancelled or time.monotonic() >= request.deadline:
        return _ended(request, "cancelled" if request.cancelled else "timeout")
    choices, sampled = [], 0
    for index, row in enumerate(out.tokens.tolist()):
        ends = [i for i, t in enumerate(row) if t in engine.eos_ids]
        tokens = row[: ends[0]] if ends else row
        sampled += len(tokens) + bool(ends)
        text = engine.decode(tokens)
        cut = find_stop(text, params.stop) if params.stop else None
        finish = "stop" if ends or cut is not None else "length"
        choices.append(ChoiceDelta(index, text if cut is None else text[:cut], finish))
    return Update(choices, request.prompt_tokens, sampled, done=True, batch_requests=1, batch_rows=len(choices))


def _ended(request: GenerationRequest, reason: str) -> Update:
    choices = [ChoiceDelta(i, "", reason) for i in range(request.rows)]
    return Update(choices, request.prompt_tokens, 0, done=True, batch_requests=1, batch_rows=request.rows)
