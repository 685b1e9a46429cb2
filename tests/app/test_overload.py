"""A burst far past a small queue, against a real uvicorn: every request is answered 200 or 429, each 429 says
when to retry, and the server serves normally afterwards."""

import asyncio

import httpx

from tests.helpers import live_server

TEXTS = ["WINNER!! Claim your free prize now", "See you at 5?"]
BURST = 48


async def burst(url: str) -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=BURST)  # one connection each, so all arrive at once
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=30, trust_env=False) as client:
        return await asyncio.gather(*(client.post("/classify", json={"texts": TEXTS}) for _ in range(BURST)))


def test_a_burst_past_the_queue_gets_200_or_429_and_the_server_stays_healthy(tiny_checkpoint, tmp_path):
    # Room for two requests; each batch waits 200 ms for more texts (it cannot fill 64), so the rest of the
    # burst arrives while the queue is full.
    settings = {"max_queue_texts": 4, "max_batch_size": 64, "max_wait_ms": 200}
    with live_server(tiny_checkpoint, tmp_path / "server.log", **settings) as (url, server):
        responses = asyncio.run(burst(url))
        statuses = [r.status_code for r in responses]
        assert set(statuses) == {200, 429}, statuses
        refused = [r for r in responses if r.status_code == 429]
        assert all(int(r.headers["Retry-After"]) >= 1 for r in refused)
        assert {r.json()["error"]["type"] for r in refused} == {"overloaded"}
        assert all(len(r.json()["results"]) == len(TEXTS) for r in responses if r.status_code == 200)
        with httpx.Client(base_url=url, trust_env=False) as client:
            assert client.get("/health").status_code == 200
            assert client.post("/classify", json={"texts": TEXTS}).status_code == 200
            assert "spamgpt_queue_depth 0.0" in client.get("/metrics").text
    assert server.returncode == 0, (tmp_path / "server.log").read_text()
