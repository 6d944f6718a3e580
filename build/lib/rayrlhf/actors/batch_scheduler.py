"""One decode batch at a time; each batch takes every group of requests waiting when it starts.

Why this exists next to `@serve.batch`: Serve forms a batch as soon as its wait times out, even
while the previous batch is still decoding, so under load it lines up many small batches that
then run one after another. Here the groups Serve hands over are merged at the moment the model
is free: everything that queued during a batch decodes together in the next one (up to
max_rows sequences; a group is never split). Pure asyncio, no Ray: the decode steps run in a
worker thread so the event loop keeps serving.
"""

from __future__ import annotations

import asyncio
from collections import Counter, deque
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field

from rayrlhf.actors.text_generator import GenerationRequest, Update

Stream = Callable[[list[GenerationRequest]], Iterator[list[Update | None]]]
_END = object()


class BatchStats:
    """Counts of the decode batches run, by number of requests."""

    def __init__(self) -> None:
        self.batches = 0
        self.requests = 0
        self.sequences = 0
        self.sizes: Counter[int] = Counter()

    def record(self, requests: list[GenerationRequest]) -> int:
        self.batches += 1
        self.requests += len(requests)
        self.sequences += sum(r.rows for r in requests)
        self.sizes[len(requests)] += 1
        return self.batches

    def as_dict(self) -> dict:
        return {
            "batches": self.batches, "requests": self.requests, "sequences": self.sequences,
            "batch_sizes": {str(k): v for k, v in sorted(self.sizes.items())},
        }


@dataclass
class _Group:
    requests: list[GenerationRequest]
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    done: bool = False

    @property
    def rows(self) -> int:
        return sum(r.rows for r in self.requests)

    def finish(self, last: object) -> None:
        """End the group's stream with `last` (_END or the exception), once."""
        if not self.done:
            self.done = True
            self.queue.put_nowait(last)


class DecodeScheduler:
    def __init__(self, stream: Stream, max_rows: int) -> None:
        self._stream = stream
        self.max_rows = max_rows
        self._waiting: deque[_Group] = deque()
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self.stats = BatchStats()

    async def run(self, requests: list[GenerationRequest]) -> AsyncIterator[list[tuple[int, Update] | None]]:
        """Per decode step, one entry per request: (batch id, Update), or None once it is done."""
        group = _Group(requests)
        if group.rows > self.max_rows:
            raise ValueError(f"{group.rows} sequences exceed max_rows={self.max_rows}")
        if self._task is None or self._task.done():  # created lazily, inside the serving event loop
            self._wake = asyncio.Event()
            self._task = asyncio.create_task(self._loop())
        self._waiting.append(group)
        self._wake.set()
        while (item := await group.queue.get()) is not _END:
            if isinstance(item, BaseException):
                raise item
            yield item

    async def _loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._waiting:
                await self._decode(self._take())

    def _take(self) -> list[_Group]:
        groups, rows = [], 0
        while self._waiting and (not groups or rows + self._waiting[0].rows <= self.max_rows):
            groups.append(self._waiting.popleft())
            rows += groups[-1].rows
        return groups

    async def _decode(self, groups: list[_Group]) -> None:
        requests = [r for g in groups for r in g.requests]
        batch_id = self.stats.record(requests)
        try:
            steps = self._stream(requests)
            while (updates := await asyncio.to_thread(next, steps, None)) is not None:
                start = 0
                for g in groups:
                    part, start = updates[start:start + len(g.requests)], start + len(g.requests)
                    if g.done:
                        continue
                    if all(u is None for u in part):
                        g.finish(_END)
                    else:
                        g.queue.put_nowait([None if u is None else (batch_id, u) for u in part])
        except Exception as e:  # a failed batch fails its requests, not the scheduler
            for g in groups:
                g.finish(e)
            return
        for g in groups:
            g.finish(_END)
