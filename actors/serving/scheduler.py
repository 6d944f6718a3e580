"""Drives the DecodeLoop from the server's event loop: requests wait here until their rows fit.

Why a loop of its own rather than `@serve.batch`: Serve hands over fixed batches, and a request
that arrives while one decodes waits for the whole batch to end. Here a request joins the
running batch at a decode step as soon as `max_rows` has room for all its rows (first come, first
served; a request is never split), and each request gets its Updates on its own queue; a reader that
falls behind gets the steps it missed as one Update (fewer, longer stream chunks). While rows
are decoding, arrivals are gathered for up to `join_wait_steps` steps (unless they already fill the
free rows) so that they share one prefill: a prefill stalls every running row and costs about as
much for a few short prompts as for one (TGI's router also holds joiners back for a few steps).
Pure asyncio, no Ray: the steps run on the replica's torch thread (actors/runtime/torch_thread.py) so the
event loop keeps serving.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import AsyncGenerator

import torch

from rayrlhf.actors.generation.decode_loop import DecodeLoop
from rayrlhf.actors.generation.requests import GenerationRequest, Update
from rayrlhf.actors.runtime.torch_thread import TorchThread

logger = logging.getLogger("ray.serve")


class BatchStats:
    """What the loop has done: steps, requests, and rows per step (the evidence of batching)."""

    def __init__(self) -> None:
        self.steps = 0
        self.row_steps = 0
        """Sum over steps of the rows decoded or prefilled in it."""
        self.max_rows_in_step = 0
        self.requests = 0
        self.sequences = 0
        self.cancelled = 0
        """Requests whose caller stopped listening before they were done."""
        self.running_rows = 0

    def as_dict(self) -> dict:
        return {
            "steps": self.steps, "row_steps": self.row_steps, "max_rows_in_step": self.max_rows_in_step,
            "mean_rows_per_step": round(self.row_steps / self.steps, 2) if self.steps else 0.0,
            "requests": self.requests, "sequences": self.sequences, "cancelled": self.cancelled,
            "running_rows": self.running_rows,
        }


class ContinuousScheduler:
    def __init__(self, loop: DecodeLoop, join_wait_steps: int, thread: TorchThread | None = None) -> None:
        self.loop = loop
        self.thread = thread or TorchThread(torch.get_num_threads())
        """Where the steps run: the replica's, which loaded the model (its own for a caller that gives none)."""
        self.join_wait_steps = join_wait_steps
        self._waiting: deque[GenerationRequest] = deque()
        self._arrived: dict[GenerationRequest, int] = {}
        """The step count when each waiting request arrived."""
        self._queues: dict[GenerationRequest, asyncio.Queue] = {}
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self.stats = BatchStats()

    async def run(self, request: GenerationRequest) -> AsyncGenerator[Update, None]:
        """The request's Updates as its steps produce them; closing the iterator frees its rows."""
        if request.rows > self.loop.max_rows:
            raise ValueError(f"{request.rows} sequences exceed max_rows={self.loop.max_rows}")
        if self._task is None or self._task.done():  # created lazily, inside the serving event loop
            self._wake = asyncio.Event()
            self._task = asyncio.create_task(self._run_loop())
        queue: asyncio.Queue = asyncio.Queue()
        self._queues[request] = queue
        self._waiting.append(request)
        self._arrived[request] = self.stats.steps
        self._wake.set()
        done = False
        backlog: deque[Update | BaseException] = deque()
        try:
            while not done:
                if not backlog:
                    backlog.append(await queue.get())
                while not queue.empty():
                    backlog.append(queue.get_nowait())
                item = backlog.popleft()
                if isinstance(item, BaseException):  # the step failed; the loop has dropped the request
                    done = True
                    raise item
                while backlog and isinstance(backlog[0], Update):  # several steps' worth: one update
                    item = item.then(backlog.popleft())
                done = item.done
                yield item
        finally:
            if not done:  # the caller stopped listening (or failed): its rows leave at the next step
                request.cancelled = True
                self.stats.cancelled += 1
            self._queues.pop(request, None)
            if request in self._waiting:
                self._waiting.remove(request)
            self._arrived.pop(request, None)

    async def _run_loop(self) -> None:
        while True:
            if not self._waiting and not self.loop.requests:
                await self._wake.wait()
                self._wake.clear()
                continue
            join = self._join_now()
            while join and self._waiting and self._waiting[0].rows <= self.loop.free_rows:
                request = self._waiting.popleft()
                del self._arrived[request]
                self.loop.admit(request)
                self.stats.requests += 1
                self.stats.sequences += request.rows
            try:
                updates = await self.thread.run(self.loop.step)
            except Exception as e:  # a failed step fails the requests in flight, not the server
                logger.error("decode step failed; failing %d request(s)", len(self.loop.requests), exc_info=e)
                for request in self.loop.reset():
                    self._send(request, e)
                continue
            self._record()
            for request, update in updates:
                self._send(request, update)

    def _join_now(self) -> bool:
        """Admit waiting requests before this step, or let them gather for a common prefill?"""
        if not self._waiting:
            return False
        if not self.loop.running or sum(r.rows for r in self._waiting) >= self.loop.free_rows:
            return True  # no running row to stall, or waiting longer cannot fill the prefill more
        return self.stats.steps - self._arrived[self._waiting[0]] >= self.join_wait_steps

    def _send(self, request: GenerationRequest, item: Update | BaseException) -> None:
        queue = self._queues.get(request)
        if queue is not None:
            queue.put_nowait(item)

    def _record(self) -> None:
        rows = self.loop.step_rows
        self.stats.steps += 1
        self.stats.row_steps += rows
        self.stats.max_rows_in_step = max(self.stats.max_rows_in_step, rows)
        self.stats.running_rows = len(self.loop.running)
