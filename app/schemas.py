"""Request and response bodies. The request's limits (texts per request, characters per text, non-empty) are
constraints on its model, built per app from its settings, so validation and the OpenAPI document agree."""

import base64
import binascii
from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    create_model,
    model_validator,
)
from pydantic_core import PydanticCustomError

from app.settings import Settings
from training.runtime.inference import Threshold
from training.runtime.text import NO_VISIBLE_CHARACTERS, has_visible_characters, visible_character_pattern

# The tags of each tagged union in a request body, by the field that holds it (or its list's items): pydantic writes
# the member it chose into an error's location ("inputs", "texts", 2), ("messages", 0, "base64", "base64") where the
# user's JSON has no such key; app.errors leaves it out.
UNION_TAGS = {"inputs": ("text", "texts"), "messages": ("string", "base64")}


def bounded_text(max_chars: int) -> type:
    """A str of 1..max_chars characters with at least one visible (training.runtime.text.has_visible_characters, the
    rule training applies to its rows), checked in Python: pydantic's own length check reads the string as
    UTF-8 and refuses a lone surrogate (valid JSON; among visible characters it is classified like any other
    character, alone it shows nothing); the same bounds go into the JSON schema beside the check."""

    def check(text: str) -> str:
        if not text:
            raise PydanticCustomError("empty_text", "must not be empty")
        if len(text) > max_chars:
            context = {"length": len(text), "max_chars": max_chars}
            raise PydanticCustomError("text_too_long", "{length} characters, at most {max_chars}", context)
        if not has_visible_characters(text):
            raise PydanticCustomError("no_visible_characters", NO_VISIBLE_CHARACTERS)
        return text

    schema = {"minLength": 1, "maxLength": max_chars, "pattern": visible_character_pattern()}
    return Annotated[str, AfterValidator(check), Field(json_schema_extra=schema)]


class Base64Message(BaseModel):
    """A raw message's bytes, exact whatever they hold (8-bit, any charset)."""

    model_config = ConfigDict(extra="forbid")
    base64: str = Field(description="The message's bytes in base64 (RFC 4648 standard alphabet; line breaks allowed)")


def bounded_message(max_bytes: int) -> type:
    """A raw RFC 5322 message: a string (sent as its UTF-8 bytes) or `{"base64": ...}`; validated into its bytes,
    at most max_bytes of them."""

    def check(value: str | Base64Message) -> bytes:
        if isinstance(value, str):
            raw = value.encode("utf-8", "surrogatepass")  # JSON may carry a lone surrogate: kept, never an error
        else:
            try:
                raw = base64.b64decode("".join(value.base64.split()), validate=True)
            except binascii.Error as exc:
                raise PydanticCustomError("invalid_base64", "base64 not valid ({error})", {"error": str(exc)}) from None
        if len(raw) > max_bytes:
            context = {"size": len(raw), "max_bytes": max_bytes}
            raise PydanticCustomError("message_too_large", "{size} bytes, at most {max_bytes}", context)
        return raw

    string_tag, base64_tag = UNION_TAGS["messages"]
    string_or_base64 = Discriminator(
        _string_or_object,
        custom_error_type="message_type",
        custom_error_message='must be a string or {"base64": ...}',
    )
    return Annotated[
        Annotated[str, Tag(string_tag)] | Annotated[Base64Message, Tag(base64_tag)],
        string_or_base64,
        AfterValidator(check),
    ]


def _string_or_object(value) -> str | None:
    """The member of a message that a JSON value is read as: its type decides, so an error names one reading."""
    string_tag, base64_tag = UNION_TAGS["messages"]
    return string_tag if isinstance(value, str) else base64_tag if isinstance(value, dict) else None


def classify_request_model(settings: Settings) -> type[BaseModel]:
    """The /classify body, `{"texts": [...]}` or `{"messages": [...]}`, with this app's limits declared on its
    fields. (A message/rfc822 body is read by the route itself.)"""
    texts = Field(
        None,
        min_length=1,
        max_length=settings.max_texts_per_request,
        description=(
            "Texts to classify; each with a visible character (not only whitespace or invisible format "
            "characters), at most max_text_chars characters (see /info). Give texts or messages"
        ),
    )
    messages = Field(
        None,
        min_length=1,
        max_length=settings.max_texts_per_request,
        description=(
            "Raw e-mail messages (RFC 5322, headers and body) to classify, read as training read them "
            "(docs/mail.md): each a string, or {'base64': ...} for bytes a JSON string cannot carry; at most "
            "max_message_bytes bytes each (see /info). Give texts or messages"
        ),
    )
    text, message = bounded_text(settings.max_text_chars), bounded_message(settings.max_message_bytes)

    def one_kind(body: BaseModel) -> BaseModel:
        if (body.texts is None) == (body.messages is None):
            raise PydanticCustomError("texts_or_messages", "give either texts or messages")
        return body

    def not_both(body):
        # both fields named is the same mistake whatever one holds (null, [] next to a list): said before either is
        # validated, so it is not reported as that field's own error
        if isinstance(body, dict) and "texts" in body and "messages" in body:
            raise PydanticCustomError("texts_or_messages", "give either texts or messages")
        return body

    # extra="forbid": a misspelt field ("text") is an error, not silently ignored; the schema states the rules
    # between fields that the validators below enforce (whole-body examples: one field's alone would be combined
    # with the other's by clients that build a body from per-field examples)
    return create_model(
        "ClassifyRequest",
        __config__=ConfigDict(extra="forbid", json_schema_extra=ONE_BODY_SHAPE),
        __validators__={
            "not_both": model_validator(mode="before")(not_both),
            "one_kind": model_validator(mode="after")(one_kind),
            "one_way_to_name_models": model_validator(mode="after")(_model_or_models),
        },
        # absent is None (the default is not validated), while null is no list: the schema declares plain arrays
        texts=(list[text], texts),
        messages=(list[message], messages),
        **MODEL_FIELDS,
    )


