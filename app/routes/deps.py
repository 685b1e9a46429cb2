"""What the routes depend on: the app's service, its readiness, and the API key when one is configured."""

import hmac
from typing import Annotated

from fastapi import Depends, Request, Security
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from app.errors import (
    DeadlineExceeded,
    InvalidInput,
    ModelError,
    NotReady,
    Overloaded,
    PayloadTooLarge,
    RequestTimeout,
    Unauthorized,
)
from app.service import Service
from app.settings import Settings

bearer = HTTPBearer(auto_error=False, description="Authorization: Bearer <key>, when an API key is configured")
api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="The API key, when one is configured")

# What every route that scores texts can answer besides 200 (all through one Service call)
SCORING_ERRORS = (
    Unauthorized,
    RequestTimeout,
    PayloadTooLarge,
    InvalidInput,
    Overloaded,
    NotReady,
    DeadlineExceeded,
    ModelError,
)


# Dependencies are `async def`: FastAPI runs plain `def` ones in a thread pool, a hop per call per request.
async def get_service(request: Request) -> Service:
    """The app's Service (app.state.service, set by app.main.create_app)."""
    return request.app.state.service


ServiceDep = Annotated[Service, Depends(get_service)]


async def ready_service(service: ServiceDep) -> Service:
    """The service, once its model can answer; raises NotReady (503) otherwise (Service.require_ready)."""
    service.require_ready()
    return service


ReadyService = Annotated[Service, Depends(ready_service)]


async def require_api_key(
    request: Request,
    service: ServiceDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Security(bearer)],
    key: Annotated[str | None, Security(api_key_header)],
) -> None:
    """Open when no key is configured; /health and /metrics never depend on this. Raises Unauthorized (401) for a
    key that is missing or wrong, or an Authorization header that is not a Bearer credential."""
    expected = service.settings.api_key
    if expected is None:
        return
    if credentials is None and "Authorization" in request.headers:
        # HTTPBearer reads any other scheme as no header: a malformed credential must not fall through to X-API-Key
        raise Unauthorized("Authorization header is not 'Bearer <key>'")
    given = credentials.credentials if credentials is not None else key
    if given is None:
        raise Unauthorized("API key missing: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'")
    if not hmac.compare_digest(given.encode(), expected.get_secret_value().encode()):
        raise Unauthorized("API key wrong")


def api_key_dependencies(settings: Settings) -> list:
    """A scoring route's dependencies: require_api_key where `settings` configure an API key, none otherwise. An
    open server then neither resolves it on every request (FastAPI's dependency resolution is a large share of the
    event loop's work for a one-text request) nor declares credentials in its OpenAPI document."""
    return [Depends(require_api_key)] if settings.api_key is not None else []
