"""Request and response bodies. Limits that depend on settings (texts per request, characters per text) are
checked in check_texts, so the same message format covers them."""

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from app.errors import ErrorDetail, InvalidInput
from app.settings import Settings


class ClassifyRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelt field ("text") is an error, not silently ignored

    texts: list[str] = Field(
        min_length=1,
        description="Messages to classify; each non-empty, at most max_text_chars characters (see /info)",
        examples=[["WINNER!! Claim your free prize now", "See you at 5?"]],
    )


class Result(BaseModel):
    label: str
    probabilities: dict[str, float] = Field(description="One per label, summing to 1")
    tokens: int = Field(description="Tokens the model read, after truncation")
    truncated: bool = Field(description="Whether the text was longer than the model's max_tokens")


class ClassifyResponse(BaseModel):
    model: str
    results: list[Result] = Field(description="In the order of the request's texts")


class Health(BaseModel):
    status: Literal["ok", "loading", "failed", "draining"]
    detail: str | None = None
    model: str | None = None


def declare_text_limits(openapi: dict, settings: Settings) -> dict:
    """Write check_texts' limits into the OpenAPI document, so clients and schema-driven fuzzers see the real
    bounds. They are declared here rather than on the model: they depend on settings, and check_texts (not
    pydantic) enforces them, with its own messages."""
    texts = openapi["components"]["schemas"]["ClassifyRequest"]["properties"]["texts"]
    texts["maxItems"] = settings.max_texts_per_request
    texts["items"].update(minLength=1, maxLength=settings.max_text_chars)
    return openapi


def check_texts(texts: list[str], settings: Settings) -> None:
    """Raise InvalidInput naming every offending index: too many texts, an empty text, a text too long."""
    if len(texts) > settings.max_texts_per_request:
        raise InvalidInput.of(
            [ErrorDetail(field="texts", message=f"{len(texts)} texts, at most {settings.max_texts_per_request}")]
        )
    limit = settings.max_text_chars
    if all(texts) and max(map(len, texts)) <= limit:  # the common case, without a Python loop per text
        return
    details = [
        ErrorDetail(field=f"texts.{i}", message=f"{len(t)} characters, at most {limit}" if t else "must not be empty")
        for i, t in enumerate(texts)
        if not t or len(t) > limit
    ]
    raise InvalidInput.of(details)


class Info(BaseModel):
    model: str
    labels: list[str]
    base_model: str
    parameters: int
    max_tokens: int = Field(description="Longer texts are truncated to this many tokens")
    threshold: dict | None = Field(description="The positive label's threshold, chosen on validation; null: argmax")
    metrics: dict = Field(description="The checkpoint's evaluation summary, as training recorded it")
    created: str
    version: str
    device: str
    dtype: str
    quantization: str | None
    limits: dict[str, int | float | bool]
