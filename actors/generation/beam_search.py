"""Beam search for the Serve endpoints (the `num_beams` extension field), outside the continuous batch.

A beam request keeps num_beams hypotheses per prompt and returns the best n of them, so it does
not fit the one-row-per-choice decode loop; it runs Hugging Face `generate` on its own, bounded
by the request's deadline (`max_time`). Beam search is deterministic: temperature, top_p and seed
do not apply. Its text arrives as one Update at the end (a stream gets it in one event).
"""

from __future__ import annotations

import time

import torch

from rayrlhf.actors.generation.tokens import left_pad
from rayrlhf.actors.serving.text_generator import ChoiceDelta, GenerationRequest, TextGenerator, Update, find_stop


@torch.no_grad()
def beam_search(gen: TextGenerator, request: GenerationRequest) -> Update:
    """The best `n` beams of each prompt as finished choices (index prompt * n + k)."""
    params = request.params
    left = request.deadline - time.monotonic()
    if left <= 0 or request.cancelled:
        return _ended(request, "cancelled" if request.cancelled else "timeout")
    ids, mask = left_pad(request.prompts, gen.pad_id)
    out = gen.model.generate(
        input_ids=ids.to(gen.device), attention_mask=mask.to(gen.device), max_new_tokens=params.max_tokens, num_beams=request.num_beams,
        num_return_sequences=request.n, do_sample=False, early_stopping=True, eos_token_id=gen.eos_ids,
        pad_token_id=gen.pad_id, max_time=left,
    )
    if time.monotonic() >= request.deadline:
        return _ended(request, "timeout")
    choices, sampled = [], 0
    for index, row in enumerate(out[:, ids.shape[1]:].cpu().tolist()):
        ends = [i for i, t in enumerate(row) if t in gen.eos_ids]
        tokens = row[: ends[0]] if ends else row
        sampled += len(tokens) + bool(ends)
        text = gen.decode(tokens)
        cut = find_stop(text, params.stop) if params.stop else None
        finish = "stop" if ends or cut is not None else "length"
        choices.append(ChoiceDelta(index, text if cut is None else text[:cut], finish))
    return Update(choices, request.prompt_tokens, sampled, done=True, batch_requests=1, batch_rows=out.shape[0])


def _ended(request: GenerationRequest, reason: str) -> Update:
    choices = [ChoiceDelta(i, "", reason) for i in range(request.rows)]
    return Update(choices, request.prompt_tokens, 0, done=True, batch_requests=1, batch_rows=request.rows)
