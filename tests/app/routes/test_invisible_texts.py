"""A text with nothing visible (training.runtime.text) is refused alike everywhere: 422 naming its place on /classify,
TEI's /predict and the Inference API's root, a bad row named by its line in `predict`."""

import json

import pytest
import torch
from fastapi.testclient import TestClient

from app.main import create_app
from tests.helpers import tiny_card, tiny_settings
from training.cli import main
from training.runtime.checkpoint import save_checkpoint
from training.runtime.model import GPTClassifier

NOTHING_VISIBLE = "has no visible characters (only whitespace or invisible format characters)"
INVISIBLE = [
    pytest.param("\ud800", id="lone-surrogate"),
    pytest.param("\udfff\ud800", id="reversed-surrogates"),
    pytest.param("\uffff\ufdd0", id="noncharacters"),
    pytest.param("\u2065\ufff0", id="unassigned-default-ignorable"),
    pytest.param("\u180b\ufe0f\u034f", id="ignorable-marks"),
    pytest.param("\u3164\u2800", id="blank-fillers"),
    pytest.param("\u2028\u2029\u00a0", id="separators"),
    pytest.param("\u200b\u00ad\x00", id="format-and-control"),
]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tiny_config, bpe_dir):
    torch.manual_seed(0)
    return save_checkpoint(tmp_path_factory.mktemp("ckpt"), GPTClassifier(tiny_config), bpe_dir, tiny_card())


@pytest.fixture(scope="module")
def client(checkpoint):
    with TestClient(create_app(tiny_settings(checkpoint))) as client:
        yield client


def post(client: TestClient, path: str, body: dict):
    """ASCII JSON: a lone surrogate travels as its \\u escape, as JSON allows and clients send it."""
    return client.post(path, content=json.dumps(body), headers={"Content-Type": "application/json"})


@pytest.mark.parametrize("text", INVISIBLE)
@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        pytest.param("/classify", lambda t: {"texts": ["fine", t]}, "texts.1", id="classify"),
        pytest.param("/predict", lambda t: {"inputs": ["fine", t]}, "inputs.1", id="tei-list"),
        pytest.param("/predict", lambda t: {"inputs": [["fine"], [t]]}, "inputs.1", id="tei-batch"),
        pytest.param("/predict", lambda t: {"inputs": t}, "inputs", id="tei-one"),
        pytest.param("/", lambda t: {"inputs": ["fine", t]}, "inputs.1", id="inference-api-list"),
        pytest.param("/", lambda t: {"inputs": t}, "inputs", id="inference-api-one"),
    ],
)
def test_every_route_refuses_it_naming_its_place(client, path, body, field, text):
    response = post(client, path, body(text))
    assert response.status_code == 422, response.text
    assert response.json()["error"]["details"] == [{"field": field, "message": NOTHING_VISIBLE}]


@pytest.mark.parametrize("text", INVISIBLE)
def test_predict_names_it_as_a_bad_row(tmp_path, checkpoint, text):
    data, out = tmp_path / "in.jsonl", tmp_path / "out.csv"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in ("fine", text, "ok")))
    argv = ["predict", "--checkpoint", str(checkpoint), "--data", str(data), "--out", str(out)]
    assert main([*argv, "--device", "cpu", "--no-progress"]) == 0
    bad = [json.loads(line) for line in (tmp_path / "out.csv.bad-rows.jsonl").read_text().splitlines()]
    assert bad == [{"line": 2, "error": "'text' has no visible characters"}]
