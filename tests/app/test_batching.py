"""Micro-batching through HTTP: own results in own order, batch-independent probabilities, backpressure,
readiness. Async tests drive the app in-process with httpx.ASGITransport and run its lifespan themselves."""

import asyncio
import json
import os
import random
import signal
import threading
import time
from contextlib import asynccontextmanager

import httpx
import pytest
import torch
from fastapi.testclient import TestClient
from torch.testing import assert_close

import training.runtime.classifier
from app.main import create_app
from tests.helpers import tiny_settings
from training.runtime.classifier import Classifier

WORDS = ["free", "prize", "win", "call", "now", "txt", "ok", "see", "you", "at", "the", "station", "love"]


@asynccontextmanager
async def serve(settings):
    async with serve_app(create_app(settings)) as client:
        yield client


@asynccontextmanager
async def serve_app(app):
    """A client for `app` in this process, with its lifespan running."""
    async with (
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client,
        app.router.lifespan_context(app),
    ):
        yield client


class BlockedEngine:
    """Classifier.predict_logits (the batcher's seam) held until released, recording every batch of token ids."""

    def __init__(self, monkeypatch):
        self.entered, self.release, self.batches = threading.Event(), threading.Event(), []
        predict = Classifier.predict_logits

        def blocked_predict(engine, rows):
            self.batches.append(rows)
            self.entered.set()
            assert self.release.wait(timeout=10), "test never released the engine"
            return predict(engine, rows)

        monkeypatch.setattr(Classifier, "predict_logits", blocked_predict)

    async def wait_entered(self):
        assert await asyncio.to_thread(self.entered.wait, 10)

    @property
    def batch_sizes(self) -> list[int]:
        return [len(rows) for rows in self.batches]


def sample(metrics: str, name: str) -> float:
    return float(next(line.split()[1] for line in metrics.splitlines() if line.startswith(f"{name} ")))


async def queue_depth(client) -> float:
    return sample((await client.get("/metrics")).text, "spamgpt_queue_depth")


async def until_queued(client, depth: int):
    for _ in range(500):
        if await queue_depth(client) == depth:
            return
        await asyncio.sleep(0.005)
    raise AssertionError(f"queue never reached {depth} texts")


def test_batched_results_equal_each_text_alone(tiny_checkpoint):
    rng = random.Random(0)
    sizes = [rng.randint(1, 4) for _ in range(24)]
    requests = [[" ".join(rng.choices(WORDS, k=rng.randint(1, 30))) for _ in range(n)] for n in sizes]
    settings = tiny_settings(tiny_checkpoint, max_wait_ms=20, max_batch_size=16)

    async def main():
        async with serve(settings) as client:
            responses = await asyncio.gather(*(client.post("/classify", json={"texts": t}) for t in requests))
            metrics = (await client.get("/metrics")).text
        return responses, metrics

    responses, metrics = asyncio.run(main())
    batches, n_texts = sample(metrics, "spamgpt_batch_size_count"), sum(map(len, requests))
    assert batches < n_texts, "no two texts shared a batch: the test would prove nothing"
    engine = Classifier.load(settings.checkpoint_dir, settings.classifier_options())
    for texts, response in zip(requests, responses, strict=True):
        assert response.status_code == 200, response.text
        results = response.json()["results"]
        assert len(results) == len(texts)
        rows, _ = engine.tokenize(texts)
        alone = torch.cat([engine.predict([row]) for row in rows])
        got = torch.tensor([[r["probabilities"][label] for label in engine.card.labels] for r in results])
        assert_close(got, alone, rtol=0, atol=1e-5)
        assert [r["tokens"] for r in results] == [len(row) for row in rows]


def test_the_model_runs_on_one_thread_from_warm_up_to_every_batch(tiny_checkpoint, monkeypatch):
    threads, predict = [], training.runtime.classifier.predict_logits

    def recording_predict(*args):
        threads.append(threading.current_thread().name)
        return predict(*args)

    monkeypatch.setattr(training.runtime.classifier, "predict_logits", recording_predict)
    settings = tiny_settings(tiny_checkpoint, max_batch_size=2, max_wait_ms=0)

    async def main():
        async with serve(settings) as client:
            texts = [[word] for word in WORDS]
            return await asyncio.gather(*(client.post("/classify", json={"texts": t}) for t in texts))

    assert all(r.status_code == 200 for r in asyncio.run(main()))
    assert len(threads) > 2  # the warm-up and several batches
    assert set(threads) == {threads[0]} and threads[0].startswith("spamgpt-model")


