"""Micro-batching: texts from concurrent requests share forward passes.

Requests put their already tokenized texts on one bounded queue; one worker task takes texts from its
head into batches bounded by max_batch_size, max_batch_tokens (padded) and max_wait, runs the model in
a thread, and hands each text's result back to its request at its own index. Each text carries what it
needs of the model (with several models served: which of them answer it, app.models); texts whose needs
are of one group (models on one base) may share a batch, and a batch takes the head of the queue and the
texts behind it of the head's group, leaving the others in their place. Each request waits on a
single future that resolves once all its texts are done, so results keep input order and no request
sees another's. Right padding means a text's probabilities do not depend on its batch-mates.

A request whose texts have not started running within its deadline, or whose caller stops waiting (the
client left), has its texts taken off the queue: nothing runs for a request nobody will read.

Should the worker itself ever fail (a fault of this code, not of a batch: a batch's failure fails its requests
only), the failure is logged, the queued requests and every later one are refused with NotReady, and `on_failure`
is told, so that readiness turns 503 rather than every request waiting for its deadline.
"""

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Callable, Hashable, Iterable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any

from app.errors import DeadlineExceeded, NotReady, Overloaded
from app.metrics import Metrics
from app.settings import BatchLimits

LOG = logging.getLogger("uvicorn.error")


@dataclass(eq=False, slots=True)
class _Request:
    future: asyncio.Future
    results: list
    remaining: int
    enqueued: float  # event loop time
    started: bool = False  # one of its texts has left the queue for a batch: the deadline no longer applies


@dataclass(slots=True)
class _Text:
    ids: list[int]
    request: _Request
    index: int
    need: Any  # what the text asks of the model, handed to `run` beside its ids
    group: Hashable  # texts of one group may share a batch


