"""The app factory: `uvicorn app.main:create_app --factory`. Settings come from SPAMGPT_* unless given."""

from fastapi import FastAPI

from app.body_limit import BodySizeLimit
from app.errors import install_error_handlers
from app.metrics import RequestCounter
from app.routes import router
from app.schemas import declare_text_limits
from app.service import Service, lifespan
from app.settings import Settings


def create_app(settings: Settings | None = None) -> FastAPI:
    app = FastAPI(title="spamgpt", summary="GPT-2 spam classifier", lifespan=lifespan)
    app.state.service = service = Service(settings or Settings())
    install_error_handlers(app)
    app.add_middleware(BodySizeLimit, max_body_bytes=service.settings.max_body_bytes)
    paths = frozenset(route.path for route in router.routes)
    app.add_middleware(RequestCounter, metrics=service.metrics, paths=paths)  # outermost: counts the 413s too
    app.include_router(router)

    def openapi() -> dict:  # FastAPI's documented hook for extending the generated schema; cached after the first
        if app.openapi_schema is None:
            app.openapi_schema = declare_text_limits(FastAPI.openapi(app), service.settings)
        return app.openapi_schema

    app.openapi = openapi
    return app
