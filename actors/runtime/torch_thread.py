"""One thread for all of a serving replica's torch work: loading the model, decode steps, beam search.

Why: the replica's event loop must stay free, so the model runs in another thread; but which thread
matters on a CPU. OpenMP (torch's intra-op pool) keeps a pool of helper threads per calling thread.
A second calling thread (the loader, then `asyncio.to_thread`'s workers) adds a second pool, and once
pooled threads outnumber the cores libgomp throttles their spin-waiting, so every small parallel region
of a decode step waits for a thread to wake up: a decode step from a worker thread is clearly slower
than from the thread that loaded the model, and with every call on this one thread it is not
(figures: benchmarks/README.md, "Figures from code comments"). A long call (a beam search) lets the
calls queued behind it run between its own steps (`yield_turn`), still on this thread, so decode steps
keep going. Pure Python, no Ray.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

import torch

T = TypeVar("T")
_Job = tuple[Callable[..., Any], tuple[Any, ...], Future]


class TorchThread:
    def __init__(self, torch_threads: int) -> None:
        self._jobs: queue.SimpleQueue[_Job] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._serve, args=(torch_threads,), name="torch", daemon=True)
        self._thread.start()

    def _serve(self, torch_threads: int) -> None:
        torch.set_num_threads(torch_threads)
        while True:
            self._run(self._jobs.get())

    @staticmethod
    def _run(job: _Job) -> None:
        fn, args, future = job
        if future.set_running_or_notify_cancel():
            try:
                future.set_result(fn(*args))
            except BaseException as e:  # the caller gets it
                future.set_exception(e)

    def submit(self, fn: Callable[..., T], *args: Any) -> Future[T]:
        future: Future[T] = Future()
        self._jobs.put((fn, args, future))
        return future

    def call(self, fn: Callable[..., T], *args: Any) -> T:
        """fn(*args) on the torch thread, waiting for it (for set-up code outside the event loop)."""
        return self.submit(fn, *args).result()

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """fn(*args) on the torch thread, awaited: calls run one at a time, in the order they came."""
        return await asyncio.wrap_future(self.submit(fn, *args))

    def yield_turn(self) -> None:
        """From inside a long call on the torch thread (a beam search, between two tokens): run the calls
        that came meanwhile (decode steps), on this same thread, then go on. Only those already queued,
        so a caller that queues its next call at once cannot keep the long one waiting."""
        assert threading.current_thread() is self._thread, "yield_turn() is for calls running on the torch thread"
        for _ in range(self._jobs.qsize()):
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                return
            self._run(job)
