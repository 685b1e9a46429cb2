"""POST /classify: probabilities and a label for each text, in the API's own shape."""

from fastapi import APIRouter, Depends, Request

from app.errors import UnknownModel, error_responses
from app.routes.deps import SCORING_ERRORS, ReadyService, require_api_key
from app.schemas import ClassifyManyResponse, ClassifyResponse, classify_request_model
from app.settings import Settings


def classify_router(settings: Settings) -> APIRouter:
    """/classify, whose request model carries this app's limits (app.schemas.classify_request_model)."""
    classify_request = classify_request_model(settings)
    routes = APIRouter()

    @routes.post(
        "/classify",
        # validates and serializes the service's plain dicts in one pass
        response_model=ClassifyResponse | ClassifyManyResponse,
        dependencies=[Depends(require_api_key)],
        responses=error_responses(*SCORING_ERRORS, UnknownModel),
    )
    async def classify(body: classify_request, service: ReadyService, request: Request) -> dict:
        """Probabilities and a label for each text, in input order, from `model` (unset: the default model), or
        from each of `models`. Texts longer than the model's context are truncated and flagged."""
        request.state.model = ",".join(body.models) if body.models else body.model or service.model_name
        return await service.classify(body.texts, request.receive, body.model, body.models)

    return routes
