"""The HTTP API: /classify, /health, /info, /metrics. Each route declares the errors it can answer with."""

import asyncio
import hmac
from typing import Annotated

from fastapi import APIRouter, Depends, Request, Response, Security
from fastapi.responses import JSONResponse
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST

from app.errors import InvalidInput, NotReady, Overloaded, PayloadTooLarge, Unauthorized, error_responses
from app.schemas import ClassifyRequest, ClassifyResponse, Health, Info, check_texts
from app.service import Service

router = APIRouter()
bearer = HTTPBearer(auto_error=False, description="Authorization: Bearer <key>, when an API key is configured")
api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="The API key, when one is configured")
LIMITS = (
    "batching",
    "max_batch_size",
    "max_batch_tokens",
    "max_wait_ms",
    "max_queue_texts",
    "max_texts_per_request",
    "max_text_chars",
    "max_body_bytes",
)


# Dependencies are `async def`: FastAPI runs plain `def` ones in a thread pool, a hop per call per request.
async def get_service(request: Request) -> Service:
    return request.app.state.service


ServiceDep = Annotated[Service, Depends(get_service)]


async def ready_service(service: ServiceDep) -> Service:
    if service.status != "ok":
        raise NotReady(f"model not ready ({service.status}): {service.detail}")
    return service


ReadyService = Annotated[Service, Depends(ready_service)]


async def require_api_key(
    request: Request,
    service: ServiceDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Security(bearer)],
    key: Annotated[str | None, Security(api_key_header)],
) -> None:
    """Open when no key is configured; /health and /metrics never depend on this."""
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


@router.post(
    "/classify",
    response_model=ClassifyResponse,  # validates and serializes the plain dicts built below in one pass
    dependencies=[Depends(require_api_key)],
    responses=error_responses(Unauthorized, PayloadTooLarge, InvalidInput, Overloaded, NotReady),
)
async def classify(body: ClassifyRequest, service: ReadyService) -> dict:
    """Probabilities and a label for each text, in input order. Texts longer than the model's context are
    truncated and flagged."""
    check_texts(body.texts, service.settings)
    # Tokenized here, once, in a thread (tiktoken releases the GIL): requests tokenize in parallel while the
    # model runs, and the batcher needs token counts to keep batches within max_batch_tokens.
    rows, truncated = await asyncio.to_thread(service.tokenize, body.texts)
    scored = await service.batcher.submit(rows)
    labels = service.engine.labels
    results = [
        {"label": label, "probabilities": dict(zip(labels, probs, strict=True)), "tokens": len(ids), "truncated": cut}
        for (label, probs), ids, cut in zip(scored, rows, truncated, strict=True)
    ]
    return {"model": service.model_name, "results": results}


@router.get(
    "/health", response_model=Health, responses={503: {"model": Health, "description": "Loading, failed, or draining"}}
)
async def health(service: ServiceDep) -> Health | JSONResponse:
    """200 only once the model is loaded and a warm-up forward has passed. Open: no API key needed."""
    if service.status == "ok":
        return Health(status="ok", model=service.model_name)
    return JSONResponse(Health(status=service.status, detail=service.detail).model_dump(), status_code=503)


@router.get(
    "/info",
    dependencies=[Depends(require_api_key)],
    responses=error_responses(Unauthorized, NotReady),
)
async def info(service: ReadyService) -> Info:
    """The model card: labels, base model, size, max tokens, threshold, evaluation metrics, device, limits."""
    engine, card = service.engine, service.engine.card
    return Info(
        model=service.model_name,
        labels=engine.labels,
        base_model=str(card["base_model"]),
        parameters=engine.parameters,
        max_tokens=engine.max_tokens,
        threshold=engine.threshold,
        metrics=card["metrics"],
        created=card["created"],
        version=card["version"],
        device=str(engine.device),
        dtype=str(engine.dtype).removeprefix("torch."),
        quantization=engine.quantization,
        limits={name: getattr(service.settings, name) for name in LIMITS},
    )


@router.get("/metrics", response_class=Response, responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}})
async def metrics(service: ServiceDep) -> Response:
    """Prometheus text format. Open: no API key needed, so a scraper needs no secret."""
    return Response(service.metrics.render(), media_type=CONTENT_TYPE_LATEST)
