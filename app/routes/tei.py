"""text-embeddings-inference's POST /predict and the Hugging Face Inference API's root POST /, in their request and
response shapes, so their clients work unchanged; /classify's limits, batching, errors and API key. Both answer from
the default model; under /models/{name} (POST /models/{name}/predict, POST /models/{name}) from the model `name`:
these clients take a base URL, so a path prefix selects a model with no change to them."""

import torch
from fastapi import APIRouter, Request

from app.errors import UnknownModel, error_responses
from app.routes.deps import SCORING_ERRORS, ReadyService, api_key_dependencies
from app.schemas import LabelScore, hf_request_model, predict_request_model
from app.service import Service
from app.settings import Settings
from training.runtime.inference import probabilities

# The Hugging Face Inference API's function_to_apply: (N, n_labels) logits -> scores
SCORE_FUNCTIONS = {"softmax": probabilities, "sigmoid": torch.sigmoid, "none": lambda z: z}


def tei_router(settings: Settings) -> APIRouter:
    """POST /predict in text-embeddings-inference's shapes, and POST / in the shape huggingface_hub's
    InferenceClient.text_classification speaks; each one Service.label_logits call."""
    predict_request, hf_request = predict_request_model(settings), hf_request_model(settings)
    routes = APIRouter()
    errors = error_responses(*SCORING_ERRORS)
    predict_response, hf_response = list[LabelScore] | list[list[LabelScore]], list[list[LabelScore]]
    auth = api_key_dependencies(settings)

    async def predict(body, service: Service, request: Request, name: str | None) -> list:
        request.state.model = name or service.model_name
        scored = await service.label_logits(
            body.inputs, request.receive, "inputs", refuse_truncation=not body.truncate, model=name
        )
        scores = scored.logits if body.raw_scores else probabilities(scored.logits)
        ranked = ranked_labels(scores, scored.labels)
        return ranked[0] if isinstance(body.inputs, str) else ranked

    async def inference_api(body, service: Service, request: Request, name: str | None) -> list:
        request.state.model = name or service.model_name
        scored = await service.label_logits(body.inputs, request.receive, "inputs", model=name)
        parameters = body.parameters
        scores = SCORE_FUNCTIONS[parameters.function_to_apply or "softmax"](scored.logits)
        return ranked_labels(scores, scored.labels, parameters.top_k)

    @routes.post("/predict", response_model=predict_response, dependencies=auth, responses=errors)
    async def default_predict(body: predict_request, service: ReadyService, request: Request) -> list:
        """text-embeddings-inference's /predict: every label with its score, highest first; for one string a
        list of them, for a list of strings a list of such lists, in input order. Scores are probabilities, or
        the logits with raw_scores. A text over max_tokens is refused (422) unless truncate is true."""
        return await predict(body, service, request, None)

    @routes.post("/", response_model=hf_response, dependencies=auth, responses=errors)
    async def default_inference_api(body: hf_request, service: ReadyService, request: Request) -> list:
        """The Hugging Face Inference API's text-classification shape, as huggingface_hub's InferenceClient
        posts it to a server's root: `{"inputs": text or texts, "parameters": {"top_k", "function_to_apply"}}`
        -> one list of `{label, score}` per text, highest first (a list holding one list for one string: the
        client reads the first list). Texts over max_tokens are truncated, as /classify does."""
        return await inference_api(body, service, request, None)

    model_errors = error_responses(*SCORING_ERRORS, UnknownModel)

    @routes.post("/models/{name}/predict", response_model=predict_response, dependencies=auth, responses=model_errors)
    async def model_predict(name: str, body: predict_request, service: ReadyService, request: Request) -> list:
        """/predict, answered by the model `name`: a text-embeddings-inference client's base URL
        http://host/models/{name}."""
        return await predict(body, service, request, name)

    @routes.post("/models/{name}", response_model=hf_response, dependencies=auth, responses=model_errors)
    async def model_inference_api(name: str, body: hf_request, service: ReadyService, request: Request) -> list:
        """The Hugging Face Inference API's root, answered by the model `name`: InferenceClient(model=
        "http://host/models/{name}")."""
        return await inference_api(body, service, request, name)

    return routes


def ranked_labels(scores: torch.Tensor, labels: tuple[str, ...], top_k: int | None = None) -> list[list[dict]]:
    """(N, n_labels) scores -> per row, `{"label", "score"}` for its top_k labels (None: all), highest first;
    equal scores keep the labels' order."""
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :top_k].tolist()
    return [
        [{"label": labels[j], "score": row[j]} for j in ranks]
        for ranks, row in zip(order, scores.tolist(), strict=True)
    ]
