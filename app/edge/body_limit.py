"""Request bodies, bounded before anything parses them: pure ASGI, counting bytes as they arrive.

- 413 for a body over max_body_bytes;
- 429 at once for a request whose body would take the bytes of all bodies being received or served past
  max_body_bytes_in_flight, so many slow uploads cannot fill memory;
- 408 for a body that has not arrived whole by the request's arrival deadline (request_arrival_timeout_s from the
  request's first byte, as app.edge.protocol records it; from the moment the app is called under another server).
Each refusal closes the connection: the rest of the body is never read.
"""

import asyncio

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.errors import APIError, Overloaded, PayloadTooLarge, RequestTimeout

REQUEST_BEGAN = "spamgpt.request_began"  # scope["extensions"] key: event loop time of the request's first byte


class BodyBudget:
    """Body bytes held at once by all requests of one app: reserved before they are read, released when the
    request is done. Used on the event loop only, so a plain counter."""

    def __init__(self, limit_bytes: int):
        self.limit_bytes, self.held_bytes = limit_bytes, 0

    def take(self, n: int) -> bool:
        if self.held_bytes + n > self.limit_bytes:
            return False
        self.held_bytes += n
        return True

    def give_back(self, n: int) -> None:
        self.held_bytes -= n
        assert self.held_bytes >= 0, self.held_bytes


class BodySizeLimit:
    """Reads the body up to max_body_bytes, then replays it to the app. Content-Length is only a shortcut for
    refusing early: the bytes that actually arrive are counted, so a lying or absent (chunked) length cannot
    get more than the limit into memory, nor more than the shared budget across requests."""

    def __init__(self, app: ASGIApp, max_body_bytes: int, max_body_bytes_in_flight: int, arrival_timeout_s: float):
        self.app, self.max_body_bytes, self.arrival_timeout_s = app, max_body_bytes, arrival_timeout_s
        self.budget = BodyBudget(max_body_bytes_in_flight)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = _content_length(scope)
        if declared is not None and declared > self.max_body_bytes:
            return await self._refuse(self._too_large(f"Content-Length {declared} bytes"), scope, receive, send)
        loop = asyncio.get_running_loop()
        deadline = (scope.get("extensions") or {}).get(REQUEST_BEGAN, loop.time()) + self.arrival_timeout_s
        reserved = 0  # bytes of the budget this request holds: the declared length up front, else as they arrive
        try:
            if declared and not self.budget.take(declared):
                return await self._refuse(self._overloaded(declared), scope, receive, send)
            reserved = declared or 0
            body = bytearray()
            while True:
                try:
                    async with asyncio.timeout_at(deadline):
                        message = await receive()
                except TimeoutError:
                    error = RequestTimeout(
                        f"the request did not arrive whole within {self.arrival_timeout_s} s "
                        f"({len(body)} body bytes received)"
                    )
                    return await self._refuse(error, scope, receive, send)
                if message["type"] == "http.disconnect":
                    return  # the client left before sending its body: nobody to answer
                body += message.get("body", b"")
                if len(body) > self.max_body_bytes:
                    error = self._too_large(f"more than {self.max_body_bytes} bytes received")
                    return await self._refuse(error, scope, receive, send)
                if len(body) > reserved:  # no length given, or more bytes than it said
                    if not self.budget.take(len(body) - reserved):
                        return await self._refuse(self._overloaded(len(body) - reserved), scope, receive, send)
                    reserved = len(body)
                if not message.get("more_body", False):
                    break
            await self.app(scope, _replay(bytes(body), receive), send)
        finally:
            self.budget.give_back(reserved)

    def _too_large(self, what: str) -> PayloadTooLarge:
        return PayloadTooLarge(f"request body too large: {what}, the limit is {self.max_body_bytes} bytes")

    def _overloaded(self, need: int) -> Overloaded:
        free = self.budget.limit_bytes - self.budget.held_bytes
        return Overloaded(
            f"too many request bodies in flight: {need} more bytes do not fit, {free} of "
            f"{self.budget.limit_bytes} bytes free (max_body_bytes_in_flight)"
        )

    async def _refuse(self, error: APIError, scope: Scope, receive: Receive, send: Send) -> None:
        response = error.response()
        response.headers["Connection"] = "close"  # the rest of the body is never read
        await response(scope, receive, send)


def _replay(body: bytes, receive: Receive) -> Receive:
    replayed = False

    async def replay() -> Message:
        nonlocal replayed
        if replayed:
            return await receive()  # after the body: wait for the disconnect, as the server would
        replayed = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replay


def _content_length(scope: Scope) -> int | None:
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None  # the server rejects a malformed length; the byte count still applies
    return None
