"""POST /classify: probabilities in input order, what bad input gets (422 naming the field and index), the
checkpoint's decision rule, the OpenAPI document, and a model fault confined to its texts."""

import json
import math
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from fastapi.testclient import TestClient
from torch.testing import assert_close

from app.main import create_app
from tests.helpers import edit_tensors, error_of, tiny_card, tiny_settings
from training.runtime.checkpoint import save_checkpoint
from training.runtime.classifier import Classifier
from training.runtime.inference import Threshold, decide
from training.runtime.model import GPTClassifier
from training.runtime.text import visible_character_pattern


def test_classify_returns_probabilities_in_input_order(client, tiny_checkpoint):
    texts = ["WINNER!! Claim your free prize now", "See you at 5?", "x y z " * 40, "ok"]
    response = client.post("/classify", json={"texts": texts})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == "spamgpt-random-init-tiny-36.3k"
    results = body["results"]
    classifier = Classifier.load(tiny_checkpoint, tiny_settings(tiny_checkpoint).classifier_options())
    expected = classifier.predict(classifier.tokenize(texts)[0], max_batch_size=32)
    got = torch.tensor([[r["probabilities"][label] for label in classifier.card.labels] for r in results])
    assert_close(got, expected)
    assert [r["label"] for r in results] == decide(expected, classifier.card.labels, classifier.card.threshold)
    assert all(math.isclose(sum(r["probabilities"].values()), 1.0, abs_tol=1e-6) for r in results)
    assert [r["truncated"] for r in results] == [False, False, True, False]
    assert results[2]["tokens"] == classifier.card.max_tokens


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("call me <|endoftext|> now", id="endoftext"),
        pytest.param("free 🎁🎉 prize", id="emoji"),
        pytest.param("\ud800 lone surrogate", id="lone-surrogate"),
        pytest.param("bell\x07 nul\x00 esc\x1b", id="control-characters"),
        pytest.param("\u200b\u3000 x", id="one-visible-among-invisible"),
        pytest.param("\u0301", id="lone-combining-mark"),
    ],
)
def test_odd_texts_are_classified_not_refused(client, text):
    body = json.dumps({"texts": [text]})  # ensure_ascii: "\ud800" travels as an escape, as JSON allows
    response = client.post("/classify", content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 200, response.text
    assert response.json()["results"][0]["tokens"] >= 1


@pytest.mark.parametrize(
    ("body", "field", "message"),
    [
        pytest.param(b'{"texts": ["a", ', "body", "invalid JSON at character", id="malformed-json"),
        pytest.param(b'{"texts": ["\xff\xfe"]}', "body", "UnicodeDecodeError", id="not-utf8"),
        pytest.param(b"[" * 100_000, "body", "RecursionError", id="nested-too-deep"),
        pytest.param(b'{"texts": ["a"]} {}', "body", "Extra data", id="trailing-data"),
        pytest.param(b"NaN", "body", "valid dictionary", id="bare-nan"),
        pytest.param(b'["a"]', "body", "valid dictionary", id="not-an-object"),
        pytest.param(b"{}", "body", "give either texts or messages", id="missing-texts"),
        pytest.param(b'{"texts": []}', "texts", "at least 1", id="empty-texts"),
        pytest.param(b'{"texts": "hello"}', "texts", "valid list", id="texts-not-a-list"),
        pytest.param(b'{"texts": ["a", 2]}', "texts.1", "valid string, got int", id="text-not-a-string"),
        pytest.param(b'{"texts": ["a", null]}', "texts.1", "valid string, got NoneType", id="null-text"),
        pytest.param(b'{"texts": ["a", "b", ""]}', "texts.2", "must not be empty", id="empty-text"),
        pytest.param(b'{"texts": ["a"], "text": "b"}', "text", "not permitted", id="unknown-field"),
        pytest.param(b'{"texts": ["a", "b", "c", "d"]}', "texts", "4 texts, at most 3", id="too-many-texts"),
        pytest.param(
            b'{"texts": ["a", "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb"]}',
            "texts.1",
            "42 characters, at most 40",
            id="text-too-long",
        ),
    ],
)
def test_bad_input_is_422_naming_the_field(tiny_checkpoint, body, field, message):
    with TestClient(create_app(tiny_settings(tiny_checkpoint, max_texts_per_request=3, max_text_chars=40))) as client:
        response = client.post("/classify", content=body, headers={"Content-Type": "application/json"})
    error = error_of(response, 422)
    assert error["type"] == "invalid_request"
    assert error["details"][0]["field"] == field
    assert message in error["details"][0]["message"]
    assert error["message"].startswith(f"{field}: ")


@pytest.mark.parametrize(
    "headers, shown",
    [
        pytest.param(
            {"Content-Type": "application/x-www-form-urlencoded"}, "'application/x-www-form-urlencoded'", id="curl-d"
        ),
        pytest.param({"Content-Type": "text/plain"}, "'text/plain'", id="text-plain"),
        pytest.param({}, "missing", id="no-content-type"),
    ],
)
@pytest.mark.parametrize("path", ["/classify", "/predict", "/"])
def test_a_json_body_sent_as_another_content_type_is_told_to_send_json(tiny_checkpoint, path, headers, shown):
    """`curl -d '{...}'` without -H sends a form's Content-Type: the error says what to send, not "got bytes"."""
    body = json.dumps({"texts": ["a"]} if path == "/classify" else {"inputs": "a"})
    with TestClient(create_app(tiny_settings(tiny_checkpoint))) as client:
        response = client.post(path, content=body, headers=headers)
    error = error_of(response, 422)
    assert error["details"] == [
        {
            "field": "body",
            "message": f"not read as JSON: send 'Content-Type: application/json' (the request's was {shown})",
        }
    ]


@pytest.mark.parametrize(
    "text",
    [
        pytest.param(" ", id="space"),
        pytest.param("\n\t ", id="whitespace"),
        pytest.param("\u200b", id="zero-width-space"),
        pytest.param("\u3000", id="ideographic-space"),
        pytest.param("\ufeff\u2060\u00ad", id="format-characters"),
        pytest.param("\u3164\u2800", id="blank-fillers"),
    ],
)
def test_a_text_with_nothing_visible_is_422_naming_its_index(client, text):
    response = client.post("/classify", json={"texts": ["fine", text, "also fine"]})
    expected = "has no visible characters (only whitespace or invisible format characters)"
    assert error_of(response, 422)["details"] == [{"field": "texts.1", "message": expected}]


def test_the_schema_declares_the_visible_text_rule(client):
    """So that schema-driven clients (and the fuzz test) know which texts the server takes."""
    schema = client.get("/openapi.json").json()["components"]["schemas"]["ClassifyRequest"]
    assert schema["properties"]["texts"]["items"]["pattern"] == visible_character_pattern()


def test_every_bad_text_is_named(tiny_checkpoint):
    with TestClient(create_app(tiny_settings(tiny_checkpoint, max_text_chars=3))) as client:
        response = client.post("/classify", json={"texts": ["ok", "", "fine", "a", ""]})
    fields = [d["field"] for d in error_of(response, 422)["details"]]
    assert fields == ["texts.1", "texts.2", "texts.4"]


def test_a_body_without_json_content_type_is_422(client):
    error = error_of(client.post("/classify", content=b'{"texts": ["a"]}', headers={"Content-Type": "text/plain"}), 422)
    assert error["details"][0]["field"] == "body"


def test_threshold_from_the_checkpoint_decides_the_label(tmp_path, tiny_config, bpe_dir):
    threshold = Threshold("spam", 0.0)  # every probability reaches it
    directory = save_checkpoint(tmp_path / "t", GPTClassifier(tiny_config), bpe_dir, tiny_card(threshold=threshold))
    with TestClient(create_app(tiny_settings(directory))) as client:
        results = client.post("/classify", json={"texts": ["a", "bb", "see you"]}).json()["results"]
        assert client.get("/info").json()["threshold"] == {"label": "spam", "value": 0.0}
    assert [r["label"] for r in results] == ["spam"] * 3


def test_openapi_declares_every_error_of_classify(client):
    spec = client.get("/openapi.json").json()
    responses = spec["paths"]["/classify"]["post"]["responses"]
    assert {"200", "401", "413", "422", "429", "500", "503", "504"} <= set(responses)
    assert "model_error" not in responses["500"]["description"] and "non-finite" in responses["500"]["description"]
    assert responses["429"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorResponse")
    assert "503" in spec["paths"]["/health"]["get"]["responses"]
    assert client.get("/docs").status_code == 200


def test_openapi_declares_the_limits_that_validation_enforces(tiny_checkpoint):
    settings = tiny_settings(tiny_checkpoint, max_texts_per_request=3, max_text_chars=40)
    with TestClient(create_app(settings)) as client:
        texts = client.get("/openapi.json").json()["components"]["schemas"]["ClassifyRequest"]["properties"]["texts"]
        assert (texts["minItems"], texts["maxItems"]) == (1, 3)
        assert (texts["items"]["minLength"], texts["items"]["maxLength"]) == (1, 40)
        at_limits = client.post("/classify", json={"texts": ["x" * 40] * 3})
        over = client.post("/classify", json={"texts": ["x" * 41]})
    assert at_limits.status_code == 200 and over.status_code == 422


def test_a_text_the_model_overflows_on_is_a_model_error_that_changes_no_other_text(tiny_checkpoint, tokenizer):
    """One token's embedding set to 3e38 (finite, so the checkpoint loads and warms up). Not 200 for all with the
    poisoned text at P = 0.5 exactly, and batch-mates whose padding read it also at 0.5."""
    (z,) = tokenizer.encode_ordinary("z")
    edit_tensors(lambda state: state["transformer.wte.weight"][z].fill_(3e38))(tiny_checkpoint)
    recipe = ["a zebra", "hello there", "see you at six"]
    # three clients' texts in one batch, the first row of the batch poisoned; the third client's are all clean
    clients = [["zebra first", "hello there", "ok"], recipe, ["see you at six", "ok"]]
    with TestClient(create_app(tiny_settings(tiny_checkpoint, max_wait_ms=500))) as client:
        with ThreadPoolExecutor(len(clients)) as pool:
            together = list(pool.map(lambda texts: client.post("/classify", json={"texts": texts}), clients))
        metrics = client.get("/metrics").text
        alone = {
            t: client.post("/classify", json={"texts": [t]}).json()["results"][0] for t in ["hello there", *clients[2]]
        }
        poisoned = client.post("/classify", json={"texts": recipe})
        after = client.post("/classify", json={"texts": recipe[1:]})
    assert "spamgpt_batch_size_count 1.0" in metrics and "spamgpt_batch_size_sum 8.0" in metrics  # one batch
    for response in [together[0], together[1], poisoned]:
        error = error_of(response, 500)
        assert error["type"] == "model_error"
        assert error["message"].startswith("texts.0: the model gave non-finite logits (NaN or inf)")
        assert [d["field"] for d in error["details"]] == ["texts.0"]
    assert 'spamgpt_model_errors_total{cause="non_finite_logits"} 2.0' in metrics
    assert 'spamgpt_requests_total{route="/classify",status="500"} 2.0' in metrics
    # the clean client in the same batch, and the server afterwards, get each text's own value
    for response, texts in [(together[2], clients[2]), (after, recipe[1:])]:
        assert response.status_code == 200, response.text
        for result, text in zip(response.json()["results"], texts, strict=True):
            assert result["label"] == alone[text]["label"]
            assert_close(result["probabilities"], alone[text]["probabilities"])
