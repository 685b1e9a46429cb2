"""The batcher alone: a fake model function on one worker thread, asyncio driven directly, no HTTP and no model.

Most tests hold the model on a first batch (`hold`), queue requests behind it, then release it, so that which
texts share a batch is decided by the limits alone and not by timing."""

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from app.batcher import Batcher
from app.errors import DeadlineExceeded, NotReady, Overloaded
from app.metrics import Metrics
from app.settings import BatchLimits

BLOCKER = [0]  # the row of the request that holds the model while the test queues others behind it
UNLIMITED = {"max_batch_size": 64, "max_batch_tokens": 10_000, "max_wait_ms": 0, "max_queue_texts": 64}


def score(row: list[int]) -> str:
    return f"scored {row}"


class FakeModel:
    """Scores each row as `score(row)` and records every batch it is given. While `release` is clear a batch waits
    for it (`running` says one has started); the batches numbered in `failing` raise instead of scoring."""

    def __init__(self, failing: tuple[int, ...] = ()):
        self.batches: list[list[list[int]]] = []
        self.running, self.release = threading.Event(), threading.Event()
        self.release.set()
        self.failing = failing

    def __call__(self, rows: list[list[int]], needs: list) -> list[str]:
        number = len(self.batches)
        self.batches.append(rows)
        self.running.set()
        assert self.release.wait(timeout=10), "the test never released the model"
        if number in self.failing:
            raise RuntimeError(f"batch {number} failed")
        return [score(row) for row in rows]


def run(model: FakeModel, test, **limits):
    """asyncio.run(test(batcher)) with a started batcher over `model` on one worker thread; stops it afterwards."""

    async def main():
        with ThreadPoolExecutor(max_workers=1) as executor:
            settings = {**UNLIMITED, "batching": True, "request_timeout_s": 10.0, **limits}
            batcher = Batcher(model, Metrics(), BatchLimits(**settings), executor)
            batcher.start()
            try:
                return await test(batcher)
            finally:
                model.release.set()
                await asyncio.wait_for(batcher.stop(), 10)

    return asyncio.run(main())


async def hold(batcher: Batcher, model: FakeModel, rows: list[list[int]] = (BLOCKER,)) -> asyncio.Task:
    """Submit `rows`; returns once their first batch holds the model, as it does until `model.release` is set."""
    model.release.clear()
    blocker = asyncio.create_task(batcher.submit(list(rows)))
    assert await asyncio.to_thread(model.running.wait, 10)
    return blocker


async def queue(batcher: Batcher, requests: list[list[list[int]]]) -> list[asyncio.Task]:
    """Submit `requests` in this order; returns once all their texts are on the queue."""
    depth = queue_depth(batcher)
    tasks = [asyncio.create_task(batcher.submit(rows)) for rows in requests]
    await asyncio.sleep(0)  # each task puts its texts on the queue in its first step, before the worker runs again
    assert queue_depth(batcher) == depth + sum(map(len, requests))
    return tasks


def run_queued_behind_the_model(model: FakeModel, requests: list[list[list[int]]], **limits) -> list:
    """The results of `requests`, queued in this order while the model is held on BLOCKER and then released, so
    that the limits alone decide which texts share a batch."""

    async def test(batcher):
        blocker = await hold(batcher, model)
        tasks = await queue(batcher, requests)
        model.release.set()
        return await asyncio.gather(blocker, *tasks)

    blocker, *results = run(model, test, **limits)
    assert blocker == [score(BLOCKER)]
    return results


def queue_depth(batcher: Batcher) -> float:
    return batcher.metrics.registry.get_sample_value("spamgpt_queue_depth")


def dropped(batcher: Batcher, reason: str) -> float | None:
    return batcher.metrics.registry.get_sample_value("spamgpt_dropped_texts_total", {"reason": reason})


