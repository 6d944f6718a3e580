"""One thread for all of a serving replica's torch work: loading the model, decode steps, beam search.

Why: the replica's event loop must stay free, so the model runs in another thread; but which thread
matters on a CPU. OpenMP (torch's intra-op pool) keeps a pool of helper threads per calling thread.
A second calling thread (the loader, then `asyncio.to_thread`'s workers) adds a second pool, and once
pooled threads outnumber the cores libgomp throttles their spin-waiting, so every small parallel region
of a decode step waits for a thread to wake up: a decode step from a worker thread is clearly slower
than from the thread that loaded the model, and with every call on this one thread it is not
(figures: benchmarks/README.md, "Figures from code comments"). Pure Python, no Ray.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import torch

T = TypeVar("T")


class TorchThread:
    def __init__(self, torch_threads: int) -> None:
        self._pool = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="torch", initializer=torch.set_num_threads, initargs=(torch_threads,)
        )

    def call(self, fn: Callable[..., T], *args) -> T:
        """fn(*args) on the torch thread, waiting for it (for set-up code outside the event loop)."""
        return self._pool.submit(fn, *args).result()

    async def run(self, fn: Callable[..., T], *args) -> T:
        """fn(*args) on the torch thread, awaited: calls run one at a time, in the order they came."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)
