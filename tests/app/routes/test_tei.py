"""The text-embeddings-inference routes: /predict in TEI's shapes and the root path in the Hugging Face Inference
API's, with /classify's limits, errors and API key; and huggingface_hub's real InferenceClient against a live
server."""

import pytest
import torch
from fastapi.testclient import TestClient
from torch.testing import assert_close

from app.main import create_app
from tests.helpers import live_server, tiny_settings
from training.runtime.classifier import Classifier

TEXTS = ["WINNER!! Claim your free prize now", "See you at 5?", "ok", "free entry in 2 a wkly comp"]
LONG = "x y z " * 40  # over the tiny checkpoint's 48 tokens


@pytest.fixture
def client(tiny_checkpoint):
    with TestClient(create_app(tiny_settings(tiny_checkpoint, max_texts_per_request=8))) as client:
        yield client


@pytest.fixture
def engine(tiny_checkpoint) -> Classifier:
    return Classifier.load(tiny_checkpoint, tiny_settings(tiny_checkpoint).classifier_options())


def scores_by_label(ranked: list[dict], labels) -> list[float]:
    return [{item["label"]: item["score"] for item in ranked}[label] for label in labels]


def assert_ranked(ranked: list[dict], labels) -> None:
    assert sorted(item["label"] for item in ranked) == sorted(labels)
    scores = [item["score"] for item in ranked]
    assert scores == sorted(scores, reverse=True)


def test_predict_one_string_is_a_flat_list_of_every_label_highest_first(client, engine):
    response = client.post("/predict", json={"inputs": TEXTS[0]})
    assert response.status_code == 200, response.text
    ranked = response.json()
    assert_ranked(ranked, engine.card.labels)
    expected = engine.predict(engine.tokenize(TEXTS[:1])[0])[0]
    assert_close(torch.tensor(scores_by_label(ranked, engine.card.labels)), expected)


def test_predict_a_list_is_one_ranked_list_per_text_in_input_order(client, engine):
    response = client.post("/predict", json={"inputs": TEXTS})
    assert response.status_code == 200, response.text
    body = response.json()
    assert len(body) == len(TEXTS)
    for ranked in body:
        assert_ranked(ranked, engine.card.labels)
    got = torch.tensor([scores_by_label(ranked, engine.card.labels) for ranked in body])
    assert_close(got, engine.predict(engine.tokenize(TEXTS)[0]))
    classify = client.post("/classify", json={"texts": TEXTS}).json()["results"]
    assert got.tolist() == [[r["probabilities"][label] for label in engine.card.labels] for r in classify]


def test_predict_reads_teis_own_batch_shape_a_list_of_one_text_lists(client, engine):
    """TEI's /predict batch is `[["a"], ["b"]]` (its router reads `["a", "b"]` as one pair): a TEI client's batch
    gets the answer a flat list gets; an error in it still names the text as `inputs.N`; a pair is refused."""
    nested = client.post("/predict", json={"inputs": [[text] for text in TEXTS]})
    assert nested.status_code == 200, nested.text
    assert nested.json() == client.post("/predict", json={"inputs": TEXTS}).json()
    bad = client.post("/predict", json={"inputs": [["a"], [""]]})
    assert bad.status_code == 422 and bad.json()["error"]["details"] == [
        {"field": "inputs.1", "message": "must not be empty"}
    ]
    pair = client.post("/predict", json={"inputs": [["a", "b"]]})
    assert pair.status_code == 422 and pair.json()["error"]["details"][0]["field"] == "inputs.0", pair.text


def test_predict_raw_scores_are_the_logits(client, engine):
    body = client.post("/predict", json={"inputs": TEXTS, "raw_scores": True}).json()
    got = torch.tensor([scores_by_label(ranked, engine.card.labels) for ranked in body])
    rows = engine.tokenize(TEXTS)[0]
    assert_close(got, engine.predict_logits(rows))
    assert_close(torch.softmax(got, dim=1), engine.predict(rows))


def test_predict_refuses_a_long_text_unless_truncate(client, engine):
    refused = client.post("/predict", json={"inputs": ["ok", LONG, "fine", LONG]})
    assert refused.status_code == 422, refused.text
    assert [d["field"] for d in refused.json()["error"]["details"]] == ["inputs.1", "inputs.3"]
    assert "max_tokens 48" in refused.json()["error"]["message"]
    truncated = client.post("/predict", json={"inputs": LONG, "truncate": True})
    assert truncated.status_code == 200, truncated.text
    classify = client.post("/classify", json={"texts": [LONG]}).json()["results"][0]
    assert classify["truncated"] and scores_by_label(truncated.json(), engine.card.labels) == [
        classify["probabilities"][label] for label in engine.card.labels
    ]


