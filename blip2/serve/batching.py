"""Dynamic batching: requests that arrive within a short window go to the model as one batch.

A ``DynamicBatcher`` owns a bounded asyncio queue (full: ``QueueFullError``, which the app answers 503) and one
collector task. The collector takes the first waiting item, then keeps taking items until ``max_batch_size`` are in
hand or ``window_ms`` has passed since the first, and runs ``run_batch(items) -> results`` on the model's executor:
one worker thread shared by every batcher of the app, so the event loop is never blocked and one forward runs at a
time. While a batch runs, new requests queue up and form the next batch. ``max_batch_size=1`` turns batching off
(each request is its own forward, with no window), which is what the benchmark compares against.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
from dataclasses import dataclass
from typing import Any, Callable

log = logging.getLogger(__name__)


class QueueFullError(Exception):
    """The batcher's queue holds ``max_queue`` waiting requests already."""


@dataclass
class BatchStats:
    """What a batcher has done: requests answered, forwards run, the largest batch."""

    requests: int = 0
    batches: int = 0
    largest_batch: int = 0

    def add(self, size: int) -> None:
        self.requests += size
        self.batches += 1
        self.largest_batch = max(self.largest_batch, size)


class DynamicBatcher:
    """Collects ``submit``-ted items into batches for ``run_batch`` (a list of items -> a list of results, one per
    item in order; a result that is an Exception is raised to that item's caller alone)."""

    def __init__(self, name: str, run_batch: Callable[[list], list], executor: concurrent.futures.Executor,
                 max_batch_size: int = 16, window_ms: float = 5.0, max_queue: int = 64) -> None:
        if max_batch_size < 1 or max_queue < 1 or window_ms < 0:
            raise ValueError(f"batcher {name}: max_batch_size={max_batch_size} and max_queue={max_queue} must be "
                             f">= 1 and window_ms={window_ms} >= 0")
        self.name = name
        self.run_batch = run_batch
        self.executor = executor
        self.max_batch_size = max_batch_size
        self.window_s = window_ms / 1000 if max_batch_size > 1 else 0.0
        self.max_queue = max_queue
        self.stats = BatchStats()
        self.queue: asyncio.Queue | None = None
        self.task: asyncio.Task | None = None

    def start(self) -> None:
        """Start the collector on the running event loop."""
        self.queue = asyncio.Queue(maxsize=self.max_queue)
        self.task = asyncio.get_running_loop().create_task(self.collect_forever(), name=f"batcher-{self.name}")

    async def stop(self) -> None:
        """Stop the collector; requests still waiting get an error."""
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
            self.task = None
        while self.queue is not None and not self.queue.empty():
            _, future = self.queue.get_nowait()
            if not future.done():
                future.set_exception(RuntimeError("the server is shutting down"))

    @property
    def waiting(self) -> int:
        return self.queue.qsize() if self.queue is not None else 0

    async def submit(self, item: Any, timeout: float | None = None) -> Any:
        """The result for ``item``, computed in some batch. QueueFullError when ``max_queue`` items wait already;
        ``asyncio.TimeoutError`` after ``timeout`` seconds (the item is then dropped if its batch has not begun)."""
        if self.queue is None:
            raise RuntimeError(f"batcher {self.name} is not started")
        future = asyncio.get_running_loop().create_future()
        try:
            self.queue.put_nowait((item, future))
        except asyncio.QueueFull:
            raise QueueFullError(f"{self.name}: {self.max_queue} requests are waiting already; retry later") from None
        return await asyncio.wait_for(future, timeout)

    async def next_batch(self) -> list[tuple[Any, asyncio.Future]]:
        """The first waiting item, then whatever arrives within the window, up to ``max_batch_size`` items."""
        batch = [await self.queue.get()]
        deadline = time.monotonic() + self.window_s
        while len(batch) < self.max_batch_size:
            if not self.queue.empty():
                batch.append(self.queue.get_nowait())
                continue
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self.queue.get(), remaining))
            except asyncio.TimeoutError:
                break
        return [(item, future) for item, future in batch if not future.done()]  # drop timed-out or cancelled ones

    async def collect_forever(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self.next_batch()
            if not batch:
                continue
            items = [item for item, _ in batch]
            try:
                results = await loop.run_in_executor(self.executor, self.run_guarded, items)
            except Exception as error:  # noqa: BLE001 - the executor itself failed; every caller hears of it
                results = [error] * len(batch)
            self.stats.add(len(batch))
            for (_, future), result in zip(batch, results):
                if future.done():
                    continue
                if isinstance(result, BaseException):
                    future.set_exception(result)
                else:
                    future.set_result(result)

    def run_guarded(self, items: list) -> list:
        """``run_batch(items)``; when a batch of several fails, each item is run alone, so one bad item fails only
        its own request."""
        try:
            results = list(self.run_batch(items))
        except Exception as error:  # noqa: BLE001 - handed to the callers
            if len(items) == 1:
                return [error]
            log.warning("batcher %s: a batch of %d failed (%s); running its items one by one", self.name,
                        len(items), error)
            return [self.run_guarded([item])[0] for item in items]
        if len(results) != len(items):
            error = RuntimeError(f"batcher {self.name}: run_batch gave {len(results)} results for {len(items)} items")
            return [error] * len(items)
        return results
