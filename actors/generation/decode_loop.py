"""Iteration-level (continuous) batching: requests join the running batch at the next step.

Each `step` ends the rows whose caller gave up or whose deadline passed, decodes one token for
every running row, prefills the requests admitted since the last step (together, in left-padded
forwards of similar lengths: the padding is masked and positions are counted per row, so a prompt's
first token does not depend on its neighbours) and moves their live rows into the batch. A row
that finishes leaves at once and frees its slot. Sampling is per row with the row's own seeded
generator, so a greedy or seeded request gives the same text alone or in a busy batch.

Text is streamed safely: a delta never contains part of a stop string that may still complete,
nor half of a multi-byte character. Pure torch, no Ray and no asyncio: actors/serving/scheduler.py
drives it from the server's event loop.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from rayrlhf.actors.generation.kv_batch import KVBatch
from rayrlhf.actors.generation.tokens import left_pad
from rayrlhf.actors.serving.text_generator import (
    ChoiceDelta,
    GenerationRequest,
    TextGenerator,
    Update,
    find_stop,
    held_back,
    row_seed,
    sample_tokens,
)

PAD_SPLIT_TOKENS = 64
"""Padding a longer prompt would add to a prefill group beyond which it starts a group of its own
(about what one more forward costs here, in tokens of prefill work)."""


def prefill_groups(prompts: list[tuple[GenerationRequest, int]]) -> list[list[tuple[GenerationRequest, int]]]:
    """(request, prompt index) pairs in groups to prefill together, shortest first: a prompt joins the
    current group unless padding the group's rows up to its length adds more than PAD_SPLIT_TOKENS."""
    groups: list[list[tuple[GenerationRequest, int]]] = []
    width = 0
    for r, p in sorted(prompts, key=lambda pair: len(pair[0].prompts[pair[1]])):
        length = len(r.prompts[p])
        if groups and len(groups[-1]) * (length - width) <= PAD_SPLIT_TOKENS:
            groups[-1].append((r, p))
        else:
            groups.append([(r, p)])
        width = length
    return groups


@dataclass
class _Row:
    request: GenerationRequest
    choice: int
    generator: torch.Generator
    tokens: list[int] = field(default_factory=list)
    sampled: int = 0
    emitted: int = 0
    finish: str | None = None