def test_full_queue_is_429_and_the_request_is_refused_whole(tiny_checkpoint, monkeypatch):
    engine = BlockedEngine(monkeypatch)
    settings = tiny_settings(tiny_checkpoint, max_queue_texts=2, max_batch_size=1, max_wait_ms=0)

    async def main():
        async with serve(settings) as client:
            try:
                in_flight = [asyncio.create_task(client.post("/classify", json={"texts": ["first"]}))]
                await engine.wait_entered()  # "first" left the queue and holds the model
                in_flight.append(asyncio.create_task(client.post("/classify", json={"texts": ["second"]})))
                await until_queued(client, 1)
                refused = await client.post("/classify", json={"texts": ["a", "b"]})  # 2 texts, 1 slot
                depth_after_refusal = await queue_depth(client)
                in_flight.append(asyncio.create_task(client.post("/classify", json={"texts": ["fits"]})))
                await until_queued(client, 2)
            finally:
                engine.release.set()
            return refused, depth_after_refusal, await asyncio.gather(*in_flight)

    refused, depth_after_refusal, served = asyncio.run(main())
    assert refused.status_code == 429
    assert refused.headers["Retry-After"] == "1"
    assert refused.json()["error"]["type"] == "overloaded"
    assert depth_after_refusal == 1  # nothing of the refused request was queued
    assert [r.status_code for r in served] == [200, 200, 200]


@pytest.mark.parametrize(
    ("batching", "expected_sizes"),
    [
        pytest.param(True, [1, 7], id="merged"),
        pytest.param(False, [1, 1, 2, 3, 1], id="one-request-per-batch"),
    ],
)
def test_batching_switch(tiny_checkpoint, monkeypatch, batching, expected_sizes):
    engine = BlockedEngine(monkeypatch)
    settings = tiny_settings(tiny_checkpoint, batching=batching, max_wait_ms=0)
    queued = [["a"], ["b", "c"], ["d", "e", "f"], ["g"]]

    async def main():
        async with serve(settings) as client:
            try:
                first = asyncio.create_task(client.post("/classify", json={"texts": ["first"]}))
                await engine.wait_entered()
                tasks = []
                for texts in queued:  # one at a time, so the queue holds them in this order
                    tasks.append(asyncio.create_task(client.post("/classify", json={"texts": texts})))
                    await until_queued(client, sum(map(len, queued[: len(tasks)])))
            finally:
                engine.release.set()
            return await asyncio.gather(first, *tasks)

    responses = asyncio.run(main())
    assert [r.status_code for r in responses] == [200] * 5
    assert [len(r.json()["results"]) for r in responses] == [1, 1, 2, 3, 1]
    assert engine.batch_sizes[1:] == expected_sizes[1:]  # the warm-up does not go through Classifier.predict_logits


def test_health_is_503_until_loaded_and_while_draining(tiny_checkpoint, monkeypatch):
    loaded = threading.Event()
    load = Classifier.load
    monkeypatch.setattr(Classifier, "load", classmethod(lambda cls, *args: loaded.wait(10) and load(*args)))
    app = create_app(tiny_settings(tiny_checkpoint))

    async def main():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            startup = app.router.lifespan_context(app)
            entering = asyncio.create_task(startup.__aenter__())
            await asyncio.sleep(0.05)  # the load now waits in its thread; the event loop is free
            loading = await client.get("/health")
            not_ready = await client.post("/classify", json={"texts": ["hi"]})
            loaded.set()
            await entering
            ready = await client.get("/health")
            await startup.__aexit__(None, None, None)
            draining = await client.get("/health")
        return loading, not_ready, ready, draining

    loading, not_ready, ready, draining = asyncio.run(main())
    assert (loading.status_code, loading.json()["status"]) == (503, "loading")
    assert (not_ready.status_code, not_ready.json()["error"]["type"]) == (503, "not_ready")
    assert (ready.status_code, ready.json()["status"]) == (200, "ok")
    assert (draining.status_code, draining.json()["status"]) == (503, "draining")


def test_health_reports_a_failed_load(tmp_path):
    async def main():
        app = create_app(tiny_settings(tmp_path / "missing"))
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            with pytest.raises(Exception, match="checkpoint directory not found"):
                async with app.router.lifespan_context(app):
                    pass
            return await client.get("/health")

    health = asyncio.run(main())
    assert health.status_code == 503
    assert health.json()["status"] == "failed"
    assert "CheckpointError" in health.json()["detail"]