# What the JSON schema can state of classify_request_model's validators: texts or messages, model or models,
# models only with texts (a name is checked against the models served, which change at runtime: a 404)
ONE_BODY_SHAPE = {
    "oneOf": [{"required": ["texts"]}, {"required": ["messages"]}],
    "not": {
        "anyOf": [
            {"required": ["model", "models"], "properties": {"model": {"type": "string"}, "models": {"type": "array"}}},
            {"required": ["messages", "models"], "properties": {"models": {"type": "array"}}},
        ]
    },
    "examples": [
        {"texts": ["WINNER!! Claim your free prize now", "See you at 5?"]},
        {"messages": ["Subject: Lunch?\r\n\r\nSee you at noon."]},
    ],
}

# /classify's choice of models (app.models): one by name, or several, each text answered by each
MODEL_FIELDS = {
    "model": (
        str | None,
        Field(None, description="The model to answer (see /info's models); unset: the default model"),
    ),
    "models": (
        list[str] | None,
        Field(
            None,
            min_length=1,
            json_schema_extra={"uniqueItems": True},
            description="Several models, each answering each text (instead of model); models on one base share "
            "one pass of their common prefix. Texts only: messages are answered by one model",
        ),
    ),
}


def _model_or_models(request: BaseModel) -> BaseModel:
    """Errors name the field they are about in their context's "field" (app.errors.validation_details)."""
    models = {"field": "models"}
    if request.model is not None and request.models is not None:
        raise PydanticCustomError("model_or_models", "give model or models, not both", models)
    if request.models is not None:
        repeated = sorted({name for name in request.models if request.models.count(name) > 1})
        if repeated:
            raise PydanticCustomError(
                "repeated_model",
                "must not name a model twice, named twice: {repeated}",
                {**models, "repeated": repeated},
            )
    if request.models is not None and request.messages is not None:
        raise PydanticCustomError(
            "models_with_messages", "messages are answered by one model: give model, not models", models
        )
    return request


def _one_or_many(value) -> str | None:
    """The member of `inputs` that a JSON value is read as: its type decides, so an error names one reading."""
    return "text" if isinstance(value, str) else "texts" if isinstance(value, list) else None


def _unwrap_tei_batch(value):
    """TEI's own batch shape is a list of one-text lists, `[["a"], ["b"]]` (a two-text list is its cross-encoder
    pair, refused below): each is read as its text, so `inputs.1` still names the second."""
    if not isinstance(value, list):
        return value
    return [item[0] if isinstance(item, list) and len(item) == 1 else item for item in value]


def _inputs_field(settings: Settings, tei_batches: bool = False) -> tuple:
    """`inputs`: one text, or a list of 1..max_texts_per_request texts, each bounded as /classify's are; with
    tei_batches, a text in the list may also come as TEI's `["text"]`."""
    text = bounded_text(settings.max_text_chars)
    unwrap = (BeforeValidator(_unwrap_tei_batch),) if tei_batches else ()
    texts = Annotated[list[text], *unwrap, Field(min_length=1, max_length=settings.max_texts_per_request)]
    one_or_many = Discriminator(
        _one_or_many, custom_error_type="text_or_texts", custom_error_message="must be a string or a list of strings"
    )
    text_tag, texts_tag = UNION_TAGS["inputs"]
    return (
        Annotated[Annotated[text, Tag(text_tag)] | Annotated[texts, Tag(texts_tag)], one_or_many],
        Field(description="One text, or a list of texts (see /info for the limits)", examples=["See you at 5?"]),
    )