def test_concurrent_requests_share_a_batch_and_each_gets_its_own_results_in_order():
    requests = [[[1], [2, 2], [3, 3, 3]], [[4, 4, 4, 4]], [[5, 5], [6]], [[7], [8, 8, 8], [9, 9], [10]]]
    model = FakeModel()
    results = run_queued_behind_the_model(model, requests)
    assert results == [[score(row) for row in rows] for rows in requests]
    assert model.batches == [[BLOCKER], [row for rows in requests for row in rows]]


def test_max_batch_size_splits_the_queue_and_a_split_request_is_reassembled():
    requests = [[[1], [2]], [[3], [4]], [[5], [6], [7]]]
    model = FakeModel()
    results = run_queued_behind_the_model(model, requests, max_batch_size=3)
    assert results == [[score(row) for row in rows] for rows in requests]
    assert model.batches == [[BLOCKER], [[1], [2], [3]], [[4], [5], [6]], [[7]]]


def test_max_batch_tokens_counts_rows_times_the_longest_and_an_over_budget_row_runs_alone():
    rows = [[1] * 2, [2] * 3, [3] * 4, [4] * 1, [5] * 5, [6] * 13, [7] * 1]
    model = FakeModel()
    results = run_queued_behind_the_model(model, [[row] for row in rows], max_batch_tokens=12)
    assert results == [[score(row)] for row in rows]
    # padded: 3 x 4 = 12 fits, 4 x 4 = 16 would not; 2 x 5 = 10, 3 x 13 would not; 13 alone is over the budget
    assert [[len(row) for row in batch] for batch in model.batches] == [[1], [2, 3, 4], [1, 5], [13], [1]]


def test_a_lone_text_leaves_after_max_wait():
    model = FakeModel()

    async def test(batcher):
        start = time.perf_counter()
        result = await batcher.submit([[1]])
        return result, time.perf_counter() - start

    result, seconds = run(model, test, max_wait_ms=100)
    assert result == [score([1])]
    assert model.batches == [[[1]]]
    # it waited max_wait, and then left alone: no other text came, the batcher was not stopping, and a text held
    # until the request's deadline would have been dropped unrun instead of scored
    assert seconds >= 0.1


def test_a_waiting_text_takes_the_texts_that_arrive_within_max_wait_and_leaves_once_the_batch_is_full():
    model = FakeModel()

    async def test(batcher):
        first = asyncio.create_task(batcher.submit([[1]]))
        await asyncio.sleep(0.05)
        ran_early = list(model.batches)
        later, last = await queue(batcher, [[[2], [3]], [[4]]])
        batch = await asyncio.wait_for(asyncio.gather(first, later), 5)  # not the 60 s max_wait
        await batcher.stop()
        return ran_early, batch, await last

    ran_early, batch, last = run(model, test, max_batch_size=3, max_wait_ms=60_000)
    assert ran_early == []  # the first text waited for company
    assert batch == [[score([1])], [score([2]), score([3])]]
    assert last == [score([4])]
    assert model.batches == [[[1], [2], [3]], [[4]]]  # [4] ran when stop() ended the wait


def test_a_batch_of_exactly_max_batch_size_texts_leaves_at_once():
    model = FakeModel()

    async def test(batcher):
        return await asyncio.wait_for(batcher.submit([[1], [2]]), 0.5)  # not the 60 s max_wait

    assert run(model, test, max_batch_size=2, max_wait_ms=60_000) == [score([1]), score([2])]
    assert model.batches == [[[1], [2]]]


@pytest.mark.parametrize(
    ("batching", "expected"),
    [
        pytest.param(True, [[BLOCKER], [[1], [2]], [[3], [4]], [[5], [6]], [[7]]], id="merged"),
        pytest.param(False, [[BLOCKER], [[1]], [[2], [3]], [[4], [5]], [[6]], [[7]]], id="one-request-per-batch"),
    ],
)
def test_batching_false_keeps_requests_in_batches_of_their_own(batching, expected):
    requests = [[[1]], [[2], [3]], [[4], [5], [6]], [[7]]]
    model = FakeModel()
    results = run_queued_behind_the_model(model, requests, batching=batching, max_batch_size=2)
    assert results == [[score(row) for row in rows] for rows in requests]
    assert model.batches == expected  # unmerged, max_batch_size still splits a request: [4], [5] | [6]


