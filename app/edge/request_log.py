"""Request ids and one JSON object per log line, for cluster log collectors (SPAMGPT_LOG_FORMAT=json).

Every response carries `X-Request-ID`: the client's own, when it sent a usable one, or a new one. With JSON logs,
uvicorn's lines and ours go out as one JSON object a line (python-json-logger's formatter), and each request's
line (method, path, status, duration) carries its id; uvicorn's own access line, which has no id, is turned off.
"""

import logging
import re
import sys
import time
import uuid

from pythonjsonlogger.json import JsonFormatter
from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

HEADER = "x-request-id"
# An id we pass on as it came: visible ASCII without spaces or quotes, short enough for any log line.
USABLE_ID = re.compile(r"[A-Za-z0-9._:/+=@-]{1,128}")
ACCESS_LOGGER = "spamgpt.access"
JSON_FIELDS = "{asctime}{levelname}{name}{message}"  # plus any `extra` fields of the record


class RequestId:
    """Pure ASGI middleware: the request's id into scope["state"]["request_id"] and the response's X-Request-ID,
    and, when the access logger logs, one line per request with the id, method, path, status and milliseconds."""

    def __init__(self, app: ASGIApp):
        self.app = app
        self.log = logging.getLogger(ACCESS_LOGGER)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        request_id = request_id_of(scope)
        scope.setdefault("state", {})["request_id"] = request_id
        start, status = time.perf_counter(), 0

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                MutableHeaders(scope=message)[HEADER] = request_id
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            if self.log.isEnabledFor(logging.INFO):
                extra = {
                    "request_id": request_id,
                    "method": scope["method"],
                    "path": scope["path"],
                    "status": status or 499,  # nginx's "client closed request", as RequestCounter counts it
                    "duration_ms": round(1000 * (time.perf_counter() - start), 3),
                }
                if "model" in scope["state"]:  # set by the routes that score texts: the model or models asked
                    extra["model"] = scope["state"]["model"]
                self.log.info("%s %s %s", scope["method"], scope["path"], status or 499, extra=extra)


def request_id_of(scope: Scope) -> str:
    """The client's X-Request-ID when it is usable (USABLE_ID), else a new random one (uuid4, 32 hex digits)."""
    for name, value in scope["headers"]:
        if name == HEADER.encode():
            given = value.decode("latin-1")
            if USABLE_ID.fullmatch(given):
                return given
            break
    return uuid.uuid4().hex


def use_json_logs() -> None:
    """uvicorn's loggers and ours write one JSON object a line (uvicorn's to their own streams, the request lines
    to stdout, where uvicorn writes its access lines); uvicorn's access line (no request id) gives way to
    RequestId's. Changes process-wide logging: the server calls it once, at startup."""
    formatter = JsonFormatter(JSON_FIELDS, style="{", rename_fields={"levelname": "level", "asctime": "time"})
    for name in ("uvicorn", "uvicorn.error"):
        for handler in logging.getLogger(name).handlers:
            handler.setFormatter(formatter)
    logging.getLogger("uvicorn.access").disabled = True
    access = logging.getLogger(ACCESS_LOGGER)
    if not access.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(formatter)
        access.addHandler(handler)
    access.setLevel(logging.INFO)
    access.propagate = False
