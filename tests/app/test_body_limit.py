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
