"""A learner rank's death, told apart from other Ray errors: the run then restarts the learner group
from its latest checkpoint (jobs/run/state.py), where a stateless role's death is redone in place
(jobs/run/recovery.py)."""

from __future__ import annotations

from typing import TypeVar

import ray

from rayrlhf.actors.rl.nonfinite import NonFiniteError
from rayrlhf.cluster.actor_group import ActorGroup

T = TypeVar("T")


class LearnerFailure(RuntimeError):
    """A learner rank died (or its group broke): the group is restarted from the latest checkpoint."""


def is_learner_failure(error: BaseException, learner: ActorGroup) -> bool:
    """Whether a Ray error came from (or through) one of the learner's actors."""
    ids = {actor._actor_id.hex() for actor in learner}
    cause: BaseException | None = error
    while cause is not None:
        if getattr(cause, "actor_id", None) in ids or getattr(cause, "_actor_id", None) in ids:
            return True
        cause = getattr(cause, "cause", None)
    return False


def get_all(refs: list[ray.ObjectRef[T]]) -> list[T]:
    """ray.get, but the first failure surfaces at once (a rank whose peer died may block in a collective)."""
    pending = list(refs)
    while pending:
        ready, pending = ray.wait(pending, num_returns=1)
        ray.get(ready)
    return ray.get(refs)


def learner_get(refs: list[ray.ObjectRef[T]], learner: ActorGroup) -> list[T]:
    """get_all for calls of the learner group: a failure of the group becomes a LearnerFailure."""
    try:
        return get_all(refs)
    except ray.exceptions.RayError as e:
        meaning = learner_error(e, learner)
        if meaning is e:
            raise
        raise meaning from e


def learner_error(error: ray.exceptions.RayError, learner: ActorGroup) -> BaseException:
    """What a learner call's error means to the driver: the run diverged (NonFiniteError: stop, never
    restart into the same divergence), a rank died or an input was lost with its node (LearnerFailure:
    restart the group, as the other ranks may wait in a collective for the one that failed), or neither."""
    if isinstance(error, ray.exceptions.RayTaskError) and isinstance(error.cause, NonFiniteError):
        return error.cause
    if is_learner_failure(error, learner) or isinstance(error, ray.exceptions.ObjectLostError):
        return LearnerFailure(str(error))
    return error
