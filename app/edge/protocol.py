"""uvicorn's httptools protocol with a deadline for each request to arrive whole.

uvicorn bounds nothing before a request's headers are complete: a client that opens a connection and sends
nothing, or sends its headers a byte every few seconds, holds a connection for as long as it likes. Here each
request has request_arrival_timeout_s from its first byte (a new connection's first request: from the connection)
to arrive whole. This class bounds the headers: past the deadline with headers incomplete, the connection gets 408
and is closed (closed without an answer if no byte came). The body has the same deadline, enforced by
app.edge.body_limit.BodySizeLimit, which reads the request's start from scope["extensions"] and answers 408 itself.

`python -m app` selects it (`--http app.edge.protocol:ArrivalDeadlineProtocol`); under plain `uvicorn`, or with
`--http h11`, only the body's deadline applies, counted from when the headers were complete.

The deadline is the app's own setting: uvicorn builds protocols per connection, apart from the app, but hands each
the server's lifespan state, where the app's lifespan (app.service.lifespan) puts the request_arrival_timeout_s of
the settings create_app was given, under ARRIVAL_TIMEOUT_STATE. Without it (a server that runs no lifespan) the
headers have no deadline, as under uvicorn's own protocol.
"""

import asyncio

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from app.edge.body_limit import REQUEST_BEGAN
from app.errors import ErrorInfo, ErrorResponse, RequestTimeout

ARRIVAL_TIMEOUT_STATE = "spamgpt.request_arrival_timeout_s"  # lifespan state key: seconds, > 0


def timeout_response(timeout_s: float) -> bytes:
    """A whole 408 response in the API's error shape, written straight to the socket."""
    error = RequestTimeout(f"the request headers did not arrive whole within {timeout_s} s")
    body = ErrorResponse(error=ErrorInfo(type=error.type, message=error.message)).model_dump_json().encode()
    head = (
        f"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
        "connection: close\r\n\r\n"
    )
    return head.encode() + body


class ArrivalDeadlineProtocol(HttpToolsProtocol):
    """uvicorn's HttpToolsProtocol, with each request's headers due within the lifespan state's
    ARRIVAL_TIMEOUT_STATE seconds from its first byte (a new connection's first request: from the connection)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.arrival_timeout_s: float | None = self.app_state.get(ARRIVAL_TIMEOUT_STATE)
        self.arrival: asyncio.TimerHandle | None = None  # armed from a request's first byte to its headers' end
        self.request_began: float | None = None  # event loop time; None between requests
        self.request_started = False  # a byte of the current request has arrived

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()  # a connection that never sends a whole request is closed too

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self.request_started = True
        if self.arrival is None:  # a later request on a kept-alive connection: its own deadline
            self._arm()
        self.scope["extensions"] = {REQUEST_BEGAN: self.request_began}

    def on_headers_complete(self) -> None:
        self._disarm()  # from here the body's deadline is BodySizeLimit's, from the same request_began
        self.request_started = False
        super().on_headers_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self.request_began = self.loop.time()
        if self.arrival_timeout_s is not None:
            self.arrival = self.loop.call_later(self.arrival_timeout_s, self._too_slow)

    def _disarm(self) -> None:
        if self.arrival is not None:
            self.arrival.cancel()
            self.arrival = None

    def _too_slow(self) -> None:
        self.arrival = None
        if self.transport.is_closing():
            return
        if self.request_started:  # part of a request came: tell the client why, as RFC 9110 section 15.5.9 allows
            self.transport.write(timeout_response(self.arrival_timeout_s))
        self.transport.close()