def test_shutdown_refuses_new_requests_and_finishes_the_queued_ones(tiny_checkpoint, monkeypatch):
    engine = BlockedEngine(monkeypatch)
    app = create_app(tiny_settings(tiny_checkpoint, max_batch_size=1, max_wait_ms=0))

    async def main():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            lifespan = app.router.lifespan_context(app)
            await lifespan.__aenter__()
            try:
                running = asyncio.create_task(client.post("/classify", json={"texts": ["running"]}))
                await engine.wait_entered()
                queued = asyncio.create_task(client.post("/classify", json={"texts": ["queued"]}))
                await until_queued(client, 1)
                stopping = asyncio.create_task(lifespan.__aexit__(None, None, None))
                await asyncio.sleep(0.05)
                health = await client.get("/health")
                refused = await client.post("/classify", json={"texts": ["new"]})
                drained_early = stopping.done()
            finally:
                engine.release.set()
            served = await asyncio.gather(running, queued)
            await stopping
        return health, refused, drained_early, served

    health, refused, drained_early, served = asyncio.run(main())
    assert (health.status_code, health.json()["status"]) == (503, "draining")
    assert (refused.status_code, refused.json()["error"]["type"]) == (503, "not_ready")
    assert not drained_early, "shutdown finished while a request was still queued"
    assert [r.status_code for r in served] == [200, 200]
    assert engine.batch_sizes == [1, 1]


def test_shutdown_does_not_wait_for_a_batch_to_fill(tiny_checkpoint):
    app = create_app(tiny_settings(tiny_checkpoint, max_wait_ms=60_000, request_timeout_s=120))

    async def main():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            lifespan = app.router.lifespan_context(app)
            await lifespan.__aenter__()
            waiting = asyncio.create_task(client.post("/classify", json={"texts": ["waits for company"]}))
            await until_queued(client, 1)
            await asyncio.wait_for(lifespan.__aexit__(None, None, None), 5)  # not the 60 s max_wait
            return await waiting

    assert asyncio.run(main()).status_code == 200


def sigterm_during(app, *, signals: int):
    """Serve `app` in this process with a stand-in for the server's SIGTERM handler; send SIGTERM `signals` times,
    then probe /health and /classify, then wait for the stand-in to be called (and a moment more, for a second call
    to show). Returns the probes, the stand-in's calls (seconds after the first SIGTERM), how many it had received
    at the time of the probes, and the handler restored afterwards."""
    received = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: received.append(time.monotonic()))

    async def main():
        async with serve_app(app) as client:
            before = await client.get("/health")
            sent = time.monotonic()
            for _ in range(signals):
                os.kill(os.getpid(), signal.SIGTERM)
                await asyncio.sleep(0)  # Python runs signal handlers between bytecodes of the main thread
            after = await client.get("/health")
            served = await client.post("/classify", json={"texts": ["still served"]})
            at_probes = len(received)
            async with asyncio.timeout(30):  # it never came: fail, not hang
                while not received:
                    await asyncio.sleep(0.01)
            await asyncio.sleep(0.2)
        return before, after, served, [t - sent for t in received], at_probes

    try:
        return *asyncio.run(main()), signal.getsignal(signal.SIGTERM)
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_sigterm_turns_readiness_503_at_once_serves_through_the_drain_delay_then_reaches_the_servers_handler(
    tiny_checkpoint,
):
    app = create_app(tiny_settings(tiny_checkpoint, drain_delay_s=0.5))
    before, after, served, received, at_probes, restored = sigterm_during(app, signals=1)
    assert (before.status_code, after.status_code) == (200, 503)
    assert after.json()["status"] == "draining"
    assert served.status_code == 200, served.text  # still served during the delay
    assert at_probes == 0  # the server's handler (stop accepting) had not run yet
    assert len(received) == 1 and received[0] >= 0.5, received  # after the delay
    assert restored is not None and restored.__name__ == "<lambda>"  # the server's handler is back after shutdown


@pytest.mark.parametrize(
    ("delay_s", "signals"), [pytest.param(0, 1, id="no-delay"), pytest.param(60, 2, id="second-sigterm-ends-it")]
)
def test_sigterm_reaches_the_servers_handler_at_once_without_a_delay_or_when_sent_twice(
    tiny_checkpoint, delay_s, signals
):
    app = create_app(tiny_settings(tiny_checkpoint, drain_delay_s=delay_s))
    _, after, _, received, at_probes, _ = sigterm_during(app, signals=signals)
    assert after.json()["status"] == "draining"
    # at once: the server's handler had run before the next requests were answered (a delay would be 60 s)
    assert len(received) == 1 and at_probes == 1, received