class DecodeLoop:
    """The rows in flight (at most max_rows) and the requests they belong to."""

    def __init__(self, generator: TextGenerator, max_rows: int) -> None:
        self.gen = generator
        self.max_rows = max_rows
        self.requests: dict[GenerationRequest, list[_Row]] = {}
        """Every admitted request that is not done, with all its rows (finished ones included)."""
        self.new: list[GenerationRequest] = []
        """Admitted, not yet prefilled."""
        self.running: list[_Row] = []
        """The rows in the KV batch, in its order."""
        self.batch = KVBatch()
        self.step_rows = 0
        """Rows decoded or prefilled in the last step."""

    @property
    def free_rows(self) -> int:
        return self.max_rows - len(self.running) - sum(r.rows for r in self.new)

    def admit(self, request: GenerationRequest) -> None:
        """Take a request in; it is prefilled at the next step. The caller checks free_rows first."""
        if request.rows > self.free_rows:
            raise ValueError(f"{request.rows} sequences do not fit in {self.free_rows} free rows")
        seed = request.params.seed if request.params.seed is not None else self.gen.random_seed()
        self.requests[request] = [
            _Row(request, choice, torch.Generator().manual_seed(row_seed(seed, choice))) for choice in range(request.rows)
        ]
        self.new.append(request)

    def reset(self) -> list[GenerationRequest]:
        """Forget everything (after a failed step); returns the requests that were in flight."""
        dropped = list(self.requests)
        self.__init__(self.gen, self.max_rows)
        return dropped

    def step(self) -> list[tuple[GenerationRequest, Update]]:
        """One iteration; an Update for each request with new text or a finish in it."""
        deltas: dict[GenerationRequest, list[ChoiceDelta]] = {}
        self._expire(deltas)
        self._drop_finished()
        touched = {row.request for row in self.running} | set(self.new)
        self.step_rows = len(self.running) + sum(r.rows for r in self.new)
        if self.running:
            logits, cache = self.gen.forward(**self.batch.inputs())
            tokens = self._sample(self.running, logits)
            self._take(self.running, tokens, deltas)
            self.batch.advance(cache, tokens)
        if self.new:
            self._prefill(self.new, deltas)
        self.new = []
        self._drop_finished()
        return self._updates(deltas, len(touched), self.step_rows)

    def _drop_finished(self) -> None:
        live = [i for i, row in enumerate(self.running) if row.finish is None]
        self.batch.keep(live)
        self.running = [self.running[i] for i in live]

    def _expire(self, deltas: dict[GenerationRequest, list[ChoiceDelta]]) -> None:
        """End the rows whose caller gave up or whose deadline passed, before spending compute on them."""
        now = time.monotonic()
        for request, rows in self.requests.items():
            if request.cancelled or now >= request.deadline:
                for row in rows:
                    if row.finish is None:
                        row.finish = "cancelled" if request.cancelled else "timeout"
                        deltas.setdefault(request, []).append(ChoiceDelta(row.choice, "", row.finish))
        self.new = [r for r in self.new if any(row.finish is None for row in self.requests[r])]

    def _prefill(self, requests: list[GenerationRequest], deltas: dict[GenerationRequest, list[ChoiceDelta]]) -> None:
        """The joining requests' prompts through the model together: one forward per group of similar
        lengths (usually one group). A prefill costs about as much as a 16-row decode step for one short
        prompt and little more for several, and the running rows wait for it; but a long prompt padded
        beside short ones would multiply the work, hence the groups (prefill_groups)."""
        for group in prefill_groups([(r, p) for r in requests for p in range(len(r.prompts))]):
            self._prefill_group(group, deltas)

    def _prefill_group(
        self, group: list[tuple[GenerationRequest, int]], deltas: dict[GenerationRequest, list[ChoiceDelta]]
    ) -> None:
        """(request, prompt index) pairs through the model in one left-padded forward, each prompt once
        whatever its n (its cache is then repeated per sample); first tokens sampled, live rows joined."""
        ids, mask = left_pad([r.prompts[p] for r, p in group], self.gen.pad_id)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        logits, cache = self.gen.forward(ids, mask, positions, DynamicCache())
        prompt_of_row = torch.arange(len(group)).repeat_interleave(torch.tensor([r.n for r, _ in group]))
        rows = [row for r, p in group for row in self.requests[r][p * r.n:(p + 1) * r.n]]  # choice = p * n + sample
        tokens = self._sample(rows, logits[prompt_of_row])
        self._take(rows, tokens, deltas)
        live = [i for i, row in enumerate(rows) if row.finish is None]
        if live:
            index = prompt_of_row[live]
            cache.batch_select_indices(index)  # selects and repeats (a prompt's n samples share its prefill)
            mask = mask[index]
            self.batch.join(cache, mask, mask.sum(-1), tokens[live])
            self.running += [rows[i] for i in live]

    @staticmethod
    def _sample(rows: list[_Row], logits: torch.Tensor) -> torch.Tensor:
        temperature = torch.tensor([r.request.params.temperature for r in rows])
        top_p = torch.tensor([r.request.params.top_p for r in rows])
        return sample_tokens(logits, temperature, top_p, [r.generator for r in rows])

    def _take(self, rows: list[_Row], tokens: torch.Tensor, deltas: dict[GenerationRequest, list[ChoiceDelta]]) -> None:
        for row, token in zip(rows, tokens.tolist()):
            if row.finish is None:
                delta = self._advance(row, token)
                if delta is not None:
                    deltas.setdefault(row.request, []).append(delta)

    def _advance(self, row: _Row, token: int) -> ChoiceDelta | None:
        """Take one sampled token into the row; the text that is safe to emit, if any."""
        params = row.request.params
        row.sampled += 1
        if token in self.gen.eos_ids:
            row.finish = "stop"
        else:
            row.tokens.append(token)
        text = self.gen.decode(row.tokens)
        stops = params.stop
        longest = max((len(s) for s in stops), default=0)
        cut = find_stop(text, stops, max(0, row.emitted - longest)) if stops else None
        if cut is not None:
            row.finish, end = "stop", max(cut, row.emitted)
        else:
            if row.finish is None and row.sampled >= params.max_tokens:
                row.finish = "length"
            end = len(text)
            if row.finish is None:
                end -= held_back(text, stops)
                if text.endswith("\ufffd"):  # an incomplete multi-byte character: wait for the rest
                    end = min(end, len(text) - 1)
        delta = text[row.emitted:end] if end > row.emitted else ""
        row.emitted = max(row.emitted, end)
        if delta or row.finish:
            return ChoiceDelta(row.choice, delta, row.finish)
        return None

    def _updates(
        self, deltas: dict[GenerationRequest, list[ChoiceDelta]], requests_in_step: int, rows_in_step: int
    ) -> list[tuple[GenerationRequest, Update]]:
        out = []
        for request, choices in deltas.items():
            rows = self.requests[request]
            done = all(row.finish is not None for row in rows)
            if done:
                del self.requests[request]
            out.append((request, Update(
                choices=sorted(choices, key=lambda c: c.index), prompt_tokens=request.prompt_tokens,
                completion_tokens=sum(row.sampled for row in rows), done=done,
                batch_requests=requests_in_step, batch_rows=rows_in_step,
            )))
        return out