def test_a_full_queue_refuses_a_request_whole():
    model = FakeModel()

    async def test(batcher):
        blocker = await hold(batcher, model)
        queued = await queue(batcher, [[[1], [2]]])
        with pytest.raises(Overloaded, match=r"^queue full: 2 texts do not fit, 1 of 3 slots free$") as refused:
            await batcher.submit([[3], [4]])
        depth_after_refusal = queue_depth(batcher)
        fits = await queue(batcher, [[[5]]])
        model.release.set()
        return refused.value, depth_after_refusal, await asyncio.gather(blocker, *queued, *fits)

    refused, depth_after_refusal, results = run(model, test, max_queue_texts=3)
    assert refused.headers == {"Retry-After": "1"}
    assert depth_after_refusal == 2  # nothing of the refused request was queued
    assert results == [[score(BLOCKER)], [score([1]), score([2])], [score([5])]]
    assert model.batches == [[BLOCKER], [[1], [2], [5]]]


def test_texts_not_started_within_the_deadline_are_dropped_unrun():
    model = FakeModel()

    async def test(batcher):
        started = await hold(batcher, model, [[1], [2]])  # [1] holds the model; [2] waits behind it
        with pytest.raises(DeadlineExceeded) as late:
            await batcher.submit([[3], [4]])
        depth = queue_depth(batcher)
        model.release.set()
        return late.value, depth, await started, await batcher.submit([[5]]), dropped(batcher, "deadline")

    late, depth, started, after, n_dropped = run(model, test, max_batch_size=1, request_timeout_s=0.05)
    assert late.message == "none of the request's 2 texts started within 0.05 s; they were dropped unrun"
    assert depth == 1  # only [2]: the late request's texts left the queue
    assert started == [score([1]), score([2])]  # past its deadline too, but it had started: it runs to the end
    assert after == [score([5])]
    assert model.batches == [[[1]], [[2]], [[5]]]  # [3] and [4] never ran
    assert n_dropped == 2


def test_a_cancelled_caller_has_its_texts_taken_off_the_queue():
    model = FakeModel()

    async def test(batcher):
        blocker = await hold(batcher, model)
        [leaving] = await queue(batcher, [[[1], [2]]])
        staying = await queue(batcher, [[[3]]])
        leaving.cancel()
        with pytest.raises(asyncio.CancelledError):
            await leaving
        depth = queue_depth(batcher)
        model.release.set()
        return depth, await asyncio.gather(blocker, *staying), dropped(batcher, "cancelled")

    depth, results, n_dropped = run(model, test)
    assert depth == 1
    assert results == [[score(BLOCKER)], [score([3])]]
    assert model.batches == [[BLOCKER], [[3]]]  # [1] and [2] never ran
    assert n_dropped == 2


def test_a_failing_batch_fails_its_requests_only_and_the_batcher_keeps_serving():
    model = FakeModel(failing=(1,))

    async def test(batcher):
        blocker = await hold(batcher, model)
        tasks = await queue(batcher, [[[1]], [[2], [3]], [[4]]])
        model.release.set()
        results = await asyncio.gather(blocker, *tasks, return_exceptions=True)
        return results, await batcher.submit([[5]])

    (blocker, first, split, other), after = run(model, test, max_batch_size=2)
    assert isinstance(first, RuntimeError) and str(first) == "batch 1 failed"
    assert split is first  # [2] was in the failed batch: its request fails whole, and [3] is not run for it
    assert (blocker, other, after) == ([score(BLOCKER)], [score([4])], [score([5])])
    assert model.batches == [[BLOCKER], [[1], [2]], [[4]], [[5]]]


