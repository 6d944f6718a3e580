"""Stopping a run on a signal, with a checkpoint, within the time the signal leaves.

SIGINT/SIGTERM ask the driver to stop after the current step and write a checkpoint; a second one
stops at once. A SIGTERM is followed by a SIGKILL after a grace period (Ray's job supervisor:
RAY_JOB_STOP_WAIT_TIME_S, which `rayrlhf submit` sets; Kubernetes: terminationGracePeriodSeconds).
When the driver knows it (checkpoint.stop_grace_s, else the job's RAY_JOB_STOP_WAIT_TIME_S), a step
whose rest and a save would not fit in the time left is abandoned while it collects its batch, before
its learner starts: the driver saves the state from before the step (the learner is untouched since
the last finished step), and a rerun redoes the step whole. The last moment to abandon it is the
deadline less the learning and weight sync, a save (as long as the last step's and the last save took)
and a margin; a step expected to collect past it is abandoned at once, another when it gets there.
Once the learner has started, the step finishes (a pipelined step's learner starts at once).
Installed only in the main thread (a Tune trial runs train() in another).
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from types import FrameType
from typing import TYPE_CHECKING, Any

from rayrlhf.jobs.run import checkpoint

if TYPE_CHECKING:
    from rayrlhf.jobs.run.state import RunState

SignalHandler = Callable[[int, FrameType | None], object] | int | None
MARGIN = 0.1
"""Of the grace period, kept free besides the estimates (a step or a save may take longer than the last)."""
MARGIN_MIN_S = 5.0
"""The margin's floor: abandoning a step, a save's round trip to the learner and the exit take seconds on
a loaded host even when a step takes a fraction of one (a 0.17 s step, 15 s grace: 1.5 s was too little)."""


class StepAbandoned(KeyboardInterrupt):
    """A SIGTERM's grace period cannot cover the rest of this step and a save: the state before it is saved.
    A KeyboardInterrupt because Ray's waits give way to nothing else; they raise a plain one instead,
    so StopSignal.abandoned says which it was."""


def grace_period(configured: float | None, environ: Mapping[str, str] = os.environ) -> float | None:
    """Seconds between a SIGTERM and the SIGKILL after it: checkpoint.stop_grace_s, else the stop wait
    Ray's supervisor gives this job; None when unknown (the step then always finishes)."""
    if configured is not None:
        return configured
    value = environ.get("RAY_JOB_STOP_WAIT_TIME_S")
    try:
        return float(value) if value else None
    except ValueError:
        return None


def last_moment(deadline: float, grace: float, last_step: dict[str, float] | None, save_s: float | None) -> float:
    """When a step still collecting must be abandoned for its learning, sync and a save to end by `deadline`
    (time.monotonic()). -inf without a finished step to go by: abandon at once. A save not timed yet
    in this job is taken to last as long as a step."""
    if not last_step:
        return -math.inf
    after_collect = last_step["time/learn"] + last_step["time/sync"]
    margin = max(MARGIN * grace, MARGIN_MIN_S)
    return deadline - after_collect - (save_s if save_s is not None else last_step["time/step"]) - margin


def collect_seconds(last_step: dict[str, float] | None) -> float:
    """How long a step's collect lasts, as the last one did (inf: unknown)."""
    if not last_step:
        return math.inf
    return last_step["time/step"] - last_step["time/learn"] - last_step["time/sync"]


class StopSignal:
    """SIGINT/SIGTERM ask the driver to stop after the current step, with a checkpoint; a second one stops at
    once; a SIGTERM with a known grace period may abandon the step while it collects (module docstring)."""

    def __init__(self, grace_s: float | None = None) -> None:
        self.signum: int | None = None
        self.grace_s = grace_s
        self.deadline: float | None = None
        """time.monotonic() of the SIGKILL that follows a SIGTERM (with a known grace period)."""
        self.abandoned: str | None = None
        """Why the step was abandoned (StepAbandoned was raised)."""
        self._previous: dict[int, SignalHandler] = {}
        self._run: RunState | None = None
        """Set while a step collects before its learner starts: the step can be abandoned."""
        self._collect_start = 0.0

    def __enter__(self) -> StopSignal:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
            self._previous[signal.SIGALRM] = signal.signal(signal.SIGALRM, self._alarm)
        return self

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum
        if signum == signal.SIGTERM and self.grace_s is not None:
            self.deadline = time.monotonic() + self.grace_s
        finishing = "this step"
        if self.deadline is not None:
            finishing += f" if it can end and be saved in {self.grace_s:g} s"
        print(f"got {signal.Signals(signum).name}: finishing {finishing}, then writing a checkpoint "
              "(send it again to stop at once)", file=sys.stderr, flush=True)  # fmt: skip
        self._abandon_if_late(expected_end=True)

    def _alarm(self, signum: int, frame: FrameType | None) -> None:
        self._abandon_if_late(expected_end=False)

    def _abandon_if_late(self, expected_end: bool) -> None:
        """While a step collects after a SIGTERM: abandon it now if its last moment has come (or, with
        `expected_end`, if its collect is expected to end after it), else set an alarm for that moment."""
        run = self._run
        if run is None or self.deadline is None or self.grace_s is None:
            return
        last = run.history[-1] if run.history else None
        latest, now = last_moment(self.deadline, self.grace_s, last, run.save_seconds), time.monotonic()
        if now >= latest or (expected_end and self._collect_start + collect_seconds(last) > latest):
            self._run = None  # no second StepAbandoned for this step
            self.abandoned = (f"step {run.step + 1} could not end and be saved within the {self.grace_s:g} s "
                              "a SIGTERM leaves")  # fmt: skip
            raise StepAbandoned(self.abandoned)
        signal.setitimer(signal.ITIMER_REAL, latest - now)

    @contextlib.contextmanager
    def collecting(self, run: RunState) -> Iterator[None]:
        """Around a step's collect that its learner waits for: a SIGTERM may abandon the step here
        (StepAbandoned), and at its end if the rest of the step and a save no longer fit."""
        self._run, self._collect_start = run, time.monotonic()
        try:
            self._abandon_if_late(expected_end=True)  # a SIGTERM that came just before
            yield
            self._abandon_if_late(expected_end=False)
        finally:
            self._run = None
            if self._previous:
                signal.setitimer(signal.ITIMER_REAL, 0)

    def checkpoint_if_asked(self, run: RunState) -> None:
        """After a signal: the last finished step's checkpoint (written now unless it exists), then Interrupted."""
        if self.signum is None:
            return
        path = checkpoint.at_step(run.output_dir, run.step) if run.saved_step == run.step else run.save()
        run.tracker.write(f"stopped after step {run.step}; checkpoint: {path} (run the same command to resume)")
        raise checkpoint.Interrupted(self.signum, path)

    def save_abandoned(self, run: RunState, before: dict[str, Any]) -> None:
        """After the step was abandoned: the checkpoint of the last finished step, with the driver state
        from before the abandoned one (the learner has not started it), then Interrupted."""
        assert self.abandoned is not None and self.signum is not None
        path = checkpoint.at_step(run.output_dir, run.step) if run.saved_step == run.step else run.save(before)
        run.tracker.write(f"stopped: {self.abandoned}, so it was abandoned; checkpoint of step {run.step}: {path} "
                          "(run the same command to resume)")  # fmt: skip
        raise checkpoint.Interrupted(self.signum, path)

    def __exit__(self, *exc: object) -> None:
        if self._previous:
            signal.setitimer(signal.ITIMER_REAL, 0)
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
