"""Micro-batching through HTTP: own results in own order, batch-independent probabilities, backpressure,
readiness. Async tests drive the app in-process with httpx.ASGITransport and run its lifespan themselves."""

import asyncio
import random
import threading
from contextlib import asynccontextmanager

import httpx
import pytest
import torch
from fastapi.testclient import TestClient
from torch.testing import assert_close

from app.engine import Engine
from app.main import create_app
from tests.app.helpers import tiny_settings

WORDS = ["free", "prize", "win", "call", "now", "txt", "ok", "see", "you", "at", "the", "station", "love"]


@asynccontextmanager
async def serve(settings, lifespan: bool = True):
    app = create_app(settings)
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")
    async with client:
        if not lifespan:
            yield client
            return
        async with app.router.lifespan_context(app):
            yield client


class BlockedEngine:
    """Engine.score held until released, recording the size of every batch it was given."""

    def __init__(self, monkeypatch):
        self.entered, self.release, self.batch_sizes = threading.Event(), threading.Event(), []
        score = Engine.score

        def blocked_score(engine, rows):
            self.batch_sizes.append(len(rows))
            self.entered.set()
            assert self.release.wait(timeout=10), "test never released the engine"
            return score(engine, rows)

        monkeypatch.setattr(Engine, "score", blocked_score)

    async def wait_entered(self):
        assert await asyncio.to_thread(self.entered.wait, 10)


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
    engine = Engine.load(settings)
    for texts, response in zip(requests, responses, strict=True):
        assert response.status_code == 200, response.text
        results = response.json()["results"]
        assert len(results) == len(texts)
        rows, _ = engine.tokenize(texts)
        alone = torch.cat([engine.predict([row]) for row in rows])
        got = torch.tensor([[r["probabilities"][label] for label in engine.labels] for r in results])
        assert_close(got, alone, rtol=0, atol=1e-5)
        assert [r["tokens"] for r in results] == [len(row) for row in rows]


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
    assert engine.batch_sizes[1:] == expected_sizes[1:]  # the warm-up does not go through score


def test_health_is_503_until_loaded_and_while_draining(tiny_checkpoint, monkeypatch):
    loaded = threading.Event()
    load = Engine.load
    monkeypatch.setattr(Engine, "load", classmethod(lambda cls, s: loaded.wait(10) and load(s)))
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


def test_shutdown_answers_waiting_requests_with_503(tiny_checkpoint, monkeypatch):
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
                await lifespan.__aexit__(None, None, None)
            finally:
                engine.release.set()
            return await asyncio.gather(running, queued)

    for response in asyncio.run(main()):
        assert response.status_code == 503
        error = response.json()["error"]
        assert (error["type"], error["message"]) == ("not_ready", "the server is shutting down")


def test_a_failing_model_is_a_500_for_its_batch_only(tiny_checkpoint, monkeypatch):
    score = Engine.score
    failures = iter([True])

    def flaky_score(engine, rows):
        if next(failures, False):
            raise RuntimeError("CUDA out of memory (simulated)")
        return score(engine, rows)

    monkeypatch.setattr(Engine, "score", flaky_score)
    with TestClient(create_app(tiny_settings(tiny_checkpoint)), raise_server_exceptions=False) as client:
        failed = client.post("/classify", json={"texts": ["a"]})
        served = client.post("/classify", json={"texts": ["a"]})
        metrics = client.get("/metrics").text
    assert failed.status_code == 500
    assert failed.json()["error"]["type"] == "internal_error"
    assert "simulated" not in failed.text  # server internals stay in the log
    assert served.status_code == 200
    assert 'spamgpt_requests_total{route="/classify",status="500"} 1.0' in metrics
