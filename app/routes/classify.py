"""POST /classify: probabilities and a label for each text, in the API's own shape."""

from fastapi import APIRouter, Request

from app.errors import error_responses
from app.routes.deps import SCORING_ERRORS, ReadyService, api_key_dependencies
from app.schemas import ClassifyResponse, classify_request_model
from app.settings import Settings


def classify_router(settings: Settings) -> APIRouter:
    """/classify, whose request model carries this app's limits (app.schemas.classify_request_model)."""
    classify_request = classify_request_model(settings)
    routes = APIRouter()

    @routes.post(
        "/classify",
        response_model=ClassifyResponse,  # validates and serializes the service's plain dicts in one pass
        dependencies=api_key_dependencies(settings),
        responses=error_responses(*SCORING_ERRORS),
    )
    async def classify(body: classify_request, service: ReadyService, request: Request) -> dict:
        """Probabilities and a label for each text, in input order. Texts longer than the model's context are
        truncated and flagged."""
        return await service.classify(body.texts, request.receive)

    return routes