@pytest.mark.parametrize(
    "path, body, field, message",
    [
        pytest.param("/predict", {"inputs": []}, "inputs", "at least 1 item", id="no-texts"),
        pytest.param("/predict", {"inputs": ""}, "inputs", "must not be empty", id="empty-string"),
        pytest.param("/predict", {"inputs": ["a", ""]}, "inputs.1", "must not be empty", id="an-empty-text"),
        pytest.param("/predict", {"inputs": ["a"] * 9}, "inputs", "9 inputs, at most 8", id="too-many-texts"),
        pytest.param("/predict", {"inputs": [["a", "b"]]}, "inputs.0", "valid string, got list", id="a-text-pair"),
        pytest.param(
            "/predict", {"inputs": 5}, "inputs", "must be a string or a list of strings, got int", id="a-number"
        ),
        pytest.param(
            "/predict",
            {"inputs": "a", "truncation_direction": "Left"},
            "truncation_direction",
            "must be 'Right' or 'right', got 'Left'",
            id="left",
        ),
        pytest.param("/predict", {"input": "a"}, "inputs", "Field required", id="misspelt-field"),
        pytest.param(
            "/",
            {"inputs": "a", "parameters": {"top_k": 0}},
            "parameters.top_k",
            "Input should be greater than or equal to 1, got 0",
            id="top-k-zero",
        ),
        pytest.param(
            "/",
            {"inputs": "a", "parameters": {"top_k": "x"}},
            "parameters.top_k",
            "unable to parse string as an integer, got 'x'",
            id="top-k-not-a-number",
        ),
        pytest.param(
            "/predict",
            {"inputs": "a", "raw_scores": "yes"},
            "raw_scores",
            "valid boolean, got str",
            id="raw-scores-str",
        ),
        pytest.param(
            "/",
            {"inputs": "a", "parameters": {"function_to_apply": "relu"}},
            "parameters.function_to_apply",
            "must be 'softmax', 'sigmoid' or 'none', got 'relu'",
        ),
        pytest.param("/", {"inputs": "x" * 20001}, "inputs", "20001 characters, at most 20000", id="too-many-chars"),
        pytest.param("/", {"inputs": ["a", "x" * 20001]}, "inputs.1", "20001 characters", id="too-many-chars-in-list"),
    ],
)
def test_bad_requests_are_422_naming_the_field_as_the_user_wrote_it(client, path, body, field, message):
    """Fields are the user's JSON paths ("inputs.1"), never the union member pydantic chose ("inputs.texts.1")."""
    response = client.post(path, json=body)
    assert response.status_code == 422, response.text
    details = response.json()["error"]["details"]
    assert details[0]["field"] == field and message in details[0]["message"], details
    assert not any(tag in d["field"].split(".") for d in details for tag in ("text", "texts")), details


def test_predict_names_a_single_long_string_as_inputs(client):
    refused = client.post("/predict", json={"inputs": LONG})
    assert refused.status_code == 422, refused.text
    assert [d["field"] for d in refused.json()["error"]["details"]] == ["inputs"]


def test_root_speaks_the_inference_api_shape(client, engine):
    rows = engine.tokenize(TEXTS)[0]
    logits, probs = engine.predict_logits(rows), engine.predict(rows)
    one = client.post("/", json={"inputs": TEXTS[0]}).json()
    assert len(one) == 1 and len(one[0]) == len(engine.card.labels)  # a list holding one list, for one string
    assert_close(torch.tensor(scores_by_label(one[0], engine.card.labels)), probs[0])
    many = client.post("/", json={"inputs": TEXTS, "parameters": {"function_to_apply": "none"}}).json()
    assert_close(torch.tensor([scores_by_label(r, engine.card.labels) for r in many]), logits)
    sigmoid = client.post("/", json={"inputs": TEXTS, "parameters": {"function_to_apply": "sigmoid"}}).json()
    assert_close(torch.tensor([scores_by_label(r, engine.card.labels) for r in sigmoid]), torch.sigmoid(logits))
    top = client.post("/", json={"inputs": TEXTS, "parameters": {"top_k": 1}}).json()
    assert [[item["label"] for item in r] for r in top] == [[engine.card.labels[i]] for i in probs.argmax(1).tolist()]
    everything = client.post("/", json={"inputs": TEXTS[0], "parameters": {"top_k": 99}}).json()
    assert len(everything[0]) == len(engine.card.labels)
    assert client.post("/", json={"inputs": LONG}).status_code == 200  # truncated, as /classify does


def test_api_key_and_body_limit_apply_to_both_routes(tiny_checkpoint):
    settings = tiny_settings(tiny_checkpoint, api_key="sekret", max_body_bytes=200)
    with TestClient(create_app(settings)) as client:
        for path in ("/predict", "/"):
            assert client.post(path, json={"inputs": "a"}).status_code == 401
            authorized = {"Authorization": "Bearer sekret"}
            assert client.post(path, json={"inputs": "a"}, headers=authorized).status_code == 200
            assert client.post(path, json={"inputs": "a" * 300}, headers=authorized).status_code == 413


def test_huggingface_hub_inference_client_against_a_live_server(tiny_checkpoint, engine, tmp_path):
    from huggingface_hub import InferenceClient

    with live_server(tiny_checkpoint, tmp_path / "server.log", api_key="sekret") as (url, _):
        client = InferenceClient(base_url=url, api_key="sekret")
        answer = client.text_classification(TEXTS[0])
        top = client.text_classification(TEXTS[0], top_k=1, function_to_apply="none")
    rows = engine.tokenize(TEXTS[:1])[0]
    probs, logits = engine.predict(rows)[0], engine.predict_logits(rows)[0]
    assert sorted(item.label for item in answer) == sorted(engine.card.labels)  # every label, not just the first
    assert_close(torch.tensor([{a.label: a.score for a in answer}[label] for label in engine.card.labels]), probs)
    best = int(probs.argmax())
    assert [(item.label, item.score) for item in top] == [
        (engine.card.labels[best], pytest.approx(float(logits[best])))
    ]


@pytest.mark.parametrize("field", ["raw_scores", "truncate"])
@pytest.mark.parametrize("value", [0, 1, "true", None])
def test_predict_booleans_are_strict(client, field, value):
    # schemathesis found {"raw_scores": 0} accepted as false
    response = client.post("/predict", json={"inputs": "ok", field: value})
    assert response.status_code == 422, response.text
    assert response.json()["error"]["details"][0]["field"] == field
