"""The HTTP API: /classify, /health, /info, /metrics, and text-embeddings-inference's /predict with the Hugging
Face Inference API's root path. Each route declares the errors it can answer with.

`router` holds the routes every app shares; classify_router(settings) and tei_router(settings) the ones whose
request model carries the app's limits."""

import asyncio
import hmac
from collections.abc import Awaitable
from dataclasses import asdict
from typing import Annotated, TypeVar

import torch
from fastapi import APIRouter, Depends, Request, Response, Security
from fastapi.responses import JSONResponse
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.types import Receive

from app.errors import (
    ClientClosedRequest,
    DeadlineExceeded,
    ErrorDetail,
    InvalidInput,
    ModelError,
    NotReady,
    Overloaded,
    PayloadTooLarge,
    RequestTimeout,
    Unauthorized,
    error_responses,
)
from app.schemas import (
    ClassifyResponse,
    Health,
    Info,
    LabelScore,
    classify_request_model,
    hf_request_model,
    predict_request_model,
)
from app.service import Service
from app.settings import Settings
from training.runtime.inference import nonfinite_rows, probabilities

router = APIRouter()
bearer = HTTPBearer(auto_error=False, description="Authorization: Bearer <key>, when an API key is configured")
api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="The API key, when one is configured")
LIMITS = (
    "batching",
    "max_batch_size",
    "max_batch_tokens",
    "max_wait_ms",
    "max_queue_texts",
    "request_timeout_s",
    "max_texts_per_request",
    "max_text_chars",
    "max_body_bytes",
    # slow and stalled clients (issue 10 item 2)
    "request_arrival_timeout_s",
    "max_body_bytes_in_flight",
    "max_connections",
)


# Dependencies are `async def`: FastAPI runs plain `def` ones in a thread pool, a hop per call per request.
async def get_service(request: Request) -> Service:
    return request.app.state.service


ServiceDep = Annotated[Service, Depends(get_service)]


async def ready_service(service: ServiceDep) -> Service:
    # While draining, requests are still served (the drain delay after SIGTERM); the batcher refuses them once the
    # lifespan shutdown stops it.
    if service.status not in ("ok", "draining") or service.batcher is None:
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


# What every route that scores texts can answer besides 200 (all through score_texts)
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


def classify_router(settings: Settings) -> APIRouter:
    """/classify, whose request model carries this app's limits (app.schemas.classify_request_model)."""
    classify_request = classify_request_model(settings)
    routes = APIRouter()

    @routes.post(
        "/classify",
        response_model=ClassifyResponse,  # validates and serializes the plain dicts built below in one pass
        dependencies=[Depends(require_api_key)],
        responses=error_responses(*SCORING_ERRORS),
    )
    async def classify(body: classify_request, service: ReadyService, request: Request) -> dict:
        """Probabilities and a label for each text, in input order. Texts longer than the model's context are
        truncated and flagged."""
        return await classify_texts(body.texts, service, request)

    return routes


def text_paths(field: str, inputs: str | list[str]) -> list[str]:
    """Where each text sits in the request, as errors name it: `field` for one string, `field`.index in a list."""
    return [field] if isinstance(inputs, str) else [f"{field}.{i}" for i in range(len(inputs))]


async def score_texts(
    inputs: str | list[str], service: Service, request: Request, field: str = "texts", refuse_truncation: bool = False
) -> tuple[list[list[int]], list[bool], torch.Tensor]:
    """Validated `inputs` (one text or a list) -> each text's token ids, whether it was truncated, and
    (N, n_labels) float32 logits: the one path from a request's texts to the model, shared by /classify and the
    TEI-compatible routes.

    Errors name texts by their place in the request's `field` (text_paths). Raises InvalidInput naming each text
    over max_tokens when refuse_truncation (TEI's `truncate: false`); ModelError naming each text the model gave
    non-finite logits for; the batcher's Overloaded and DeadlineExceeded; ClientClosedRequest when the client
    leaves while waiting.
    """
    texts, paths = [inputs] if isinstance(inputs, str) else inputs, text_paths(field, inputs)
    # Tokenized here, once, in a thread (tiktoken releases the GIL): requests tokenize in parallel while the
    # model runs, and the batcher needs token counts to keep batches within max_batch_tokens.
    rows, truncated = await asyncio.to_thread(service.tokenize, texts)
    if refuse_truncation and any(truncated):
        limit = service.engine.card.max_tokens
        raise InvalidInput.of(
            [
                ErrorDetail(field=path, message=f"longer than max_tokens {limit}; send truncate: true")
                for path, cut in zip(paths, truncated, strict=True)
                if cut
            ]
        )
    logits = torch.stack(await unless_client_leaves(request.receive, service.batcher.submit(rows)))
    refuse_nonfinite(logits, service, paths)
    return rows, truncated, logits


async def classify_texts(texts: list[str], service: Service, request: Request) -> dict:
    """The /classify response for validated `texts`: tokenize, queue for the model, read out probabilities and
    labels (training.runtime.inference.Readout: labels never move with a deployment prior)."""
    rows, truncated, logits = await score_texts(texts, service, request)
    probs, labels = service.engine.readout.read(logits)
    card = service.engine.card
    results = [
        {"label": label, "probabilities": dict(zip(card.labels, p, strict=True)), "tokens": len(ids), "truncated": cut}
        for label, p, ids, cut in zip(labels, probs.tolist(), rows, truncated, strict=True)
    ]
    return {"model": service.model_name, "results": results}


