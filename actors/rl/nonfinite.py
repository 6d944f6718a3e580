"""A diverging update, caught: a loss or gradient norm that is NaN or infinite on some learner rank.

The learner checks each micro-batch's loss before its backward pass and each gradient norm at the
accumulation boundary, and the ranks agree (one all-reduce of a flag per rank), so they all act at
the same call. A non-finite gradient is never applied: the plain engine and DeepSpeed 0.19's ZeRO 1-3
and bf16 optimizers drop such an update themselves (as an overflow, counted in `skipped_steps`), and
DeepSpeed's ZeRO-0 in fp32 has its norm checked before its step. learner.on_nonfinite then either
stops the step (`stop`, NonFiniteError: the learner still holds the last finite state, which the
driver saves) or goes on without that update (`skip`; a non-finite loss makes its window's gradients
NaN, so the engine drops that window). Where weights changed anyway (an earlier update of the same
step, or an engine that applied a non-finite gradient), the learner marks itself diverged and
refuses to save or send its weights from then on: no non-finite weights reach a checkpoint or a
rollout worker.
"""

from __future__ import annotations


class NonFiniteError(FloatingPointError):
    """The run diverged at a known step, rank and quantity; the message says which."""