def test_stop_refuses_new_requests_and_drains_the_queued_ones():
    model = FakeModel()

    async def test(batcher):
        blocker = await hold(batcher, model)
        queued = await queue(batcher, [[[1]], [[2], [3]]])
        stopping = asyncio.create_task(batcher.stop())
        await asyncio.sleep(0)
        with pytest.raises(NotReady, match=r"^the server is shutting down$"):
            await batcher.submit([[4]])
        drained_early = stopping.done()
        model.release.set()
        results = await asyncio.gather(blocker, *queued)
        await stopping
        return drained_early, results

    drained_early, results = run(model, test)
    assert not drained_early, "stop returned while texts were still queued"
    assert results == [[score(BLOCKER)], [score([1])], [score([2]), score([3])]]
    assert model.batches == [[BLOCKER], [[1], [2], [3]]]


def test_stop_does_not_wait_for_a_batch_to_fill():
    model = FakeModel()

    async def test(batcher):
        [waiting] = await queue(batcher, [[[1]]])
        await asyncio.wait_for(batcher.stop(), 5)  # not the 60 s max_wait
        return await waiting

    assert run(model, test, max_wait_ms=60_000) == [score([1])]
    assert model.batches == [[[1]]]


@pytest.mark.parametrize("ends", ["cancelled", "deadline"])
def test_a_request_that_leaves_while_the_idle_batcher_waits_for_company_leaves_it_serving(ends):
    # the model is idle: the lone text waits up to max_wait for others, and its request leaves meanwhile (its
    # client disconnected, or its deadline came first), emptying the queue under the waiting worker
    model = FakeModel()

    async def test(batcher):
        leaving = asyncio.create_task(batcher.submit([[1]]))
        await asyncio.sleep(0.05)  # the worker is in its max_wait
        if ends == "cancelled":
            leaving.cancel()
        with pytest.raises(asyncio.CancelledError if ends == "cancelled" else DeadlineExceeded):
            await leaving
        await asyncio.sleep(0.3)  # past the wait the worker was in: it looks at the queue, empty now
        after = await asyncio.wait_for(batcher.submit([[2], [3]]), 5)
        return after, queue_depth(batcher), dropped(batcher, ends)

    # max_wait above the deadline (which Settings refuse) lets the deadline pass during the wait; the next request
    # fills a batch of max_batch_size 2, so it leaves at once, within its own deadline
    timeout = {"request_timeout_s": 0.1} if ends == "deadline" else {}
    after, depth, n_dropped = run(model, test, max_wait_ms=300, max_batch_size=2, **timeout)
    assert after == [score([2]), score([3])]
    assert model.batches == [[[2], [3]]]  # [1] never ran
    assert (depth, n_dropped) == (0, 1)


def test_a_withdrawn_head_leaves_the_texts_behind_it_to_run():
    model = FakeModel()

    async def test(batcher):
        leaving = asyncio.create_task(batcher.submit([[1]]))
        await asyncio.sleep(0.02)
        staying = asyncio.create_task(batcher.submit([[2]]))
        await asyncio.sleep(0.02)
        leaving.cancel()
        return await asyncio.wait_for(staying, 5)  # when the wait counted from [1]'s arrival ends

    assert run(model, test, max_wait_ms=200) == [score([2])]
    assert model.batches == [[[2]]]


def test_a_failed_worker_refuses_every_request_and_says_so():
    model = FakeModel()
    failures = []

    async def test(batcher):
        def broken():
            raise RuntimeError("broken")

        batcher.on_failure = failures.append
        batcher._fitting = broken  # a fault of the batcher's own code, not of a batch
        with pytest.raises(NotReady) as queued:
            await asyncio.wait_for(batcher.submit([[1]]), 5)  # at once, not at its deadline
        with pytest.raises(NotReady) as later:
            await batcher.submit([[2]])
        return queued.value, later.value, queue_depth(batcher)

    queued, later, depth = run(model, test)
    message = "the batcher stopped on an internal error (RuntimeError: broken)"
    assert queued.message == later.message == message
    assert [str(f) for f in failures] == ["broken"]
    assert depth == 0
    assert model.batches == []