def refuse_nonfinite(logits: torch.Tensor, service: Service, paths: list[str]) -> None:
    """Raises ModelError naming each text (by its path in the request, one per row) whose row of (N, n_labels)
    logits is not finite, and counts those texts in spamgpt_model_errors_total; the request's other texts are not
    answered either."""
    bad = nonfinite_rows(logits)
    if not bad:
        return
    service.metrics.model_errors.labels(cause="non_finite_logits").inc(len(bad))
    cause = "the model gave non-finite logits (NaN or inf): a fault of the model, not of the text"
    details = [ErrorDetail(field=paths[i], message=cause) for i in bad]
    raise ModelError(f"{', '.join(paths[i] for i in bad)}: {cause}", details)


# --- text-embeddings-inference and the Hugging Face Inference API ---------------------------------------


def tei_router(settings: Settings) -> APIRouter:
    """POST /predict in text-embeddings-inference's shapes, and POST / in the shape huggingface_hub's
    InferenceClient.text_classification speaks; both through score_texts, with /classify's limits, batching,
    errors and API key."""
    predict_request, hf_request = predict_request_model(settings), hf_request_model(settings)
    routes = APIRouter()
    errors = error_responses(*SCORING_ERRORS)

    @routes.post(
        "/predict",
        response_model=list[LabelScore] | list[list[LabelScore]],
        dependencies=[Depends(require_api_key)],
        responses=errors,
    )
    async def predict(body: predict_request, service: ReadyService, request: Request) -> list:
        """text-embeddings-inference's /predict: every label with its score, highest first; for one string a
        list of them, for a list of strings a list of such lists, in input order. Scores are probabilities, or
        the logits with raw_scores. A text over max_tokens is refused (422) unless truncate is true."""
        _, _, logits = await score_texts(body.inputs, service, request, "inputs", refuse_truncation=not body.truncate)
        logits = service.engine.readout.scores(logits)
        scores = logits if body.raw_scores else probabilities(logits)
        ranked = ranked_labels(scores, service.engine.card.labels)
        return ranked[0] if isinstance(body.inputs, str) else ranked

    @routes.post(
        "/",
        response_model=list[list[LabelScore]],
        dependencies=[Depends(require_api_key)],
        responses=errors,
    )
    async def inference_api(body: hf_request, service: ReadyService, request: Request) -> list:
        """The Hugging Face Inference API's text-classification shape, as huggingface_hub's InferenceClient
        posts it to a server's root: `{"inputs": text or texts, "parameters": {"top_k", "function_to_apply"}}`
        -> one list of `{label, score}` per text, highest first (a list holding one list for one string: the
        client reads the first list). Texts over max_tokens are truncated, as /classify does."""
        _, _, logits = await score_texts(body.inputs, service, request, "inputs")
        logits, parameters = service.engine.readout.scores(logits), body.parameters
        scores = {
            "softmax": probabilities,
            "sigmoid": torch.sigmoid,
            "none": lambda z: z,
        }[parameters.function_to_apply or "softmax"](logits)
        return ranked_labels(scores, service.engine.card.labels, parameters.top_k)

    return routes


def ranked_labels(scores: torch.Tensor, labels: tuple[str, ...], top_k: int | None = None) -> list[list[dict]]:
    """(N, n_labels) scores -> per row, `{"label", "score"}` for its top_k labels (None: all), highest first;
    equal scores keep the labels' order."""
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :top_k].tolist()
    return [
        [{"label": labels[j], "score": row[j]} for j in ranks]
        for ranks, row in zip(order, scores.tolist(), strict=True)
    ]


T = TypeVar("T")


async def unless_client_leaves(receive: Receive, waiting: Awaitable[T]) -> T:
    """What `waiting` gives, unless the client disconnects first: then `waiting` is cancelled, which takes the
    request's texts off the queue, and ClientClosedRequest is raised."""
    work, left = asyncio.ensure_future(waiting), asyncio.ensure_future(_disconnected(receive))
    try:
        await asyncio.wait((work, left), return_when=asyncio.FIRST_COMPLETED)
        if work.done():
            return work.result()
        work.cancel()
        await asyncio.wait((work,))  # let its cancellation take the texts off the queue before answering
        raise ClientClosedRequest("the client disconnected while its texts waited")
    finally:  # also when this handler is cancelled itself (uvicorn's graceful-shutdown timeout)
        left.cancel()
        work.cancel()  # does nothing once it is done


async def _disconnected(receive: Receive) -> None:
    # The body has been read: the server's next message is http.disconnect, when the client goes away
    while (await receive())["type"] != "http.disconnect":
        pass


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
        labels=list(card.labels),
        base_model=card.base_model,
        parameters=engine.parameter_count,
        max_tokens=card.max_tokens,
        threshold=card.threshold,
        prior=None if card.calibration is None else card.calibration.prior,
        calibration=None if card.calibration is None else asdict(card.calibration),
        metrics=card.metrics,
        created=card.created,
        version=card.version,
        device=str(engine.device),
        dtype=str(engine.dtype).removeprefix("torch."),
        quantization=engine.quantization,
        limits={name: getattr(service.settings, name) for name in LIMITS},
    )


@router.get("/metrics", response_class=Response, responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}})
async def metrics(service: ServiceDep) -> Response:
    """Prometheus text format. Open: no API key needed, so a scraper needs no secret."""
    return Response(service.metrics.render(), media_type=CONTENT_TYPE_LATEST)
