"""Requests counted by path and status as they leave the app: the outermost count, so refusals that the body limit
answers before any route (413, 408, 429) are counted too."""

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.metrics import Metrics


class RequestCounter:
    """Pure ASGI middleware counting requests by path and status. Paths outside `paths` count as "other", so
    label values stay bounded whatever clients send. It sits outside the body limit, so 413s count too."""

    def __init__(self, app: ASGIApp, metrics: Metrics, paths: frozenset[str]):
        self.app, self.metrics, self.paths = app, metrics, paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = 0

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        except Exception:
            status = status or 500  # what ServerErrorMiddleware, outside this one, answers
            raise
        finally:
            # 499, nginx's "client closed request": the app returned without answering because the client left
            # a route with a parameter (/models/{name}/predict) counts under its template, as routing matched it
            path = scope["route"].path if "route" in scope else scope["path"]
            route = path if path in self.paths else "other"
            self.metrics.requests.labels(route=route, status=str(status or 499)).inc()
