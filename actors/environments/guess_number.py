"""The built-in `guess_number` environment: a multi-turn feedback game.

The environment picks a whole number in [low, high] (the row's fields, default 1..20) from the
episode's seed; the model guesses and hears "Higher." or "Lower." until it is right (reward 1,
done) or runs out of turns (env.max_turns: reward 0). A reply without a number is told so.
One game played out (EXAMPLE) comes first, as the calculator's worked exchange: from the rules alone
SmolLM2-135M talks about the game instead of guessing. Deterministic given the seed, so exact resume holds.
"""

from __future__ import annotations

import random
from typing import Any

from rayrlhf.actors.rewards.math_answers import final_number


RULES = ("I am thinking of a whole number from {low} to {high}. Guess it: reply with one number. "
         "After each guess I say higher or lower.")
EXAMPLE = [
    {"role": "user", "content": RULES.format(low=1, high=20)}, {"role": "assistant", "content": "10"},
    {"role": "user", "content": "Lower."}, {"role": "assistant", "content": "5"},
    {"role": "user", "content": "Higher."}, {"role": "assistant", "content": "7"},
]
"""A game before the game (one-shot): with it, SmolLM2-135M replies with a number (2-3 tokens) and wins
35-46% of the held-out games greedily before training; without it, its greedy reply asks which number
to guess and 7 of 8 sampled replies hold no number (benchmarks/README.md, guess_number)."""


class GuessNumber:
    def reset(self, row: dict[str, Any], seed: int) -> list[dict[str, Any]]:
        low, high = int(row.get("low") or 1), int(row.get("high") or 20)
        self.secret = random.Random(seed).randint(low, high)
        return [*EXAMPLE, {"role": "user", "content": "Right, 7. A new game. " + RULES.format(low=low, high=high)}]

    def step(self, assistant: dict[str, Any]) -> tuple[list[dict[str, Any]], float, bool]:
        guess = final_number(assistant["content"])
        if guess is None:
            return [{"role": "user", "content": "Reply with one whole number."}], 0.0, False
        if guess == self.secret:
            return [], 1.0, True
        return [{"role": "user", "content": "Higher." if guess < self.secret else "Lower."}], 0.0, False
