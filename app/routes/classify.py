"""POST /classify: probabilities and a label for each text or raw e-mail message, in the API's own shape."""

from fastapi import APIRouter, Request
from fastapi.routing import APIRoute
from starlette.routing import Match
from starlette.types import Scope

from app.errors import PayloadTooLarge, UnknownModel, error_responses
from app.routes.deps import SCORING_ERRORS, ReadyService, api_key_dependencies
from app.schemas import ClassifyManyResponse, ClassifyResponse, classify_request_model
from app.settings import Settings

MESSAGE_TYPE = "message/rfc822"  # RFC 2046 5.2.1: one whole message as the body


class MessageBodyRoute(APIRoute):
    """A route that matches only a request whose Content-Type is message/rfc822 (parameters ignored), so that
    /classify reads such a body as one raw message and every other body as JSON."""

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        match, child = super().matches(scope)
        if match is Match.FULL and content_type(scope) != MESSAGE_TYPE:
            return Match.NONE, {}
        return match, child


def content_type(scope: Scope) -> str | None:
    """The request's media type, lowercased, without parameters."""
    for name, value in scope.get("headers", ()):
        if name == b"content-type":
            return value.decode("latin-1").split(";", 1)[0].strip().lower()
    return None


def classify_router(settings: Settings) -> APIRouter:
    """/classify, whose request model carries this app's limits (app.schemas.classify_request_model); a
    message/rfc822 body goes to its own route, declared in the JSON route's OpenAPI operation."""
    classify_request = classify_request_model(settings)
    routes = APIRouter()
    errors = error_responses(*SCORING_ERRORS, UnknownModel)

    async def classify_message(service: ReadyService, request: Request) -> dict:
        body = await request.body()
        if len(body) > settings.max_message_bytes:
            raise PayloadTooLarge(f"body: message of {len(body)} bytes, at most {settings.max_message_bytes} bytes")
        return await service.classify_messages([body], request.receive, "body")

    # first: the JSON route would otherwise take every body
    routes.add_api_route(
        "/classify",
        classify_message,
        methods=["POST"],
        response_model=ClassifyResponse,
        response_model_exclude_unset=True,  # `mail` only in a message's result
        dependencies=api_key_dependencies(settings),
        include_in_schema=False,  # declared in the JSON route's operation, the same path and method
        route_class_override=MessageBodyRoute,
    )

    @routes.post(
        "/classify",
        # validates and serializes the service's plain dicts in one pass
        response_model=ClassifyResponse | ClassifyManyResponse,
        response_model_exclude_unset=True,  # `mail` only in a message's result
        dependencies=api_key_dependencies(settings),
        responses=errors,
        openapi_extra={
            "requestBody": {
                "content": {
                    MESSAGE_TYPE: {
                        "schema": {
                            "type": "string",
                            "format": "binary",
                            "description": "One raw message (RFC 5322), at most max_message_bytes bytes",
                        }
                    }
                }
            }
        },
    )
    async def classify(body: classify_request, service: ReadyService, request: Request) -> dict:
        """Probabilities and a label for each text, or each raw e-mail message, in input order, from `model`
        (unset: the default model), or from each of `models` (texts only). Texts longer than the model's context
        are truncated and flagged; messages are read in windows (docs/mail.md). A body of Content-Type
        message/rfc822 is one raw message, answered by the default model as `{"messages": [it]}` would be."""
        request.state.model = ",".join(body.models) if body.models else body.model or service.model_name
        if body.messages is not None:
            return await service.classify_messages(body.messages, request.receive, model=body.model)
        return await service.classify(body.texts, request.receive, body.model, body.models)

    return routes