def test_a_request_not_started_within_its_deadline_is_504_and_never_runs(tiny_checkpoint, monkeypatch, tokenizer):
    engine = BlockedEngine(monkeypatch)
    settings = tiny_settings(tiny_checkpoint, request_timeout_s=0.2, max_batch_size=1, max_wait_ms=0)

    async def main():
        async with serve(settings) as client:
            try:
                started = asyncio.create_task(client.post("/classify", json={"texts": ["first", "second"]}))
                await engine.wait_entered()  # "first" holds the model; "second" waits behind it
                late = await client.post("/classify", json={"texts": ["late text"]})
                depth = await queue_depth(client)
            finally:
                engine.release.set()
            started = await started
            after = await client.post("/classify", json={"texts": ["after"]})
            metrics = (await client.get("/metrics")).text
        return late, depth, started, after, metrics

    late, depth, started, after, metrics = asyncio.run(main())
    assert late.status_code == 504
    error = late.json()["error"]
    assert error["type"] == "deadline_exceeded"
    assert error["message"] == "none of the request's 1 texts started within 0.2 s; they were dropped unrun"
    assert depth == 1  # only "second": the late text left the queue
    assert [r.status_code for r in (started, after)] == [200, 200]  # started before its deadline: runs to the end
    assert len(started.json()["results"]) == 2
    assert engine.batches == [[tokenizer.encode_ordinary(t)] for t in ("first", "second", "after")]
    assert sample(metrics, 'spamgpt_dropped_texts_total{reason="deadline"}') == 1
    assert sample(metrics, 'spamgpt_requests_total{route="/classify",status="504"}') == 1


def test_a_client_that_disconnects_while_waiting_has_its_texts_dropped(tiny_checkpoint, monkeypatch, tokenizer):
    engine = BlockedEngine(monkeypatch)
    app = create_app(tiny_settings(tiny_checkpoint, max_batch_size=1, max_wait_ms=0))
    body = json.dumps({"texts": ["gone", "away"]}).encode()
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/classify",
        "raw_path": b"/classify",
        "query_string": b"",
        "root_path": "",
        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        "client": ("127.0.0.1", 50000),
        "server": ("test", 80),
    }

    async def main():
        hang_up, sent = asyncio.Event(), []
        messages = iter([{"type": "http.request", "body": body, "more_body": False}])

        async def receive():  # the body, then http.disconnect once the test hangs up
            message = next(messages, None)
            if message is None:
                await hang_up.wait()
                message = {"type": "http.disconnect"}
            return message

        async def send(message):
            sent.append(message)

        async with serve_app(app) as client:
            try:
                running = asyncio.create_task(client.post("/classify", json={"texts": ["running"]}))
                await engine.wait_entered()
                leaving = asyncio.create_task(app(scope, receive, send))
                await until_queued(client, 2)
                hang_up.set()
                await asyncio.wait_for(leaving, 5)
                depth = await queue_depth(client)
            finally:
                engine.release.set()
            running = await running
            after = await client.post("/classify", json={"texts": ["after"]})
            metrics = (await client.get("/metrics")).text
        return sent, depth, running, after, metrics

    sent, depth, running, after, metrics = asyncio.run(main())
    assert sent[0]["status"] == 499  # sent to no one; what the metrics count
    assert depth == 0
    assert [r.status_code for r in (running, after)] == [200, 200]
    assert engine.batches == [[tokenizer.encode_ordinary(t)] for t in ("running", "after")]
    assert sample(metrics, 'spamgpt_dropped_texts_total{reason="cancelled"}') == 2
    assert sample(metrics, 'spamgpt_requests_total{route="/classify",status="499"}') == 1


def test_a_failing_model_is_a_500_for_its_batch_only(tiny_checkpoint, monkeypatch):
    predict = Classifier.predict_logits
    failures = iter([True])

    def flaky_predict(engine, rows):
        if next(failures, False):
            raise RuntimeError("CUDA out of memory (simulated)")
        return predict(engine, rows)

    monkeypatch.setattr(Classifier, "predict_logits", flaky_predict)
    with TestClient(create_app(tiny_settings(tiny_checkpoint)), raise_server_exceptions=False) as client:
        failed = client.post("/classify", json={"texts": ["a"]})
        served = client.post("/classify", json={"texts": ["a"]})
        metrics = client.get("/metrics").text
    assert failed.status_code == 500
    assert failed.json()["error"]["type"] == "internal_error"
    assert "simulated" not in failed.text  # server internals stay in the log
    assert served.status_code == 200
    assert 'spamgpt_requests_total{route="/classify",status="500"} 1.0' in metrics


def test_a_failed_batcher_turns_readiness_503_and_refuses_requests_at_once(tiny_checkpoint):
    app = create_app(tiny_settings(tiny_checkpoint))

    async def main():
        async with serve_app(app) as client:
            batcher = app.state.service._batcher

            def broken():
                raise RuntimeError("broken")

            batcher._fitting = broken  # a fault of the batcher's own code: its worker ends
            refused = await asyncio.wait_for(client.post("/classify", json={"texts": ["hello"]}), 5)
            return refused, await client.get("/health"), await client.post("/classify", json={"texts": ["again"]})

    refused, health, again = asyncio.run(main())
    assert [r.status_code for r in (refused, health, again)] == [503, 503, 503]
    assert health.json() == {
        "status": "failed",
        "model": None,
        "detail": "the batcher stopped: RuntimeError: broken",
    }
    assert refused.json()["error"]["type"] == again.json()["error"]["type"] == "not_ready"
