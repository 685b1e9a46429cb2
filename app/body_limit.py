"""413 for a request body over the limit, before anything parses it: pure ASGI, counting bytes as they arrive."""

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.errors import PayloadTooLarge


class BodySizeLimit:
    """Reads the body up to max_body_bytes, then replays it to the app. Content-Length is only a shortcut for
    refusing early: the bytes that actually arrive are counted, so a lying or absent (chunked) length cannot
    get more than the limit into memory."""

    def __init__(self, app: ASGIApp, max_body_bytes: int):
        self.app, self.max_body_bytes = app, max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = _content_length(scope)
        if declared is not None and declared > self.max_body_bytes:
            return await self._refuse(f"Content-Length {declared} bytes", scope, receive, send)
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # the client left before sending its body: nobody to answer
            body += message.get("body", b"")
            if len(body) > self.max_body_bytes:
                return await self._refuse(f"more than {self.max_body_bytes} bytes received", scope, receive, send)
            if not message.get("more_body", False):
                break

        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()  # after the body: wait for the disconnect, as the server would
            replayed = True
            return {"type": "http.request", "body": bytes(body), "more_body": False}

        await self.app(scope, replay, send)

    async def _refuse(self, what: str, scope: Scope, receive: Receive, send: Send) -> None:
        error = PayloadTooLarge(f"request body too large: {what}, the limit is {self.max_body_bytes} bytes")
        response = error.response()
        response.headers["Connection"] = "close"  # the rest of the body is never read
        await response(scope, receive, send)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None  # the server rejects a malformed length; the byte count still applies
    return None
