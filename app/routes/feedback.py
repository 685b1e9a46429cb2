"""POST /feedback: a user's correction (this text or message is really that label), stored durably for the next
fine-tune; GET /feedback/stats: what the store holds and how much of it the serving model gets wrong."""

import asyncio
from typing import Literal

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field, create_model

from app.errors import (
    ErrorDetail,
    FeedbackDisabled,
    FeedbackNotStored,
    InvalidInput,
    NotReady,
    Overloaded,
    PayloadTooLarge,
    RequestTimeout,
    Unauthorized,
    error_responses,
)
from app.feedback import Feedback
from app.routes.deps import SCORING_ERRORS, ReadyService, require_api_key
from app.schemas import bounded_message, bounded_text
from app.service import Service
from app.settings import Settings
from training.runtime.feedback import Correction, FeedbackStoreError, UnknownLabel
from training.runtime.mail import Extraction, read_message
from training.runtime.text import NO_VISIBLE_CHARACTERS, has_visible_characters

CONTENT_FIELDS = ("text", "message")
MAX_REASON_CHARS = 1000  # a reason is a note for whoever reviews the corrections, not a second message


class FeedbackRecorded(BaseModel):
    outcome: Literal["new", "replaced", "same"] = Field(
        description="new: first report of this content; replaced: its label changed; same: the label it already had"
    )
    id: str = Field(description="The correction's identity: sha256 of the text, or of a message's Message-ID and body")
    label: str = Field(description="Its label now")
    previous: str | None = Field(description="Its label before this report; null when new")


class FeedbackStatsResponse(BaseModel):
    model: str = Field(description="The serving model that scored the corrections")
    corrections: int = Field(description="Distinct texts and messages reported")
    reports: int = Field(description="Reports received, repeats included")
    by_label: dict[str, int] = Field(description="Corrections by their current label")
    by_kind: dict[str, int] = Field(description="Corrections by kind: text, message")
    wrong: int = Field(description="Corrections the serving model labels otherwise than the report")
    wrong_by_label: dict[str, int] = Field(description="Those, by the label the report gave")
    unreadable: int = Field(description="Messages with nothing readable: not scored, and left out of fine-tuning")


def feedback_request_model(settings: Settings) -> type[BaseModel]:
    """The /feedback body: a text or a message (as /classify takes them, with its limits), the label, a reason."""
    return create_model(
        "FeedbackRequest",
        __config__=ConfigDict(extra="forbid"),
        text=(
            bounded_text(settings.max_text_chars) | None,
            Field(None, description="A text, bounded as /classify's texts are", examples=["WINNER!! Claim your prize"]),
        ),
        message=(
            bounded_message(settings.max_message_bytes) | None,
            Field(
                None,
                description="A raw RFC 5322 message, as /classify's messages: a string, or {'base64': ...} for "
                "bytes a JSON string cannot carry; at most max_message_bytes bytes (see /info)",
            ),
        ),
        label=(str, Field(description="What the content really is: one of the model's labels (see /info)")),
        reason=(str | None, Field(None, max_length=MAX_REASON_CHARS, description="Why, for whoever reviews it")),
    )


