"""A diverging update, caught: a loss or gradient norm that is NaN or infinite on some learner rank.

The learner checks each micro-batch's loss before its backward pass and each gradient norm at the
accumulation boundary, and the ranks agree (one all-reduce of a flag per rank), so they all stop at
the same call. Where the check comes before the optimizer step (the loss; the gradient norm on the
plain engine and on ZeRO-0) the update is never applied and the learner still holds the last finite
state, which the driver saves. Where DeepSpeed applied the step before its norm can be read (ZeRO
1-3), the learner marks itself diverged and refuses to save or send its weights from then on: no
non-finite weights reach a checkpoint or a rollout worker.
"""

from __future__ import annotations


class NonFiniteError(FloatingPointError):
    """The run diverged at a known step, rank and quantity; the message says which."""
