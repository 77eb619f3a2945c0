"""Group commit: concurrent callers share one storage round trip, each awaiting its own result.

While one batch is being written, new submissions queue up; the next batch takes them all. Under
light load a batch is one item and adds no delay; under heavy load round trips are amortised.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

ItemT = TypeVar("ItemT")
ResultT = TypeVar("ResultT")

FlushFn = Callable[[list[ItemT]], Awaitable[list[ResultT | Exception]]]


class Coalescer(Generic[ItemT, ResultT]):
    """Batches :meth:`submit` calls into calls of ``flush`` with up to ``max_batch`` items."""

    def __init__(self, flush: FlushFn[ItemT, ResultT], *, max_batch: int = 256) -> None:
        self._flush = flush
        self._max_batch = max_batch
        self._queue: list[tuple[ItemT, asyncio.Future[ResultT]]] = []
        self._task: asyncio.Task[None] | None = None

    async def submit(self, item: ItemT) -> ResultT:
        """Queue ``item`` and wait until its batch is written; errors are per item."""
        future: asyncio.Future[ResultT] = asyncio.get_running_loop().create_future()
        self._queue.append((item, future))
        if self._task is None:
            self._task = asyncio.create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        try:
            while self._queue:
                batch = self._queue[: self._max_batch]
                del self._queue[: self._max_batch]
                try:
                    results = await self._flush([item for item, _ in batch])
                except Exception as exc:
                    results = [exc] * len(batch)
                for (_, future), result in zip(batch, results, strict=True):
                    # The caller may have gone (client disconnected); the write still stands.
                    if future.done():
                        continue
                    if isinstance(result, Exception):
                        future.set_exception(result)
                    else:
                        future.set_result(result)
        finally:
            self._task = None

    async def aclose(self) -> None:
        """Wait for queued items to be written."""
        task = self._task
        if task is not None:
            await asyncio.shield(task)
