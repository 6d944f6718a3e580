"""The built-in verifiable task: arithmetic word problems in GSM8K's format, made by code.

Each item is a question and a worked answer ending `#### N`, as GSM8K writes them, so the same
config trains on this task and on GSM8K-format files, and `math_exact_match` checks the final number.
Five families (adding, taking away, equal groups, equal sharing, and two steps), with small numbers:
a 135M model gets some right from the start, which leaves RL a signal to amplify (a task it never
solves gives every group equal rewards and teaches nothing).

As in the built-in text task (jobs/data/task.py), every family enumerates its distinct problems,
phrasing is drawn per item, and the held-out split is the head of the shuffled stream, so no problem
appears in both splits and a smaller num_eval is a prefix of a larger one.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

from rayrlhf.actors.rl.trajectory import Prompt
from rayrlhf.jobs.data.task import round_robin, split_stream

NAMES = "Sam Ana Tom Mia Omar Lena Ravi Zoe Ben Ida Kofi Yuki".split()
ITEMS = "apples marbles stickers books pencils cookies stamps shells cards coins".split()
CONTAINERS = "bags boxes jars baskets packs".split()
INSTRUCTION = " End your answer with the final number."

Problem = tuple[str, str, int]
"""(question, worked answer ending '#### N', N)"""
Render = Callable[[tuple[int, ...], random.Random], Problem]


def _who(rng: random.Random) -> tuple[str, str]:
    return rng.choice(NAMES), rng.choice(ITEMS)


def _add(p: tuple[int, ...], rng: random.Random) -> Problem:
    (a, b), (name, items) = p, _who(rng)
    q = rng.choice([
        "{n} has {a} {i}. {n} buys {b} more. How many {i} does {n} have now?",
        "{n} had {a} {i} and found {b} more. How many {i} does {n} have?",
    ])
    return q.format(n=name, a=a, b=b, i=items), f"{name} has {a} + {b} = {a + b} {items}.", a + b


def _subtract(p: tuple[int, ...], rng: random.Random) -> Problem:
    (a, b), (name, items) = p, _who(rng)
    q = rng.choice([
        "{n} has {a} {i} and gives {b} of them away. How many {i} are left?",
        "{n} had {a} {i} and lost {b}. How many {i} does {n} have now?",
    ])
    return q.format(n=name, a=a, b=b, i=items), f"{a} - {b} = {a - b} {items} are left.", a - b


def _groups(p: tuple[int, ...], rng: random.Random) -> Problem:
    (a, b), (name, items) = p, _who(rng)
    box = rng.choice(CONTAINERS)
    q = "{n} buys {a} {c} with {b} {i} in each. How many {i} does {n} buy?"
    return q.format(n=name, a=a, b=b, c=box, i=items), f"{a} {box} of {b} make {a} * {b} = {a * b} {items}.", a * b


def _share(p: tuple[int, ...], rng: random.Random) -> Problem:
    (a, b), (name, items) = p, _who(rng)
    q = "{n} shares {t} {i} equally among {a} friends. How many {i} does each friend get?"
    return q.format(n=name, t=a * b, a=a, i=items), f"Each friend gets {a * b} / {a} = {b} {items}.", b


def _two_steps(p: tuple[int, ...], rng: random.Random) -> Problem:
    (a, b, c), (name, items) = p, _who(rng)
    q = "{n} has {a} {i}, buys {b} more and then gives {c} to a friend. How many {i} does {n} have now?"
    answer = f"{name} has {a} + {b} = {a + b} {items}, then {a + b} - {c} = {a + b - c} {items}."
    return q.format(n=name, a=a, b=b, c=c, i=items), answer, a + b - c


FAMILIES: dict[str, tuple[list[tuple[int, ...]], Render]] = {
    "add": ([(a, b) for a in range(2, 40) for b in range(2, 30)], _add),
    "subtract": ([(a, b) for a in range(5, 50) for b in range(1, a)], _subtract),
    "groups": ([(a, b) for a in range(2, 10) for b in range(2, 13)], _groups),
    "share": ([(a, b) for a in range(2, 10) for b in range(2, 13)], _share),
    "two_steps": ([(a, b, c) for a in range(3, 25) for b in range(2, 15) for c in range(1, min(10, a + b))], _two_steps),
}
HELD_OUT_BLOCK = 200
"""Items at the head of the stream that training never uses."""


def problem_stream(seed: int) -> list[tuple[str, Problem]]:
    """Every problem once as (family, problem), families round-robin."""
    rng = random.Random(seed)
    return [(name, render(fact, rng)) for name, fact, render in round_robin(FAMILIES, rng)]


def _prompt(index: int, family: str, problem: Problem) -> Prompt:
    question, worked, answer = problem
    extra: dict[str, Any] = {"answer": answer, "family": family}
    return Prompt(id=index, text=question + INSTRUCTION, reference=f"{worked}\n#### {answer}", extra=extra)


def math_task(num_train: int, num_eval: int, seed: int) -> tuple[list[Prompt], list[Prompt]]:
    """Train and held-out word problems; the same seed gives the same lists (ids: train first)."""
    train, held_out = split_stream(problem_stream(seed), num_train, num_eval, HELD_OUT_BLOCK, "the built-in math task")
    return (
        [_prompt(i, family, problem) for i, (family, problem) in enumerate(train)],
        [_prompt(num_train + i, family, problem) for i, (family, problem) in enumerate(held_out)],
    )
