"""Operations: GET /health for load balancers, /info for people and tools, /metrics for Prometheus."""

from fastapi import APIRouter, Depends, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST

from app.errors import NotReady, Unauthorized, error_responses
from app.routes.deps import ReadyService, ServiceDep, require_api_key
from app.schemas import Health, Info

router = APIRouter()


@router.get(
    "/health", response_model=Health, responses={503: {"model": Health, "description": "Loading, failed, or draining"}}
)
async def health(service: ServiceDep) -> Health | JSONResponse:
    """200 only once the model is loaded and a warm-up forward has passed. Open: no API key needed."""
    health = service.health()
    if health.status == "ok":
        return health
    return JSONResponse(health.model_dump(), status_code=503)


@router.get(
    "/info",
    dependencies=[Depends(require_api_key)],
    responses=error_responses(Unauthorized, NotReady),
)
async def info(service: ReadyService) -> Info:
    """The model card: labels, base model, size, max tokens, threshold, evaluation metrics, device, limits."""
    return service.info()


@router.get("/metrics", response_class=Response, responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}})
async def metrics(service: ServiceDep) -> Response:
    """Prometheus text format. Open: no API key needed, so a scraper needs no secret."""
    return Response(service.metrics.render(), media_type=CONTENT_TYPE_LATEST)
