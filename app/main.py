"""The app factory: `uvicorn app.main:create_app --factory`. Settings come from SPAMGPT_* unless given."""

from fastapi import FastAPI
from fastapi_offline import FastAPIOffline

from app.edge.body_limit import BodySizeLimit
from app.edge.request_count import RequestCounter
from app.edge.request_log import RequestId, use_json_logs
from app.errors import install_error_handlers
from app.routes import admin, ops
from app.routes.classify import classify_router
from app.routes.feedback import feedback_router
from app.routes.tei import tei_router
from app.service import Service, lifespan
from app.settings import Settings


def create_app(settings: Settings | None = None) -> FastAPI:
    """The app on `settings` (None: read from SPAMGPT_* variables): routes, error handlers and the edge middleware;
    the model loads in its lifespan."""
    # /docs (Swagger UI) and /redoc load their scripts, styles and icon from this app (fastapi-offline's copies,
    # under /static-offline-docs), not from a CDN: the pages work with no network
    app = FastAPIOffline(title="spamgpt", summary="GPT-2 spam classifier", lifespan=lifespan)
    app.state.service = service = Service(settings or Settings())
    install_error_handlers(app)
    s = service.settings
    app.add_middleware(
        BodySizeLimit,
        max_body_bytes=s.max_body_bytes,
        max_body_bytes_in_flight=s.max_body_bytes_in_flight,
        arrival_timeout_s=s.request_arrival_timeout_s,
    )
    routers = (ops.router, classify_router(s), tei_router(s), feedback_router(s), admin.router)
    for api in routers:
        app.include_router(api)
    paths = frozenset(route.path for api in routers for route in api.routes)  # the API's, not /docs' own
    app.add_middleware(RequestCounter, metrics=service.metrics, paths=paths)  # counts the 413s too
    app.add_middleware(RequestId)  # outermost: every response gets an id, and the request's log line its status
    if s.log_format == "json":
        use_json_logs()
    return app