def feedback_router(settings: Settings) -> APIRouter:
    feedback_request = feedback_request_model(settings)
    routes = APIRouter()

    @routes.post(
        "/feedback",
        response_model=FeedbackRecorded,
        dependencies=[Depends(require_api_key)],
        responses=error_responses(
            Unauthorized,
            RequestTimeout,
            FeedbackDisabled,
            PayloadTooLarge,
            InvalidInput,
            Overloaded,
            NotReady,
            FeedbackNotStored,
        ),
    )
    async def feedback(body: feedback_request, service: ReadyService) -> FeedbackRecorded:
        """Records that a text or raw message is `label`; answered once the correction is on disk. The same
        content reported again is stored once, its label replaced by the latest report's and every report kept."""
        store = enabled(service)
        content = request_content(body)
        extraction = service.classifier.extraction
        if isinstance(content, bytes) and not await asyncio.to_thread(readable, content, extraction):
            # nothing a model could learn from: refused now rather than left out by the next fine-tune
            message = f"the message's text (subject and readable body) {NO_VISIBLE_CHARACTERS}"
            raise InvalidInput.of([ErrorDetail(field=content_field(body), message=message)])
        try:
            recorded = await store.record(content, body.label, body.reason, "http")
        except UnknownLabel as exc:
            raise InvalidInput.of([ErrorDetail(field="label", message=str(exc))]) from None
        except ValueError as exc:
            raise InvalidInput.of([ErrorDetail(field=content_field(body), message=str(exc))]) from None
        except FeedbackStoreError as exc:
            raise FeedbackNotStored(str(exc)) from None
        return FeedbackRecorded(
            outcome=recorded.outcome, id=recorded.key, label=recorded.label, previous=recorded.previous
        )

    @routes.get(
        "/feedback/stats",
        response_model=FeedbackStatsResponse,
        dependencies=[Depends(require_api_key)],
        responses=error_responses(*SCORING_ERRORS, FeedbackDisabled),
    )
    async def stats(service: ReadyService, request: Request) -> FeedbackStatsResponse:
        """Counts of the stored corrections by label and kind, and how many of them the serving model gets wrong
        (every correction scored now, as /classify would: this costs one model pass over the store)."""
        store = enabled(service)
        counts = await store.stats()
        wrong, unreadable = await wrong_by_label(service, await store.corrections(), request)
        return FeedbackStatsResponse(
            model=service.model_name,
            corrections=counts.corrections,
            reports=counts.reports,
            by_label=counts.by_label,
            by_kind=counts.by_kind,
            wrong=sum(wrong.values()),
            wrong_by_label=wrong,
            unreadable=unreadable,
        )

    return routes


def enabled(service: Service) -> Feedback:
    """The service's feedback store; raises FeedbackDisabled (403) when the server takes no feedback."""
    if service.feedback is None:
        raise FeedbackDisabled("feedback is disabled on this server: set SPAMGPT_FEEDBACK_ENABLED=true to take it")
    return service.feedback


def content_field(body: BaseModel) -> str:
    return next(name for name in CONTENT_FIELDS if getattr(body, name) is not None)


def request_content(body: BaseModel) -> str | bytes:
    """The reported content: a text (str) or a raw message (bytes). Raises InvalidInput unless exactly one of
    CONTENT_FIELDS is given."""
    given = [name for name in CONTENT_FIELDS if getattr(body, name) is not None]
    if len(given) != 1:
        found = f"got {', '.join(given)}" if given else "got none"
        message = f"give exactly one of {', '.join(CONTENT_FIELDS)} ({found})"
        raise InvalidInput.of([ErrorDetail(field="body", message=message)])
    return getattr(body, given[0])


def readable(raw: bytes, extraction: Extraction) -> bool:
    """Whether the model reads anything in a raw message (read as the serving checkpoint reads messages)."""
    return has_visible_characters(read_message(raw, extraction).text)


async def wrong_by_label(service: Service, corrections: list[Correction], request: Request) -> tuple[dict, int]:
    """How many `corrections` the serving model labels otherwise than reported, by the reported label (every model
    label present), and how many messages it could not score (nothing readable: finetune leaves them out too).
    Texts and messages are scored as /classify scores them (a message in windows), max_texts_per_request at a time
    through the batcher."""
    wrong = dict.fromkeys(service.classifier.card.labels, 0)
    extraction = service.classifier.extraction
    texts = [c for c in corrections if c.kind == "text"]
    messages = [c for c in corrections if c.kind == "message"]
    scored = await asyncio.to_thread(lambda: [m for m in messages if readable(m.content, extraction)])
    step = service.settings.max_texts_per_request
    for group, score in ((texts, service.classify), (scored, service.classify_messages)):
        for start in range(0, len(group), step):
            chunk = group[start : start + step]
            results = (await score([c.content for c in chunk], request.receive))["results"]
            for correction, result in zip(chunk, results, strict=True):
                if result["label"] != correction.label:
                    wrong[correction.label] = wrong.get(correction.label, 0) + 1
    return wrong, len(messages) - len(scored)
