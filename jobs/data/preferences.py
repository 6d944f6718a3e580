"""The built-in preference set, derived from the built-in task (jobs/task.py).

For every fact the chosen answer is the task's reference sentence ("17 plus 25 is 42."); the
rejected one is a corruption of it, of one of four kinds:
- wrong: the same sentence with a wrong answer (a nearby number, or another answer of the family);
- truncated: the sentence cut off before its answer ("17 plus 25");
- off_topic: a correct answer to a question of another family;
- corrupted: the sentence's words shuffled, its full stop dropped.
The kind is drawn at random per item. Held-out pairs come from the first facts of the task's
stream, exactly as the RL job's held-out prompts do: with the same seed and a num_eval at least
the RL job's, the reward model never trains on a fact the RL job evaluates on.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from rayrlhf.jobs.data.task import HELD_OUT_BLOCK, family_stream

KINDS = ("wrong", "truncated", "off_topic", "corrupted")


@dataclass(frozen=True)
class PreferencePair:
    prompt: str
    chosen: str
    rejected: str
    kind: str | None = None
    """What makes `rejected` worse, when known (the built-in set says); used to break down accuracy."""


def _answer_split(reference: str) -> tuple[str, str]:
    """("17 plus 25 is", "42") for "17 plus 25 is 42.": every reference ends in "... is ANSWER."."""
    head, _, answer = reference.rstrip(".").rpartition(" is ")
    return f"{head} is", answer


def wrong_answer(reference: str, others: list[str], rng: random.Random) -> str:
    """The reference with a wrong answer: a number moved by 1-5, else another answer from `others`."""
    head, answer = _answer_split(reference)
    first, _, rest = answer.partition(" ")
    if first.lstrip("-").isdigit():
        delta = rng.choice([d for d in range(-5, 6) if d])
        wrong = " ".join(filter(None, [str(int(first) + delta), rest]))
    else:
        choices = [a for a in (_answer_split(o)[1] for o in others) if a != answer]
        wrong = rng.choice(choices) if choices else answer[::-1]
    return f"{head} {wrong}."


def truncated(reference: str, rng: random.Random) -> str:
    """Cut off before the answer, never empty: between the first word and the answer."""
    words = _answer_split(reference)[0].split()
    return " ".join(words[: rng.randint(1, len(words))])


def corrupted(reference: str, rng: random.Random) -> str:
    """The same words, shuffled into a different order, without the full stop."""
    words = reference.rstrip(".").split()
    shuffled = words[:]
    for _ in range(10):
        rng.shuffle(shuffled)
        if shuffled != words:
            break
    return " ".join(shuffled)


def builtin_preferences(num_train: int, num_eval: int, seed: int) -> tuple[list[PreferencePair], list[PreferencePair]]:
    """Train and held-out pairs; the same seed gives the same lists.

    The split is the RL task's (jobs.task.builtin_task): held-out pairs come from the head of the
    stream, training pairs start after its reserved held-out block, so a reward model never trains
    on a prompt the RL job evaluates on.
    """
    stream = family_stream(seed)
    if num_train < 1 or num_eval < 1:
        raise ValueError(f"num_train and num_eval must be >= 1, got {num_train} and {num_eval}")
    start = max(HELD_OUT_BLOCK, num_eval)
    if start + num_train > len(stream):
        raise ValueError(
            f"the built-in task has {len(stream)} distinct items; asked for {num_train} training pairs "
            f"after {start} held-out items"
        )
    rng = random.Random(seed + 1)
    by_family: dict[str, list[str]] = {}
    for family, _, reference in stream:
        by_family.setdefault(family, []).append(reference)
    pairs = []
    for family, question, reference in stream[:num_eval] + stream[start : start + num_train]:
        kind = rng.choice(KINDS)  # drawn, not rotated: a rotation would line up with the families' round-robin
        if kind == "wrong":
            rejected = wrong_answer(reference, rng.sample(by_family[family], min(8, len(by_family[family]))), rng)
        elif kind == "truncated":
            rejected = truncated(reference, rng)
        elif kind == "off_topic":
            other = rng.choice([f for f in by_family if f != family])
            rejected = rng.choice(by_family[other])
        else:
            rejected = corrupted(reference, rng)
        pairs.append(PreferencePair(prompt=question, chosen=reference, rejected=rejected, kind=kind))
    return pairs[num_eval:], pairs[:num_eval]
