"""Real faults for tests and benchmarks: signal an actor's process, found by its title, mid-call.

A Ray worker's process title is `ray::ClassName` while idle and `ray::ClassName.method` during a
call. A Ray started in-process (cluster/local.py) runs its workers as descendants of the driver, so
the driver finds its own run's actors among its children, never another run's on the same machine.
"""

from __future__ import annotations

import signal
import threading
import time

import psutil


def process_title(process: psutil.Process) -> str:
    try:
        return " ".join(process.cmdline())
    except psutil.Error:  # it exited meanwhile
        return ""


def actor_process(cls: str) -> psutil.Process:
    """The one process of this driver's actor of class `cls`."""
    found = [
        p for p in psutil.Process().children(recursive=True)
        if process_title(p).split(".")[0].split(" ")[0] == f"ray::{cls}"
    ]
    if len(found) != 1:
        raise LookupError(f"expected one ray::{cls} process among this driver's, found {[process_title(p) for p in found]}")
    return found[0]


class Fault:
    """An `on_step` hook for `train`: after step `after`, send `sig` to the actor of class `cls`, as
    soon as its title shows `method` in progress (None: at once, between steps). So the fault lands
    inside the next step's phase, whatever the machine's speed."""

    def __init__(self, cls: str, method: str | None, sig: int = signal.SIGKILL, after: int = 1) -> None:
        self.cls, self.method, self.sig, self.after = cls, method, sig, after
        self.pid: int | None = None
        self.at: float | None = None
        """time.perf_counter() when the signal was sent."""
        self.in_call = False
        """Whether the process was inside `method` when it got the signal."""

    def on_step(self, step: int, metrics: dict[str, float]) -> None:
        if step != self.after:
            return
        process = actor_process(self.cls)
        if self.method is None:
            self._send(process, in_call=False)
        else:
            threading.Thread(target=self._watch, args=(process,), daemon=True).start()

    def _watch(self, process: psutil.Process, timeout_s: float = 600) -> None:
        busy, deadline = f"ray::{self.cls}.{self.method}", time.monotonic() + timeout_s
        in_call = False
        while not in_call and time.monotonic() < deadline:
            in_call = process_title(process).startswith(busy)
            if not in_call:
                time.sleep(0.001)
        self._send(process, in_call)

    def _send(self, process: psutil.Process, in_call: bool) -> None:
        self.in_call = in_call
        self.at = time.perf_counter()
        process.send_signal(self.sig)
        self.pid = process.pid
