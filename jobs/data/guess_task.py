"""The built-in task of the `guess_number` environment: one game per row, its range in the row.

The secret number is not in the row: the environment draws it from the episode's seed
(jobs/run/episodes.py), so a prompt seen again later is a new game. Ranges cycle from 1..8 to 1..32;
held-out rows follow the training rows (their games differ by seed, not by range).
"""

from __future__ import annotations

from rayrlhf.actors.rl.trajectory import Prompt

HIGHS = (8, 12, 16, 20, 24, 32)


def guess_number_task(num_train: int, num_eval: int, seed: int) -> tuple[list[Prompt], list[Prompt]]:
    """Train and held-out games (`seed` is unused: the episodes' seeds draw the numbers)."""
    rows = [Prompt(id=i, text="Guess the number.", extra={"low": 1, "high": HIGHS[i % len(HIGHS)]})
            for i in range(num_train + num_eval)]  # fmt: skip
    return rows[:num_train], rows[num_train:]
