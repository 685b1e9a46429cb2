"""Micro-batching: texts from concurrent requests share forward passes.

Requests put their already tokenized texts on one bounded queue; one worker task takes texts from its
head into batches bounded by max_batch_size, max_batch_tokens (padded) and max_wait, runs the model in
a thread, and hands each text's result back to its request at its own index. Each request waits on a
single future that resolves once all its texts are done, so results keep input order and no request
sees another's. Right padding means a text's probabilities do not depend on its batch-mates.
"""

import asyncio
import contextlib
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from app.errors import NotReady, Overloaded
from app.metrics import Metrics


@dataclass(eq=False, slots=True)
class _Request:
    future: asyncio.Future
    results: list
    remaining: int
    enqueued: float  # event loop time


@dataclass(slots=True)
class _Text:
    ids: list[int]
    request: _Request
    index: int


class Batcher:
    def __init__(
        self,
        run: Callable[[list[list[int]]], Sequence[Any]],
        metrics: Metrics,
        *,
        max_batch_size: int,
        max_batch_tokens: int,
        max_wait_ms: float,
        max_queue_texts: int,
        merge_requests: bool = True,
    ):
        self.run, self.metrics = run, metrics  # run: one batch of token ids -> one result per row, in a thread
        self.max_batch_size, self.max_batch_tokens = max_batch_size, max_batch_tokens
        self.max_wait_s, self.max_queue_texts = max_wait_ms / 1000, max_queue_texts
        self.merge_requests = merge_requests
        self._queue: deque[_Text] = deque()
        self._arrived = asyncio.Event()
        self._worker: asyncio.Task | None = None

    def start(self) -> None:
        self._worker = asyncio.get_running_loop().create_task(self._work(), name="spamgpt-batcher")

    async def stop(self) -> None:
        """Stop the worker; requests still queued get NotReady (a 503) rather than hanging."""
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
        _fail(self._queue, NotReady("the server is shutting down"))
        self._queue.clear()
        self.metrics.queue_depth.set(0)

    async def submit(self, rows: list[list[int]]) -> list:
        """Results for `rows` in their order. The request is queued whole or refused whole (Overloaded)."""
        free = self.max_queue_texts - len(self._queue)
        if len(rows) > free:
            raise Overloaded(f"queue full: {len(rows)} texts do not fit, {free} of {self.max_queue_texts} slots free")
        loop = asyncio.get_running_loop()
        request = _Request(loop.create_future(), [None] * len(rows), len(rows), loop.time())
        self._queue.extend(_Text(ids, request, i) for i, ids in enumerate(rows))
        self.metrics.queue_depth.set(len(self._queue))
        self._arrived.set()
        return await request.future

    async def _work(self) -> None:
        while True:
            batch = await self._next_batch()
            if batch:
                await self._run_batch(batch)

    async def _next_batch(self) -> list[_Text]:
        await self._until(lambda: bool(self._queue))
        if self.max_wait_s > 0 and self.merge_requests:
            # The wait counts from the oldest text's arrival: texts that queued up while the previous batch
            # ran have waited already, so under load batches leave at once and the model never idles.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout_at(self._queue[0].request.enqueued + self.max_wait_s):
                    await self._until(lambda: self._fitting()[1])
        n, _ = self._fitting()
        batch = [self._queue.popleft() for _ in range(n)]
        self.metrics.queue_depth.set(len(self._queue))
        return [t for t in batch if not t.request.future.done()]  # skip requests whose client went away

    async def _until(self, condition: Callable[[], bool]) -> None:
        while not condition():
            self._arrived.clear()
            await self._arrived.wait()

    def _fitting(self) -> tuple[int, bool]:
        """How many texts at the head of the queue form the next batch, and whether that batch is full."""
        longest = 0
        for n, text in enumerate(self._queue):
            if n == self.max_batch_size or (not self.merge_requests and text.request is not self._queue[0].request):
                return n, True
            longest = max(longest, len(text.ids))
            if n and (n + 1) * longest > self.max_batch_tokens:
                return n, True
        return len(self._queue), False

    async def _run_batch(self, batch: list[_Text]) -> None:
        now = asyncio.get_running_loop().time()
        for text in batch:
            self.metrics.queue_wait.observe(now - text.request.enqueued)
        self.metrics.batch_size.observe(len(batch))
        try:
            results = await asyncio.to_thread(self._timed_run, [t.ids for t in batch])
        except asyncio.CancelledError:  # stop() while this batch ran: its requests must not hang
            _fail(batch, NotReady("the server is shutting down"))
            raise
        except Exception as exc:  # the model failed (e.g. out of memory): fail this batch's requests, keep serving
            _fail(batch, exc)
            return
        for text, result in zip(batch, results, strict=True):
            request = text.request
            request.results[text.index] = result
            request.remaining -= 1
            if request.remaining == 0 and not request.future.done():
                request.future.set_result(request.results)

    def _timed_run(self, rows: list[list[int]]) -> Sequence[Any]:
        with self.metrics.inference.time():
            return self.run(rows)


def _fail(texts: Iterable[_Text], exc: Exception) -> None:
    for text in texts:
        if not text.request.future.done():
            text.request.future.set_exception(exc)
