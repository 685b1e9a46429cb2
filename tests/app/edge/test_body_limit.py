"""413 before parsing: by declared length, by bytes counted as they arrive, with or without Content-Length."""

import asyncio
import itertools
import json

import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from tests.helpers import tiny_settings

LIMIT = 100


@pytest.fixture
def limited_client(tiny_checkpoint):
    with TestClient(create_app(tiny_settings(tiny_checkpoint, max_body_bytes=LIMIT))) as client:
        yield client


def assert_413(status: int, body: dict) -> None:
    assert status == 413
    assert body["error"]["type"] == "payload_too_large"
    assert f"the limit is {LIMIT} bytes" in body["error"]["message"]


def test_declared_length_over_the_limit_is_refused_unparsed(limited_client):
    response = limited_client.post("/classify", content=b"{not json" + b" " * LIMIT)  # 422 if it were parsed
    assert_413(response.status_code, response.json())
    assert "Content-Length 109" in response.json()["error"]["message"]


def test_a_body_at_the_limit_passes(limited_client):
    body = b'{"texts": ["' + b"a" * (LIMIT - 15) + b'"]}'
    assert len(body) == LIMIT
    assert (
        limited_client.post("/classify", content=body, headers={"Content-Type": "application/json"}).status_code == 200
    )


def test_chunked_body_without_length_is_counted(limited_client):
    def chunks():
        yield b'{"texts": ["'
        for _ in range(10):
            yield b"a" * 20
        yield b'"]}'

    response = limited_client.post("/classify", content=chunks(), headers={"Content-Type": "application/json"})
    assert_413(response.status_code, response.json())


def call_raw(app, headers: list[tuple[bytes, bytes]], chunk: bytes) -> tuple[int, bytes, int]:
    """Send an endless body in `chunk`s straight through ASGI; return status, body and chunks read."""
    reads = itertools.count()
    sent = []

    async def receive():
        next(reads)
        return {"type": "http.request", "body": chunk, "more_body": True}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/classify", "headers": headers, "query_string": b""}
    asyncio.run(app(scope, receive, send))
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return sent[0]["status"], body, next(reads)


@pytest.mark.parametrize(
    "headers",
    [
        pytest.param([(b"content-length", b"10")], id="length-lies"),
        pytest.param([], id="no-length"),
        pytest.param([(b"content-length", b"ten")], id="malformed-length"),
    ],
)
def test_reading_stops_at_the_limit_whatever_the_headers_say(tiny_checkpoint, headers):
    # The limit sits in front of everything: no lifespan, no model needed.
    app = create_app(tiny_settings(tiny_checkpoint, max_body_bytes=LIMIT))
    status, body, reads = call_raw(app, [(b"content-type", b"application/json"), *headers], b"x" * 30)
    assert_413(status, json.loads(body))
    assert reads == 4  # 120 bytes: the first read past the limit is the last


# --- Slow and stalled clients ---------------------------------------------------------------------------------


async def stalled_receive():
    """A client that sent its headers and then nothing: the server's receive never returns a message."""
    await asyncio.Event().wait()


async def call_stalled(app, headers, receive=stalled_receive) -> tuple[int, dict, dict]:
    sent = []

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/classify", "headers": headers, "query_string": b""}
    await app(scope, receive, send)
    start = sent[0]
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], dict(start["headers"]), json.loads(body)


def test_a_body_that_stops_arriving_is_408_at_the_arrival_deadline_and_the_connection_closes(tiny_checkpoint):
    """Unbounded, a POST declaring Content-Length 100 that sends 20 bytes holds its connection for minutes."""
    app = create_app(tiny_settings(tiny_checkpoint, request_arrival_timeout_s=0.3))
    sent_20 = iter([{"type": "http.request", "body": b"x" * 20, "more_body": True}])

    async def receive():
        return next(sent_20, None) or await stalled_receive()

    async def main():
        loop = asyncio.get_running_loop()
        start = loop.time()
        result = await asyncio.wait_for(call_stalled(app, [(b"content-length", b"100")], receive), 30)  # not forever
        return result, loop.time() - start

    (status, headers, body), took = asyncio.run(main())
    assert (status, body["error"]["type"]) == (408, "request_timeout")
    assert body["error"]["message"] == "the request did not arrive whole within 0.3 s (20 body bytes received)"
    assert headers[b"connection"] == b"close"
    assert took >= 0.3


