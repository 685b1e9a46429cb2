"""A deployment prior moves probabilities, never decisions: texts whose probability sits exactly on the threshold,
or one float32 step below it, keep their labels at every prior, on /classify and in `predict`."""

import csv
import json
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient

from app.main import create_app
from tests.helpers import calibrated_checkpoint, edit_card, tiny_settings
from training.cli import main
from training.runtime.inference import Readout, Threshold, prior_shift, shift_threshold

LABELS = ("ham", "spam")
TEXT = "A £400 XMAS REWARD IS WAITING FOR YOU!"
# the rates the fault was reported at, then a sweep across (0, 1)
PRIORS = [0.134, 0.3, 0.05, 0.001, 0.01, 0.02, 0.1, 0.13, 0.135, 0.2, 0.25, 0.4, 0.5, 0.6, 0.75, 0.9, 0.99, 0.999]


def classify(checkpoint: Path, prior: float | None = None) -> tuple[dict, dict]:
    """/classify's result for TEXT, sent alone, and /info, from a server at `prior`."""
    with TestClient(create_app(tiny_settings(checkpoint, prior=prior))) as client:
        response = client.post("/classify", json={"texts": [TEXT]})
        assert response.status_code == 200, response.text
        return response.json()["results"][0], client.get("/info").json()


@pytest.fixture(scope="module", params=["on", "below"])
def boundary(request, tmp_path_factory, tiny_config, bpe_dir) -> tuple[Path, str, float]:
    """A calibrated checkpoint whose threshold is TEXT's served P(spam) ("on": spam) or the next float32 above it
    ("below": ham), with the label TEXT gets and its P(spam) without a prior."""
    checkpoint = calibrated_checkpoint(tmp_path_factory.mktemp("ckpt"), tiny_config, bpe_dir)
    p_spam = classify(checkpoint)[0]["probabilities"]["spam"]
    assert 0.05 < p_spam < 0.95  # far from 0 and 1: every prior moves it
    value = p_spam if request.param == "on" else torch.nextafter(torch.tensor(p_spam), torch.tensor(1.0)).item()
    edit_card(threshold={"label": "spam", "value": value})(checkpoint)
    label = "spam" if request.param == "on" else "ham"
    result, info = classify(checkpoint)
    assert (result["label"], result["probabilities"]["spam"], info["threshold"]["value"]) == (label, p_spam, value)
    return checkpoint, label, p_spam


@pytest.mark.parametrize("prior", PRIORS)
def test_classify_keeps_the_label_of_a_text_on_the_threshold(boundary, prior):
    checkpoint, label, p_spam = boundary
    result, info = classify(checkpoint, prior)
    assert result["label"] == label
    assert (result["probabilities"]["spam"] == p_spam) is (prior == 0.13)  # moved, unless at the card's own prior
    saved = Threshold("spam", json.loads((checkpoint / "config.json").read_text())["threshold"]["value"])
    card_prior = {"ham": 0.87, "spam": 0.13}
    in_force = shift_threshold(saved, prior_shift(card_prior, {"ham": 1 - prior, "spam": prior}, LABELS), LABELS)
    assert info["threshold"] == {"label": "spam", "value": in_force.value}
    assert info["prior"] == pytest.approx({"ham": 1 - prior, "spam": prior})


@pytest.mark.parametrize("prior", [None, *PRIORS])
def test_predict_keeps_the_label_of_a_text_on_the_threshold(tmp_path, boundary, prior):
    checkpoint, label, _ = boundary
    data, out = tmp_path / "in.txt", tmp_path / "out.csv"
    data.write_text(TEXT + "\n")
    told = [] if prior is None else ["--prior", str(prior)]
    argv = ["predict", "--checkpoint", str(checkpoint), "--data", str(data), "--out", str(out), *told]
    assert main([*argv, "--device", "cpu", "--no-progress"]) == 0
    with open(out, newline="") as f:
        (row,) = csv.DictReader(f)
    assert row["label"] == label
    assert float(row["probability_spam"]) == pytest.approx(classify(checkpoint, prior)[0]["probabilities"]["spam"])


def test_readout_decides_on_the_unshifted_logits_at_every_prior():
    """Logits whose softmax sits on, just below and just above a threshold, and random ones: the labels at every
    prior are the labels without one, while the reported probabilities follow Bayes' rule."""
    g = torch.Generator().manual_seed(0)
    logits = torch.cat([torch.randn(2000, 2, generator=g) * 3, torch.tensor([[0.0, 0.0], [0.0, 1e-7], [1e-7, 0.0]])])
    threshold = Threshold("spam", 0.5)
    plain_probs, plain_labels = Readout(LABELS, threshold).read(logits)
    for prior in PRIORS:
        shift = prior_shift({"ham": 0.87, "spam": 0.13}, {"ham": 1 - prior, "spam": prior}, LABELS)
        probs, labels = Readout(LABELS, threshold, shift).read(logits)
        assert labels == plain_labels
        ratio = (probs[:, 1] / probs[:, 0]).double() / (plain_probs[:, 1] / plain_probs[:, 0]).double()
        bayes = torch.full_like(ratio, (prior / (1 - prior)) / (0.13 / 0.87))
        torch.testing.assert_close(ratio, bayes, rtol=1e-4, atol=0)
