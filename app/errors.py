"""One error shape for every failure, from a small set of exception types, each mapped to one status code here."""

from typing import ClassVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException

from app.schemas import UNION_TAGS


class ErrorDetail(BaseModel):
    field: str  # dotted path into the request, e.g. "texts.2"; "body" for the request as a whole
    message: str


class ErrorInfo(BaseModel):
    type: str
    message: str
    details: list[ErrorDetail] = []


class ErrorResponse(BaseModel):
    error: ErrorInfo


class APIError(Exception):
    status_code: ClassVar[int]
    type: ClassVar[str]
    description: ClassVar[str]  # what the status means here, for the OpenAPI docs

    def __init__(self, message: str, details: list[ErrorDetail] = (), headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message, self.details, self.headers = message, list(details), headers

    def response(self) -> JSONResponse:
        body = ErrorResponse(error=ErrorInfo(type=self.type, message=self.message, details=self.details))
        return JSONResponse(body.model_dump(), status_code=self.status_code, headers=self.headers)


class InvalidInput(APIError):
    status_code, type = 422, "invalid_request"
    description = "The request is malformed: the message and details name each bad field and index"

    @classmethod
    def of(cls, details: list[ErrorDetail]) -> "InvalidInput":
        return cls("; ".join(f"{d.field}: {d.message}" for d in details), details)


class PayloadTooLarge(APIError):
    status_code, type = 413, "payload_too_large"
    description = "The body is over max_body_bytes (counted as it arrives, before parsing)"


class RequestTimeout(APIError):
    status_code, type = 408, "request_timeout"
    description = (
        "The request (headers and body) did not arrive whole within request_arrival_timeout_s of its first byte; "
        "the connection is closed"
    )


class Unauthorized(APIError):
    status_code, type = 401, "unauthorized"
    description = "An API key is configured and the request's is missing or wrong"

    def __init__(self, message: str):
        super().__init__(message, headers={"WWW-Authenticate": "Bearer"})


class FeedbackDisabled(APIError):
    status_code, type = 403, "feedback_disabled"
    description = "This server takes no feedback: SPAMGPT_FEEDBACK_ENABLED is not true"


class FeedbackNotStored(APIError):
    status_code, type = 503, "feedback_not_stored"
    description = "The feedback database refused the write (disk full, read-only, damaged): nothing was recorded"


class AdminDisabled(APIError):
    status_code, type = 403, "admin_disabled"
    description = "The admin API loads checkpoints from the server's disk: it is off until an API key is configured"


class UnknownModel(APIError):
    status_code, type = 404, "unknown_model"
    description = "No model of that name is served; the message lists the names there are"


class ModelConflict(APIError):
    status_code, type = 409, "model_conflict"
    description = "The change would leave requests without a model: the default model cannot be removed"


class CheckpointRefused(APIError):
    status_code, type = 422, "checkpoint_refused"
    description = "The checkpoint failed its checks or its warm-up; the model it would replace keeps serving"


class Overloaded(APIError):
    status_code, type = 429, "overloaded"
    description = "The queue cannot take the request's texts now; retry after Retry-After seconds"

    def __init__(self, message: str, retry_after_s: int = 1):
        super().__init__(message, headers={"Retry-After": str(retry_after_s)})


class NotReady(APIError):
    status_code, type = 503, "not_ready"
    description = "The model is loading, failed to load, or the server is shutting down"


class DeadlineExceeded(APIError):
    status_code, type = 504, "deadline_exceeded"
    description = "No text of the request started running within request_timeout_s; they were dropped unrun"


class ClientClosedRequest(APIError):
    """The client disconnected while its texts waited: nobody reads this answer, but the request counts as a
    499 (nginx's "client closed request") in the metrics. Not declared in the OpenAPI: no client ever sees it."""

    status_code, type = 499, "client_closed_request"
    description = "The client disconnected before its result was ready"


class ModelError(APIError):
    """The model failed on some of the request's texts (non-finite logits: weights that overflow on some tokens,
    float16 overflow): a fault of the server's model, not of the request. The details name each text's index;
    no probability is made up for them, and no other text or request is affected."""

    status_code, type = 500, "model_error"
    description = "The model gave non-finite logits (NaN or inf) for the texts named in details; nothing is reported"


class InternalError(APIError):
    status_code, type = 500, "internal_error"


def error_responses(*errors: type[APIError]) -> dict[int, dict]:
    """The `responses=` of a route, so /docs declares each error it can give."""
    return {e.status_code: {"model": ErrorResponse, "description": e.description} for e in errors}


def _field(loc: tuple) -> str:
    """The dotted path of an error's location in the user's JSON: "inputs.2", not pydantic's
    ("body", "inputs", "texts", 2), whose union tag (app.schemas.UNION_TAGS) no JSON key matches; "messages.0.base64",
    not ("body", "messages", 0, "base64", "base64")."""
    parts = loc[1:] if loc and loc[0] == "body" else loc

    def is_tag(i: int) -> bool:  # a tag follows its field, or the index into its field's list
        owner = parts[i - 2] if i >= 2 and isinstance(parts[i - 1], int) else parts[i - 1] if i else None
        return isinstance(owner, str) and parts[i] in UNION_TAGS.get(owner, ())

    return ".".join(str(p) for i, p in enumerate(parts) if not is_tag(i)) or "body"


def _shown(value, limit: int = 60) -> str:
    """A value as an error message quotes it, shortened."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def validation_details(exc: RequestValidationError, content_type: str | None = None) -> list[ErrorDetail]:
    details = []
    for err in exc.errors():
        message = err["msg"]
        if isinstance(err["input"], bytes) and _field(err["loc"]) == "body":
            # FastAPI parses a body as JSON only when its Content-Type is JSON; `curl -d` alone sends a form's
            given = repr(content_type) if content_type else "missing"
            message = f"not read as JSON: send 'Content-Type: application/json' (the request's was {given})"
            details.append(ErrorDetail(field="body", message=message))
            continue
        if err["type"] == "json_invalid":  # loc is ("body", character position)
            message = f"invalid JSON at character {err['loc'][-1]}: {err['ctx']['error']}"
            details.append(ErrorDetail(field="body", message=message))
            continue
        if err["type"] == "too_long":  # more items than the request model allows, e.g. "300 texts, at most 256"
            message = f"{err['ctx']['actual_length']} {_field(err['loc'])}, at most {err['ctx']['max_length']}"
        elif err["type"] == "literal_error":  # the values allowed and the one given: "must be 'Right', got 'Left'"
            message = f"must be {err['ctx']['expected']}, got {_shown(err['input'])}"
        elif err["type"] not in (
            "missing",
            "extra_forbidden",
            "too_short",
            "empty_text",
            "text_too_long",
            "no_visible_characters",
            "invalid_base64",
            "message_too_large",
        ):
            # a wrong type names the type given; a wrong value of the right type ("top_k": 0) shows the value, but
            # never a whole object: an object's own validator (app.schemas' model validators) says what is wrong
            wrong_type = err["type"].endswith("_type") or err["type"] == "text_or_texts"
            if wrong_type or not isinstance(err["input"], dict):
                given = type(err["input"]).__name__ if wrong_type else _shown(err["input"])
                message = f"{message}, got {given}"
        # an object's validator names the field its error is about in its context (app.schemas._model_or_models)
        loc = (*err["loc"], err["ctx"]["field"]) if "field" in err.get("ctx", {}) else err["loc"]
        details.append(ErrorDetail(field=_field(loc), message=message))
    return details


def install_error_handlers(app: FastAPI) -> None:
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        return InvalidInput.of(validation_details(exc, request.headers.get("content-type"))).response()

    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        cause = exc.__cause__
        if exc.status_code == 400 and cause is not None:
            # FastAPI's 400 for a body json.loads failed on other than by syntax: not UTF-8, nested too deep
            message = f"not parseable as JSON ({type(cause).__name__}: {cause})"
            return InvalidInput.of([ErrorDetail(field="body", message=message)]).response()
        body = ErrorResponse(error=ErrorInfo(type="http_error", message=str(exc.detail)))
        return JSONResponse(body.model_dump(), status_code=exc.status_code, headers=exc.headers)

    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        return InternalError(f"{type(exc).__name__} while serving {request.url.path}").response()

    app.add_exception_handler(APIError, api_error)
    app.add_exception_handler(RequestValidationError, invalid_request)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(Exception, unexpected)