def test_the_arrival_deadline_counts_from_the_requests_first_byte_when_the_server_gives_it(tiny_checkpoint):
    """app.edge.protocol puts the request's first byte's time in scope["extensions"]: headers and body share one
    deadline."""
    app = create_app(tiny_settings(tiny_checkpoint, request_arrival_timeout_s=60))

    async def main():
        loop = asyncio.get_running_loop()
        extensions = {"spamgpt.request_began": loop.time() - 60}  # the headers took the whole allowance already
        sent = []

        async def send(message):
            sent.append(message)

        scope = {"type": "http", "method": "POST", "path": "/classify", "headers": [], "query_string": b""}
        # within half of what counting from here would take: the deadline has passed already
        await asyncio.wait_for(app({**scope, "extensions": extensions}, stalled_receive, send), 30)
        return sent[0]["status"]

    assert asyncio.run(main()) == 408


def test_bodies_in_flight_share_one_budget_and_a_request_past_it_is_429_at_once(tiny_checkpoint):
    """Unbounded, 50 connections each sending just under max_body_bytes and stopping hold ~230 MB until they leave."""
    settings = tiny_settings(
        tiny_checkpoint, max_body_bytes=LIMIT, max_body_bytes_in_flight=2 * LIMIT, request_arrival_timeout_s=60
    )
    app = create_app(settings)

    async def main():
        length = [(b"content-length", str(LIMIT).encode())]
        stalled = [asyncio.create_task(call_stalled(app, length)) for _ in range(2)]  # hold the whole budget
        await asyncio.sleep(0.05)
        refused = await asyncio.wait_for(call_stalled(app, [(b"content-length", b"1")]), 1)
        chunked = await asyncio.wait_for(call_stalled(app, [], receive=one_byte_then_stall()), 1)
        for task in stalled:
            task.cancel()
        await asyncio.gather(*stalled, return_exceptions=True)
        whole = iter([{"type": "http.request", "body": b"x" * LIMIT, "more_body": False}])

        async def receive_whole():
            return next(whole, None) or await stalled_receive()

        after = await asyncio.wait_for(call_stalled(app, length, receive=receive_whole), 5)
        return refused, chunked, after

    def one_byte_then_stall():
        chunks = iter([{"type": "http.request", "body": b"x", "more_body": True}])

        async def receive():
            return next(chunks, None) or await stalled_receive()

        return receive

    (status, headers, body), (chunked_status, _, _), after = asyncio.run(main())
    assert (status, body["error"]["type"], headers[b"connection"]) == (429, "overloaded", b"close")
    assert body["error"]["message"] == (
        f"too many request bodies in flight: 1 more bytes do not fit, 0 of {2 * LIMIT} bytes free "
        "(max_body_bytes_in_flight)"
    )
    assert chunked_status == 429  # no Content-Length: counted as the bytes arrive
    # the stalled requests gave their share back when they ended: a whole body of the limit's size is admitted
    assert after[0] == 503, after  # past the body limits, to the route (no lifespan here: not ready)


def test_max_body_bytes_in_flight_must_admit_one_body_of_the_allowed_size(tiny_checkpoint):
    with pytest.raises(ValueError, match=r"max_body_bytes_in_flight \(99\) must be at least max_body_bytes \(100\)"):
        tiny_settings(tiny_checkpoint, max_body_bytes=100, max_body_bytes_in_flight=99)
