"""What a caller asks the engine for, and what each decode step gives back.

A request holds prompts as token ids, n samples of each, and per-row sampling settings; Serve
builds one per HTTP request, the rollout worker one per batch. The decode loop answers with an
Update per step and request (Serve streams them), made of ChoiceDeltas: the new text of a choice,
and its sampled token ids and log-probs when the request asked for them.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    temperature: float
    """0 means greedy."""
    top_p: float
    stop: tuple[str, ...]
    seed: int | None
    """Same seed, same prompt, same settings: same tokens, whatever else is being decoded
    (actors/generation/sampler.py). None: a random one."""


@dataclass(eq=False)
class GenerationRequest:
    """One request: n samples of each prompt (prompts as token ids). Hashed by identity."""

    prompts: list[list[int]]
    n: int
    params: SamplingParams
    deadline: float
    """time.monotonic() after which its rows stop with finish_reason "timeout"."""
    cancelled: bool = False
    """Set by a caller that stopped listening; its rows leave the batch at the next step."""
    num_beams: int = 1
    """Above 1: beam search (actors/generation/beam_search.py) instead of the decode loop; n <= num_beams."""
    text: bool = True
    """Stream text: detokenise each row as it grows and apply the stop strings. A batch that only
    wants token ids (the rollout) turns it off and pays none of that per-step work."""
    logprobs: bool = False
    """Record each sampled token's log-prob; ChoiceDeltas then carry the new token ids and log-probs."""

    @property
    def rows(self) -> int:
        return len(self.prompts) * self.n

    @property
    def prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)


@dataclass
class ChoiceDelta:
    index: int
    """prompt_index * n + sample_index, as OpenAI numbers choices."""
    text: str
    finish_reason: str | None
    """None while running; then "stop" (EOS or stop string), "length", "timeout" or "cancelled"."""
    token_ids: list[int] = field(default_factory=list)
    """The ids sampled since the choice's last delta (a final EOS included), if the request asked for log-probs."""
    logprobs: list[float] = field(default_factory=list)
    """log softmax(logits / T) of each of those ids (T = 1 for greedy rows), before the top_p cut."""


@dataclass
class Update:
    """What one decode step produced for one request."""

    choices: list[ChoiceDelta]
    """Only the choices with new text, tokens or a finish reason in this step."""
    prompt_tokens: int
    completion_tokens: int
    """Tokens sampled so far over all choices, a final EOS included."""
    done: bool
    batch_requests: int
    """Requests that took part in this step (decoded or prefilled)."""
    batch_rows: int
    """Sequences that took part in this step."""

    def then(self, later: Update) -> Update:
        """This update and the request's next one as a single update (for a reader that fell behind)."""
        choices = {c.index: c for c in self.choices}
        for c in later.choices:
            before = choices.get(c.index)
            choices[c.index] = c if before is None else ChoiceDelta(
                c.index, before.text + c.text, c.finish_reason, before.token_ids + c.token_ids,
                before.logprobs + c.logprobs,
            )
        requests, rows = max((self.batch_requests, self.batch_rows), (later.batch_requests, later.batch_rows))
        return Update(
            choices=sorted(choices.values(), key=lambda c: c.index), prompt_tokens=later.prompt_tokens,
            completion_tokens=later.completion_tokens, done=later.done, batch_requests=requests, batch_rows=rows,
        )
