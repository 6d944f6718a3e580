"""Feedback on served answers: what was served (a bounded window) and the rows feedback turns into.

No Ray, no files: an endpoint's state actor (jobs/serve_feedback.py) holds one FeedbackBook for the
whole endpoint and writes the rows it returns. Requests (`POST /v1/feedback`):
- a rating: `{"id": "cmpl-...", "index": 0, "rating": 1}`; rating in [0, 1] (thumbs up 1, down 0);
- a preference: `{"chosen": "cmpl-a", "rejected": {"id": "cmpl-b", "index": 1}}` (a plain id means
  choice 0), two answers to the same prompt.
A rating is a rated-sample row (prompt, response, score, label). An explicit preference is a pair
row (prompt, chosen, rejected); so is each pair of differently rated answers to the same prompt
(the higher rating chosen). Both row kinds are what `rayrlhf train-rm` reads (jobs/data/supervised.py).
Answers older than max_age_s, or beyond the newest max_records, are forgotten: feedback on them
gets 410, feedback on an id never served here 404.
"""

from __future__ import annotations

import json
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from rayrlhf.actors.serving.openai_schema import OpenAIError, _refuse_constant

Prompt = str | list[dict[str, str]]
"""A completion prompt, or chat messages [{"role", "content"}]: what train-rm reads as `prompt`."""


@dataclass
class Served:
    """One response: its choices' prompts and texts (choice i answers prompts[i])."""

    id: str
    version: str
    prompts: list[Prompt]
    texts: list[str]
    time: float = field(default_factory=time.time)
    ratings: dict[int, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Answer:
    id: str
    index: int
    version: str
    prompt: Prompt
    text: str
    served_at: float


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class ResponseRef(_Strict):
    id: str = Field(min_length=1)
    index: int = Field(0, ge=0)


class Rating(ResponseRef):
    rating: float = Field(ge=0, le=1)


class Preference(_Strict):
    chosen: str | ResponseRef
    rejected: str | ResponseRef

    def refs(self) -> tuple[tuple[str, ResponseRef], tuple[str, ResponseRef]]:
        def ref(value: str | ResponseRef) -> ResponseRef:
            return ResponseRef(id=value) if isinstance(value, str) else value
        return ("chosen", ref(self.chosen)), ("rejected", ref(self.rejected))


def _param(loc: tuple) -> str | None:
    parts = [str(p) for p in loc if p not in ("str", "ResponseRef")]  # pydantic names union members
    return ".".join(parts) or None


def parse_feedback(body: bytes) -> Rating | Preference:
    """A rating or a preference, or OpenAIError(400) naming the field."""
    try:
        data = json.loads(body, parse_constant=_refuse_constant)
    except (ValueError, RecursionError) as e:
        raise OpenAIError(400, f"the request body is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise OpenAIError(400, "the request body must be a JSON object")
    schema: type[Rating] | type[Preference]
    if "rating" in data:
        schema = Rating
    elif "chosen" in data or "rejected" in data:
        schema = Preference
    else:
        raise OpenAIError(400, "feedback needs 'rating' (with 'id') or 'chosen' and 'rejected'", param="rating")
    try:
        return schema.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        param = _param(first["loc"])
        raise OpenAIError(400, f"{param + ': ' if param else ''}{first['msg']}", param=param) from None


def prompt_key(prompt: Prompt) -> str:
    return json.dumps(prompt, sort_keys=True)


class FeedbackBook:
    """The window of served answers and the rating/preference rules."""

    def __init__(self, max_records: int, max_age_s: float, clock: Callable[[], float] = time.time) -> None:
        self.max_records, self.max_age_s, self.clock = max_records, max_age_s, clock
        self.served: OrderedDict[str, Served] = OrderedDict()
        self.forgotten: deque[str] = deque(maxlen=max_records)
        """Ids that left the window (410, not 404), as many as the window holds."""

    def __len__(self) -> int:
        return len(self.served)

    def record(self, served: Served) -> None:
        self._expire()
        self.served[served.id] = served
        while len(self.served) > self.max_records:
            self.forgotten.append(self.served.popitem(last=False)[0])

    def _expire(self) -> None:
        oldest = self.clock() - self.max_age_s
        while self.served and next(iter(self.served.values())).time < oldest:
            self.forgotten.append(self.served.popitem(last=False)[0])

    def answer(self, ref: ResponseRef, param: str) -> Answer:
        self._expire()
        served = self.served.get(ref.id)
        if served is None:
            if ref.id in self.forgotten:
                raise OpenAIError(410, f"response {ref.id!r} is no longer kept for feedback (older than "
                                  f"{self.max_age_s:g} s or beyond the newest {self.max_records})", param, code="expired")
            raise OpenAIError(404, f"no response {ref.id!r} was served here", param, code="response_not_found")
        if ref.index >= len(served.texts):
            raise OpenAIError(400, f"response {ref.id!r} has {len(served.texts)} choice(s); index {ref.index} "
                              "is out of range", f"{param}.index" if param != "id" else "index")
        if not served.texts[ref.index].strip():
            raise OpenAIError(400, f"choice {ref.index} of {ref.id!r} is empty: a reward model cannot train on it", param)
        return Answer(ref.id, ref.index, served.version, served.prompts[ref.index], served.texts[ref.index], served.time)

    def feedback(self, request: Rating | Preference) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """(rating rows, preference-pair rows) to store for one feedback request."""
        now = self.clock()
        if isinstance(request, Preference):
            (_, chosen_ref), (_, rejected_ref) = request.refs()
            chosen, rejected = self.answer(chosen_ref, "chosen"), self.answer(rejected_ref, "rejected")
            if (chosen.id, chosen.index) == (rejected.id, rejected.index):
                raise OpenAIError(400, "chosen and rejected are the same answer", "rejected")
            if prompt_key(chosen.prompt) != prompt_key(rejected.prompt):
                raise OpenAIError(400, "chosen and rejected answer different prompts", "rejected")
            return [], [pair_row(chosen, rejected, "explicit", now)]
        answer = self.answer(request, "id")
        served = self.served[answer.id]
        if answer.index in served.ratings:
            raise OpenAIError(409, f"choice {answer.index} of {answer.id!r} is already rated", "id", code="already_rated")
        pairs = []
        key = prompt_key(answer.prompt)
        for other in self.served.values():
            for index, rating in other.ratings.items():
                if rating == request.rating or other.texts[index] == answer.text or prompt_key(other.prompts[index]) != key:
                    continue
                them = Answer(other.id, index, other.version, other.prompts[index], other.texts[index], other.time)
                better, worse = (answer, them) if request.rating > rating else (them, answer)
                pairs.append(pair_row(better, worse, "ratings", now))
        served.ratings[answer.index] = request.rating
        rating_row = {
            "prompt": answer.prompt, "response": answer.text, "score": request.rating,
            "label": int(request.rating >= 0.5), "id": answer.id, "index": answer.index,
            "version": answer.version, "served_at": answer.served_at, "time": now,
        }
        return [rating_row], pairs


def pair_row(chosen: Answer, rejected: Answer, kind: str, now: float) -> dict[str, Any]:
    """A preference pair as train-rm reads it (prompt, chosen, rejected, kind), with where it came from."""
    return {
        "prompt": chosen.prompt, "chosen": chosen.text, "rejected": rejected.text, "kind": kind,
        "chosen_version": chosen.version, "rejected_version": rejected.version,
        "chosen_id": f"{chosen.id}#{chosen.index}", "rejected_id": f"{rejected.id}#{rejected.index}", "time": now,
    }