def predict_request_model(settings: Settings) -> type[BaseModel]:
    """text-embeddings-inference's /predict body, with this app's limits on `inputs`. Pairs of texts (TEI's
    cross-encoder input) are refused: the classifier reads one text."""
    return create_model(
        "PredictRequest",
        __config__=ConfigDict(extra="forbid"),
        inputs=_inputs_field(settings, tei_batches=True),
        # strict: 0 or "false" is not a boolean (schemathesis found 0 read as false)
        truncate=(bool, Field(False, strict=True, description="Truncate texts over max_tokens; false: a 422")),
        truncation_direction=(
            Literal["Right", "right"],
            Field("Right", description="Only Right: the model reads a text's first max_tokens tokens"),
        ),
        raw_scores=(bool, Field(False, strict=True, description="Scores are the logits instead of probabilities")),
    )


class InferenceParameters(BaseModel):
    """The Hugging Face Inference API's text-classification parameters, as InferenceClient sends them."""

    model_config = ConfigDict(extra="forbid")
    top_k: int | None = Field(None, ge=1, description="Only the top_k labels; more than there are means all")
    function_to_apply: Literal["softmax", "sigmoid", "none"] | None = Field(
        None, description="softmax (the default): probabilities; sigmoid of each logit; none: the logits"
    )


def hf_request_model(settings: Settings) -> type[BaseModel]:
    """The Hugging Face Inference API's text-classification body, `{"inputs", "parameters"}`, with this app's
    limits on `inputs`."""
    return create_model(
        "InferenceRequest",
        __config__=ConfigDict(extra="forbid"),
        inputs=_inputs_field(settings),
        parameters=(InferenceParameters, Field(default_factory=InferenceParameters)),
    )


class LabelScore(BaseModel):
    label: str
    score: float


class MailRead(BaseModel):
    """What was read of one raw message (training.runtime.mail.read_message)."""

    windows: int = Field(description="Windows of max_tokens tokens the model read (mail_windows in /info)")
    defects: int = Field(description="Malformations found, and bounds met, reading it (0 for well-formed mail)")
    attachments: int = Field(description="Attachments named and left unread")
    message_id: str | None = Field(description="Its Message-ID field, null when absent")


class Result(BaseModel):
    label: str
    probabilities: dict[str, float] = Field(description="One per label, summing to 1")
    tokens: int = Field(description="Tokens the model read, after truncation (a message: over all its windows)")
    truncated: bool = Field(
        description="Whether the text was longer than the model's max_tokens (a message: than its windows read)"
    )
    mail: MailRead | None = Field(None, description="For a message only: what was read of it")


class ClassifyResponse(BaseModel):
    model: str
    results: list[Result] = Field(description="In the order of the request's texts")


class ClassifyManyResponse(BaseModel):
    """The answer to /classify with `models`."""

    models: list[str] = Field(description="The models asked, in the request's order")
    results: list[dict[str, Result]] = Field(description="In the order of the request's texts: each model's result")


class Health(BaseModel):
    status: Literal["ok", "loading", "failed", "draining"]
    detail: str | None = None
    model: str | None = None


class ModelInfo(BaseModel):
    """One served model: its card, where it was loaded from, and where and how it runs."""

    model: str = Field(description="Its name, as requests give it")
    checkpoint: str = Field(description="The checkpoint directory it was loaded from")
    revision: int = Field(description="1 for the name's first load since the server started; one more per replacement")
    loaded_at: str = Field(description="When this revision started serving (ISO 8601, UTC)")
    prefix: str | None = Field(
        description="The sha256 of its frozen prefix (the checkpoint's fingerprint); null: it records none"
    )
    sharing: list[str] = Field(
        description="The other models that hold one copy of its prefix with it and compute it once per text"
    )
    labels: list[str]
    base_model: str
    parameters: int
    max_tokens: int = Field(description="Longer texts are truncated to this many tokens")
    threshold: Threshold | None = Field(
        description="The positive label's threshold on the served probabilities, chosen on held-out rows; null: argmax"
    )
    prior: dict[str, float] | None = Field(
        description="The label distribution the probabilities are calibrated to (the checkpoint's, or SPAMGPT_PRIOR); "
        "null: a checkpoint without calibration, served at its training data's distribution"
    )
    calibration: dict | None = Field(
        description="Temperature and training prior (folded into the weights) and the prior in force; null: none"
    )
    metrics: dict = Field(description="The checkpoint's evaluation summary, as training recorded it")
    created: str | None
    version: str | None
    device: str
    dtype: str
    quantization: str | None
    mail: dict = Field(
        description="How raw messages are read: the extraction in force (the checkpoint's, or the default for a "
        "checkpoint trained on texts: extraction_source says which), the window rule and the windows read at most"
    )


class Info(ModelInfo):
    """The default model's card at the top level (the shape of a server with one model), the limits in force, and
    every model served."""

    limits: dict[str, int | float | bool]
    models: list[ModelInfo] = Field(description="Every model served, the default among them")
    refused: dict[str, str] = Field(description="Checkpoints refused at startup, by name: why each was not served")
