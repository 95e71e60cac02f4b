"""Dynamic batching: requests to one model are gathered into batches and run in one worker thread.

A :class:`DynamicBatcher` owns a bounded queue and a thread. :meth:`DynamicBatcher.submit` puts
one item on the queue (or raises :class:`QueueFull` at once when it holds ``queue_size`` items)
and returns a :class:`concurrent.futures.Future`; the event loop awaits it with
:meth:`DynamicBatcher.run`, which gives up after ``timeout_s`` (:class:`RequestTimeout`).

The worker takes the first waiting item, then keeps taking items until it holds ``max_batch`` of
them or ``max_wait_ms`` have passed since the first, and calls ``fn(items)`` once: ``fn`` returns
one result per item, in order. When a batch fails, its items are run again one at a time, so one
bad input fails only its own request. Items whose request already timed out are skipped.
"""
from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Any


class QueueFull(Exception):
    """The batcher's queue holds ``queue_size`` items: the server answers 503 with Retry-After."""

    def __init__(self, name: str, size: int, retry_after: int) -> None:
        super().__init__(f"the {name} queue is full ({size} requests waiting); retry in {retry_after} s")
        self.retry_after = retry_after


class RequestTimeout(Exception):
    """A request waited longer than ``timeout_s`` for its answer: the server answers 504."""


_STOP = object()


class DynamicBatcher:
    """Gathers concurrent calls into batches of at most ``max_batch`` for ``fn(items) -> results``.

    Args:
        fn: called in the worker thread with a list of items; returns a list of as many results.
        name: what the batcher serves, for messages and metrics.
        max_batch: the most items of one call (1: no batching).
        max_wait_ms: how long the first item of a batch waits for others.
        queue_size: the most items waiting; one more raises :class:`QueueFull`.
        timeout_s: how long :meth:`run` waits for an answer before :class:`RequestTimeout`.
    """

    def __init__(self, fn: Callable[[list[Any]], Sequence[Any]], *, name: str = "model", max_batch: int = 8,
                 max_wait_ms: float = 10.0, queue_size: int = 64, timeout_s: float = 30.0) -> None:
        if max_batch < 1 or queue_size < 1:
            raise ValueError(f"max_batch and queue_size must be at least 1, got {max_batch} and {queue_size}")
        if max_wait_ms < 0 or timeout_s <= 0:
            raise ValueError(f"max_wait_ms must be >= 0 and timeout_s > 0, got {max_wait_ms} and {timeout_s}")
        self.fn = fn
        self.name = name
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000.0
        self.queue_size = queue_size
        self.timeout_s = timeout_s
        self.batch_sizes: Counter[int] = Counter()  # batch size -> how many calls of fn had it
        self.calls = 0
        self._queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self._busy_since: float | None = None
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._work, name=f"beit3-serve-{name}", daemon=True)
        self._thread.start()

    # ----------------------------------------------------------------------------- the caller side
    @property
    def queue_length(self) -> int:
        return self._queue.qsize()

    def submit(self, item: Any) -> Future:
        """Queue ``item``; its future gets ``fn``'s result for it. :class:`QueueFull` when full."""
        future: Future = Future()
        try:
            self._queue.put_nowait((item, future))
        except queue.Full:
            raise QueueFull(self.name, self.queue_size, self.retry_after()) from None
        return future

    def retry_after(self) -> int:
        """Whole seconds a refused client should wait: about one batch's time, at least 1."""
        return max(1, int(round(self.timeout_s / 10)))

    async def run(self, item: Any) -> Any:
        """Submit ``item`` and await its result; :class:`RequestTimeout` after ``timeout_s``."""
        future = self.submit(item)
        try:
            return await asyncio.wait_for(asyncio.wrap_future(future), self.timeout_s)
        except asyncio.TimeoutError:
            future.cancel()  # still queued: the worker skips it
            raise RequestTimeout(f"the {self.name} model did not answer within {self.timeout_s:g} s") from None

    def close(self, timeout: float = 5.0) -> None:
        """Stop the worker once the items already queued are done."""
        if self._thread.is_alive():
            self._queue.put(_STOP)
            self._thread.join(timeout)

    # ----------------------------------------------------------------------------- the worker side
    def _gather(self) -> tuple[list[tuple[Any, Future]], bool]:
        """The next batch (blocking for its first item) and whether the batcher must stop."""
        first = self._queue.get()
        if first is _STOP:
            return [], True
        batch = [first]
        deadline = time.monotonic() + self.max_wait
        while len(batch) < self.max_batch:
            left = deadline - time.monotonic()
            try:
                entry = self._queue.get(timeout=left) if left > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if entry is _STOP:
                return batch, True
            batch.append(entry)
        return batch, False

    def _work(self) -> None:
        stop = False
        while not stop:
            batch, stop = self._gather()
            # A future cancelled by a timed-out request is dropped; the others are marked running.
            live = [(item, future) for item, future in batch if future.set_running_or_notify_cancel()]
            if live:
                self._run_batch(live)

    def _run_batch(self, live: list[tuple[Any, Future]]) -> None:
        with self._lock:
            self.calls += 1
            self.batch_sizes[len(live)] += 1
        try:
            results = list(self.fn([item for item, _ in live]))
            if len(results) != len(live):
                raise RuntimeError(f"{self.name}: {len(live)} items gave {len(results)} results")
        except BaseException as err:
            if len(live) == 1:
                live[0][1].set_exception(err)
                return
            for entry in live:  # one at a time: only the bad item's request fails
                self._run_batch([entry])
            return
        for (_, future), result in zip(live, results):
            future.set_result(result)
