"""Iteration-level (continuous) batching: the engine's one decode loop.

Each `step` ends the rows whose caller gave up or whose deadline passed, decodes one token for
every running row, prefills the requests admitted since the last step (together, in left-padded
forwards of similar lengths: the padding is masked and positions are counted per row, so a prompt's
first token does not depend on its neighbours) and moves their live rows into the batch. Each
prompt is prefilled once and its cache repeated for its n samples, and the tokens all prompts of a
group start with (a system prompt, a worked example: every episode of a multi-turn step) once for
all. A row that finishes (EOS, max_tokens, a stop string) leaves at once and frees its slot.
Sampling is per row with the row's own seeded generator (actors/generation/sampler.py), so a row's
tokens do not depend on the batch.

Serve admits requests and steps this loop as they come (actors/serving/scheduler.py); the rollout
submits one request and steps it to the end (LocalEngine.generate). A request asks for what it
needs back: streamed text (actors/generation/text_stream.py) and/or each token's id and log-prob;
one that wants no text pays no detokenisation. Pure torch, no Ray and no asyncio.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from rayrlhf.actors.generation.kv_batch import KVBatch
from rayrlhf.actors.generation.model_runner import ModelRunner
from rayrlhf.actors.generation.requests import ChoiceDelta, GenerationRequest, Update
from rayrlhf.actors.generation.sampler import row_generator, sample_tokens, scaled_logprobs
from rayrlhf.actors.generation.text_stream import safe_end
from rayrlhf.actors.generation.tokens import left_pad

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
    """Every sampled id, a final EOS included."""
    logprobs: list[float] = field(default_factory=list)
    """log softmax(logits / T) of each sampled id, if the request asked for them."""
    emitted: int = 0
    """Characters of its text already streamed."""
    finish: str | None = None


class DecodeLoop:
    """The rows in flight (at most max_rows) and the requests they belong to."""

    def __init__(self, runner: ModelRunner, max_rows: int) -> None:
        self.runner = runner
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

    def admit(self, request: GenerationRequest) -> list[_Row]:
        """Take a request in (it is prefilled at the next step); its rows, which hold the tokens sampled.
        The caller checks free_rows first."""
        if request.rows > self.free_rows:
            raise ValueError(f"{request.rows} sequences do not fit in {self.free_rows} free rows")
        seed = request.params.seed if request.params.seed is not None else self.runner.random_seed()
        rows = [_Row(request, choice, row_generator(seed, choice)) for choice in range(request.rows)]
        self.requests[request] = rows
        self.new.append(request)
        return rows

    def reset(self) -> list[GenerationRequest]:
        """Forget everything (after a failed step); returns the requests that were in flight."""
        dropped = list(self.requests)
        self.__init__(self.runner, self.max_rows)
        return dropped

    def step(self) -> list[tuple[GenerationRequest, Update]]:
        """One iteration; an Update for each request with new text, tokens or a finish in it."""
        deltas: dict[GenerationRequest, list[ChoiceDelta]] = {}
        self._expire(deltas)
        self._drop_finished()
        touched = {row.request for row in self.running} | set(self.new)
        self.step_rows = len(self.running) + sum(r.rows for r in self.new)
        if self.running:
            logits, cache = self.runner.forward(**self.batch.inputs())
            tokens = self._sample(self.running, logits, deltas)
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
        whatever its n (its cache is then repeated per sample); first tokens sampled, live rows joined.
        The tokens every prompt of the group starts with go through the model once (_shared_prefill)."""
        prompts = [r.prompts[p] for r, p in group]
        shared, cache = self._shared_prefill(prompts)
        ids, mask = left_pad([q[shared:] for q in prompts], self.runner.pad_id)
        mask = torch.cat([torch.ones((len(prompts), shared), dtype=mask.dtype), mask], dim=1)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, shared:]
        logits, cache = self.runner.forward(ids, mask, positions, cache)
        prompt_of_row = torch.arange(len(group)).repeat_interleave(torch.tensor([r.n for r, _ in group]))
        rows = [row for r, p in group for row in self.requests[r][p * r.n:(p + 1) * r.n]]  # choice = p * n + sample
        tokens = self._sample(rows, logits[prompt_of_row], deltas)
        live = [i for i, row in enumerate(rows) if row.finish is None]
        if live:
            index = prompt_of_row[live]
            cache.batch_select_indices(index)  # selects and repeats (a prompt's n samples share its prefill)
            mask = mask[index]
            self.batch.join(cache, mask, mask.sum(-1), tokens[live])
            self.running += [rows[i] for i in live]

    def _shared_prefill(self, prompts: list[list[int]]) -> tuple[int, DynamicCache]:
        """The prompts' common first tokens through the model once, their cache repeated per prompt: a
        system prompt, a tool description, a worked example, the question a group's episodes share.
        Returns how many (0 when that would not save the cost of one more forward: PAD_SPLIT_TOKENS)
        and the cache to go on from."""
        shared = min(len(q) for q in prompts) - 1  # each prompt keeps one token, whose logits sample
        for q in prompts[1:]:
            shared = next((i for i, (a, b) in enumerate(zip(prompts[0][:shared], q)) if a != b), shared)
        if (len(prompts) - 1) * shared < PAD_SPLIT_TOKENS:
            return 0, DynamicCache()
        head = torch.tensor([prompts[0][:shared]])
        _, cache = self.runner.forward(head, torch.ones_like(head), torch.arange(shared)[None], DynamicCache())
        cache.batch_repeat_interleave(len(prompts))
        return shared, cache

    def _sample(self, rows: list[_Row], logits: torch.Tensor, deltas: dict[GenerationRequest, list[ChoiceDelta]]
                ) -> torch.Tensor:
        """The next token of each row, taken into the rows; its log-prob recorded from the same logits
        for the requests that asked (no softmax at all when every row is greedy and none asked)."""
        temperature = torch.tensor([row.request.params.temperature for row in rows])
        top_p = torch.tensor([row.request.params.top_p for row in rows])
        record = any(row.request.logprobs for row in rows)
        scores = scaled_logprobs(logits, temperature) if record or bool((temperature > 0).any()) else logits
        tokens = self._choose(rows, scores, temperature, top_p)
        logprobs = scores.gather(-1, tokens[:, None]).squeeze(-1).tolist() if record else [0.0] * len(rows)
        for row, token, logprob in zip(rows, tokens.tolist(), logprobs):
            delta = self._advance(row, token, logprob) if row.finish is None else None
            if delta is not None:
                deltas.setdefault(row.request, []).append(delta)
        return tokens

    def _choose(self, rows: list[_Row], scores: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor
                ) -> torch.Tensor:
        """The sampler's pick for each row (the one seam tests replace to script responses)."""
        return sample_tokens(scores, temperature, top_p, [row.generator for row in rows])

    def _advance(self, row: _Row, token: int, logprob: float) -> ChoiceDelta | None:
        """Take one sampled token into the row; the delta to send, if any."""
        request, params = row.request, row.request.params
        row.tokens.append(token)
        if request.logprobs:
            row.logprobs.append(logprob)
        if token in self.runner.eos_ids:
            row.finish = "stop"
        elif len(row.tokens) >= params.max_tokens:
            row.finish = "length"
        delta = ""
        if request.text:
            text = self.runner.decode(row.tokens[:-1] if row.finish == "stop" else row.tokens)  # EOS has no text
            end, stopped = safe_end(text, row.emitted, params.stop, finished=row.finish is not None)
            if stopped:
                row.finish = "stop"
            delta = text[row.emitted:end] if end > row.emitted else ""
            row.emitted = max(row.emitted, end)
        if request.logprobs:
            return ChoiceDelta(row.choice, delta, row.finish, [token], [logprob])
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
                completion_tokens=sum(len(row.tokens) for row in rows), done=done,
                batch_requests=requests_in_step, batch_rows=rows_in_step,
            )))
        return out
