"""Stalled and slow clients against a real `python -m app`: each request must arrive whole within
request_arrival_timeout_s, bodies in flight share one budget, and open connections are bounded."""

import json
import socket
import threading
import time

import httpx

from tests.helpers import live_server

ARRIVAL_S = 1.0
WAIT_S = 30  # how long a read waits for the server: far past every deadline these tests expect, so never reached
HEAD = b"POST /classify HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"


def connect(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=WAIT_S)
    return sock


def read_until_closed(sock: socket.socket) -> tuple[bytes, float]:
    """Everything the server sends until it closes the connection, and when it closed (time.monotonic()); then
    our end is closed too."""
    data = b""
    with sock:
        while chunk := sock.recv(65536):
            data += chunk
    return data, time.monotonic()


def status_and_error(response: bytes) -> tuple[int, dict | None]:
    head, _, body = response.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return status, json.loads(body)["error"] if body.startswith(b"{") else None


def test_stalled_requests_get_408_and_idle_connections_are_closed_at_the_arrival_deadline(tiny_checkpoint, tmp_path):
    """Without the arrival deadline, (a) and (b) would stay open for minutes, (c) forever."""
    with live_server(tiny_checkpoint, tmp_path / "server.log", request_arrival_timeout_s=ARRIVAL_S) as (url, _):
        start = time.monotonic()  # a new connection's deadline counts from the connection
        partial_body, trickled_headers, idle = connect(url), connect(url), connect(url)
        partial_body.sendall(HEAD + b"Content-Length: 100\r\n\r\n" + b'{"texts": ["' + b"x" * 8)  # (a) 20 of 100 bytes
        stop, trickled = threading.Event(), []

        def trickle():  # (b) request headers a byte at a time, every 0.2 s: 13.6 s for all of them
            for byte in HEAD:
                if stop.wait(0.2):
                    return
                try:
                    trickled_headers.send(bytes([byte]))
                except OSError:
                    return
                trickled.append(byte)

        dripper = threading.Thread(target=trickle)
        dripper.start()
        try:
            (a, a_closed), (b, b_closed), (c, c_closed) = map(read_until_closed, (partial_body, trickled_headers, idle))
            sent_before_408 = len(trickled)
        finally:
            stop.set()
            dripper.join()
        with httpx.Client(trust_env=False) as http:
            assert http.get(f"{url}/health").status_code == 200  # still serving
    a_status, a_error = status_and_error(a)
    assert (a_status, a_error["type"]) == (408, "request_timeout")
    assert a_error["message"] == f"the request did not arrive whole within {ARRIVAL_S} s (20 body bytes received)"
    b_status, b_error = status_and_error(b)
    assert (b_status, b_error["type"]) == (408, "request_timeout")
    assert b_error["message"] == f"the request headers did not arrive whole within {ARRIVAL_S} s"
    assert c == b""  # nothing was asked: closed without an answer
    # closed at the deadline, not when the headers were done, and not at the read timeout (a timeout would raise)
    assert sent_before_408 < len(HEAD)
    for closed in (a_closed, b_closed, c_closed):
        assert closed - start >= ARRIVAL_S


def test_bodies_past_the_in_flight_budget_are_refused_at_once_and_connections_are_bounded(tiny_checkpoint, tmp_path):
    limits = dict(max_body_bytes=1000, max_body_bytes_in_flight=2000, max_connections=8, request_arrival_timeout_s=30)
    with live_server(tiny_checkpoint, tmp_path / "server.log", **limits) as (url, _):
        holding = [connect(url) for _ in range(2)]
        for sock in holding:  # (c) just under max_body_bytes declared, a few bytes sent, then nothing
            sock.sendall(HEAD + b"Content-Length: 999\r\n\r\n" + b'{"texts"')
        time.sleep(0.5)
        refused = connect(url)
        refused.sendall(HEAD + b"Content-Length: 999\r\n\r\n")
        status, error = status_and_error(read_until_closed(refused)[0])
        # refused at once: a body left waiting would have met its own arrival deadline, 30 s on, with a 408
        assert (status, error["type"]) == (429, "overloaded")
        assert "too many request bodies in flight: 999 more bytes do not fit, 2 of 2000 bytes free" in error["message"]
        # uvicorn's --limit-concurrency, from max_connections: with 8 connections open, a new request gets 503
        idle = [connect(url) for _ in range(6)]
        probe = connect(url)
        probe.sendall(b"GET /health HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
        assert read_until_closed(probe)[0].startswith(b"HTTP/1.1 503 ")
        for sock in [*holding, *idle]:
            sock.close()
        time.sleep(0.5)
        with httpx.Client(trust_env=False) as http:
            assert http.get(f"{url}/health").status_code == 200