class Batcher:
    """Texts from concurrent requests, queued and run in batches within `limits`.

    run: one batch of token ids and each row's need (what submit was given) -> one result per row, called on
    `executor`'s threads. group: a need -> its group; texts of one group may share a batch. on_failure: called with
    the exception should the worker fail.
    """

    def __init__(
        self,
        run: Callable[[list[list[int]], list[Any]], Sequence[Any]],
        metrics: Metrics,
        limits: BatchLimits,
        executor: Executor,
        group: Callable[[Any], Hashable] = lambda need: None,
        on_failure: Callable[[BaseException], None] = lambda exc: None,
    ):
        self.run, self.metrics, self.executor, self.group = run, metrics, executor, group
        self.on_failure = on_failure
        self.max_batch_size, self.max_batch_tokens = limits.max_batch_size, limits.max_batch_tokens
        self.max_wait_s, self.max_queue_texts = limits.max_wait_ms / 1000, limits.max_queue_texts
        self.timeout_s, self.merge_requests = limits.request_timeout_s, limits.batching
        self._queue: deque[_Text] = deque()
        self._arrived = asyncio.Event()
        self._worker: asyncio.Task | None = None
        self._stopping = False
        self.failure: BaseException | None = None  # what ended the worker, if anything did

    def start(self) -> None:
        self._worker = asyncio.get_running_loop().create_task(self._work(), name="spamgpt-batcher")
        self._worker.add_done_callback(self._ended)

    def _ended(self, worker: asyncio.Task) -> None:
        """The worker's end: after stop(), nothing to do; otherwise it failed, and serving cannot go on."""
        if worker.cancelled() or worker.exception() is None:
            return
        self.failure = worker.exception()
        LOG.error("the batcher stopped on an internal error; no request can be served", exc_info=self.failure)
        _fail(self._queue, NotReady(self._failed()))
        self._queue.clear()
        self.metrics.queue_depth.set(0)
        self.on_failure(self.failure)

    def _failed(self) -> str:
        return f"the batcher stopped on an internal error ({type(self.failure).__name__}: {self.failure})"

    async def stop(self) -> None:
        """Refuse new requests (NotReady), run the queued ones to the end, then end the worker. The drain is
        bounded: a queued request either starts running or leaves the queue at its deadline."""
        self._stopping = True
        self._arrived.set()
        if self._worker is not None:
            await asyncio.wait([self._worker])  # a failure of the worker was logged when it ended (_ended)

    async def submit(self, rows: list[list[int]], needs: Sequence[Any] | None = None) -> list:
        """Results for `rows` in their order; needs: each row's need (None: None for every row). The request is
        queued whole or refused whole (Overloaded); its texts leave the queue unrun if none has started within
        timeout_s (DeadlineExceeded) or if the caller is cancelled."""
        if self._stopping:
            raise NotReady("the server is shutting down")
        if self.failure is not None:
            raise NotReady(self._failed())
        free = self.max_queue_texts - len(self._queue)
        if len(rows) > free:
            raise Overloaded(f"queue full: {len(rows)} texts do not fit, {free} of {self.max_queue_texts} slots free")
        loop = asyncio.get_running_loop()
        request = _Request(loop.create_future(), [None] * len(rows), len(rows), loop.time())
        needs = [None] * len(rows) if needs is None else needs
        texts = enumerate(zip(rows, needs, strict=True))
        self._queue.extend(_Text(ids, request, i, need, self.group(need)) for i, (ids, need) in texts)
        self.metrics.queue_depth.set(len(self._queue))
        self._arrived.set()
        try:
            return await self._result(request)
        except asyncio.CancelledError:  # the caller stopped waiting (its client left): run nothing more for it
            self._withdraw(request, "cancelled")
            raise

    async def _result(self, request: _Request) -> list:
        await asyncio.wait([request.future], timeout=self.timeout_s)  # unlike wait_for, never cancels the future
        if not request.future.done() and not request.started:
            self._withdraw(request, "deadline")
            raise DeadlineExceeded(
                f"none of the request's {len(request.results)} texts started within {self.timeout_s} s; "
                "they were dropped unrun"
            )
        return await request.future  # a request that has started runs to the end

    def _withdraw(self, request: _Request, reason: str) -> None:
        """Take the request's texts off the queue, so they never run, and stop anything from answering it."""
        queued = len(self._queue)
        self._queue = deque(t for t in self._queue if t.request is not request)
        self.metrics.dropped_texts.labels(reason=reason).inc(queued - len(self._queue))
        self.metrics.queue_depth.set(len(self._queue))
        request.future.cancel()
        self._arrived.set()  # the queue changed: the worker looks at it again

    async def _work(self) -> None:
        while self._queue or not self._stopping:
            batch = await self._next_batch()
            if batch:
                await self._run_batch(batch)

    async def _next_batch(self) -> list[_Text]:
        while True:
            await self._until(lambda: bool(self._queue) or self._stopping)
            if not self._queue:
                return []
            deadline = self._queue[0].request.enqueued + self.max_wait_s
            if self.merge_requests and asyncio.get_running_loop().time() < deadline:
                # The wait counts from the oldest text's arrival: texts that queued up while the previous batch
                # ran have waited already, so under load batches leave at once, before the previous batch's
                # answers are sent, and the model never idles. Once stopping, nothing more will arrive: batches
                # leave at once. A request withdrawn meanwhile (its caller left, or its deadline passed) may empty
                # the queue: then the wait starts again from the next arrival.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout_at(deadline):
                        await self._until(lambda: self._stopping or not self._queue or self._fitting()[1])
            if self._queue:
                break
        batch, _ = self._fitting()
        if batch[-1] is self._queue[len(batch) - 1]:  # the head's texts in a row: the common case
            for _ in batch:
                self._queue.popleft()
        else:
            taken = {id(text) for text in batch}
            self._queue = deque(t for t in self._queue if id(t) not in taken)
        self.metrics.queue_depth.set(len(self._queue))
        for text in batch:
            text.request.started = True
        return [t for t in batch if not t.request.future.done()]  # skip requests an earlier batch's failure ended

    async def _until(self, condition: Callable[[], bool]) -> None:
        while not condition():
            self._arrived.clear()
            await self._arrived.wait()

    def _fitting(self) -> tuple[list[_Text], bool]:
        """The texts that form the next batch: the head of the queue and those behind it that may share its batch
        (its group; with batching off, its request too), in queue order within the limits; and whether the batch
        is full."""
        head, batch, longest = self._queue[0], [], 0
        for text in self._queue:
            if text.group != head.group or (not self.merge_requests and text.request is not head.request):
                continue
            if len(batch) == self.max_batch_size:
                return batch, True
            longest = max(longest, len(text.ids))
            if batch and (len(batch) + 1) * longest > self.max_batch_tokens:
                return batch, True
            batch.append(text)
        return batch, len(batch) == self.max_batch_size  # exactly full: nothing more would fit

    async def _run_batch(self, batch: list[_Text]) -> None:
        now = asyncio.get_running_loop().time()
        for text in batch:
            self.metrics.queue_wait.observe(now - text.request.enqueued)
        self.metrics.batch_size.observe(len(batch))
        try:
            rows, needs = [t.ids for t in batch], [t.need for t in batch]
            results = await asyncio.get_running_loop().run_in_executor(self.executor, self._timed_run, rows, needs)
        except Exception as exc:  # the model failed (e.g. out of memory): fail this batch's requests, keep serving
            _fail(batch, exc)
            return
        for text, result in zip(batch, results, strict=True):
            request = text.request
            request.results[text.index] = result
            request.remaining -= 1
            if request.remaining == 0 and not request.future.done():
                request.future.set_result(request.results)

    def _timed_run(self, rows: list[list[int]], needs: list[Any]) -> Sequence[Any]:
        with self.metrics.inference.time():
            return self.run(rows, needs)


def _fail(texts: Iterable[_Text], exc: Exception) -> None:
    for text in texts:
        if not text.request.future.done():
            text.request.future.set_exception(exc)
