"""Calibration: temperature scaling and prior correction, folded into the head; a checkpoint served at another prior;
the exports giving the calibrated probabilities."""

import json
import math

import pytest
import torch

from tests.helpers import calibrated_checkpoint
from training.runtime.checkpoint import load_checkpoint
from training.runtime.inference import (
    Threshold,
    binary_prior,
    calibrate_logits,
    decide,
    fold_calibration,
    predict_logits,
    predict_probabilities,
    prior_shift,
    shift_threshold,
)
from training.runtime.model import GPTClassifier
from training.runtime.tokenizer import encode_batch

LABELS = ("ham", "spam")
TEXTS = ["WINNER!! Claim your free prize now", "See you at 5?", "the cat sat on the mat " * 5, "ok"]
UNIFORM = {"ham": 0.5, "spam": 0.5}


def test_fold_gives_the_calibrated_logits(tiny_config, tokenizer):
    torch.manual_seed(0)
    model = GPTClassifier(tiny_config)
    rows, _ = encode_batch(tokenizer, TEXTS, 48)
    raw = predict_logits(model, rows)
    shift = prior_shift(UNIFORM, {"ham": 0.9, "spam": 0.1}, LABELS)
    fold_calibration(model, 1.7, shift)
    torch.testing.assert_close(predict_logits(model, rows), calibrate_logits(raw, 1.7, shift), rtol=0, atol=1e-6)


def test_prior_shift_is_bayes_rule():
    # the odds of spam move by the ratio of the priors' odds: from 1:1 to 13:87
    logits = torch.tensor([[0.3, 1.1]])
    shifted = calibrate_logits(logits, 1.0, prior_shift(UNIFORM, {"ham": 0.87, "spam": 0.13}, LABELS))
    p_before, p_after = torch.softmax(logits, 1)[0, 1].item(), torch.softmax(shifted, 1)[0, 1].item()
    odds = (p_after / (1 - p_after)) / (p_before / (1 - p_before))
    assert odds == pytest.approx(0.13 / 0.87, rel=1e-5)


def test_shifted_threshold_keeps_every_decision():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(1000, 2, generator=g) * 3
    threshold = Threshold("spam", 0.3)
    shift = prior_shift({"ham": 0.87, "spam": 0.13}, {"ham": 0.99, "spam": 0.01}, LABELS)
    moved = shift_threshold(threshold, shift, LABELS)
    assert moved.value < threshold.value  # spam is rarer: the same decisions need a lower probability
    before = decide(torch.softmax(logits, 1), LABELS, threshold)
    after = decide(torch.softmax(calibrate_logits(logits, 1.0, shift), 1), LABELS, moved)
    assert sum(a != b for a, b in zip(before, after, strict=True)) <= 1  # one row may sit on the float boundary


def test_binary_prior_refuses():
    assert binary_prior(0.05, LABELS) == {"spam": 0.05, "ham": 0.95}
    with pytest.raises(ValueError, match=r"a prior must give each of"):
        binary_prior(1.0, LABELS)
    with pytest.raises(ValueError, match=r"a single prior rate needs a binary model"):
        binary_prior(0.1, ("a", "b", "c"))


def test_checkpoint_served_at_another_prior(tmp_path, tiny_config, bpe_dir, tokenizer):
    ckpt = calibrated_checkpoint(tmp_path / "ckpt", tiny_config, bpe_dir)
    rows, _ = encode_batch(tokenizer, TEXTS, 48)
    default = load_checkpoint(ckpt)
    assert default.card.calibration.prior == {"ham": 0.87, "spam": 0.13}
    told = load_checkpoint(ckpt, prior=0.01)
    assert told.card.calibration.prior == pytest.approx({"spam": 0.01, "ham": 0.99})
    assert list(told.card.calibration.prior) == list(LABELS)  # in label order, as /info shows the card's own
    (p, decided), (q, told_decided) = (c.readout.read(predict_logits(c.model, rows)) for c in (default, told))
    p, q = p[:, 1].double(), q[:, 1].double()
    odds_ratio = (q / (1 - q)) / (p / (1 - p))
    expected = torch.full_like(odds_ratio, (0.01 / 0.99) / (0.13 / 0.87))
    torch.testing.assert_close(odds_ratio, expected, rtol=1e-4, atol=0)
    # decisions stay: the card states the threshold moved with the probabilities; the readout decides as before
    assert told.card.threshold.value < default.card.threshold.value
    assert told_decided == decided == decide(torch.stack([1 - p, p], 1), LABELS, default.card.threshold)


def test_an_uncalibrated_checkpoint_serves_as_before_and_refuses_a_prior(tiny_checkpoint):
    assert load_checkpoint(tiny_checkpoint).card.calibration is None
    with pytest.raises(ValueError, match=r"records no calibration \(it was not written by finetune\)"):
        load_checkpoint(tiny_checkpoint, prior=0.1)


def test_exports_give_the_calibrated_probabilities(tmp_path, tiny_config, bpe_dir):
    pytest.importorskip("transformers")
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from training.export.formats import export_hf

    ckpt = calibrated_checkpoint(tmp_path / "ckpt", tiny_config, bpe_dir, temperature=0.5)
    ours = load_checkpoint(ckpt)
    rows, _ = encode_batch(ours.tokenizer, TEXTS, ours.card.max_tokens)
    expected = predict_probabilities(ours.model, rows)
    hf = export_hf(ckpt, tmp_path / "hf")
    tokenizer, model = AutoTokenizer.from_pretrained(hf), AutoModelForSequenceClassification.from_pretrained(hf)
    got = torch.cat([torch.softmax(model(**tokenizer([t], return_tensors="pt")).logits, -1) for t in TEXTS])
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    assert not math.isclose(expected[0, 1].item(), 0.5)  # the head is not flat: the comparison says something
    recorded = json.loads((hf / "config.json").read_text())["spamgpt"]["calibration"]
    assert recorded == {"temperature": 0.5, "training_prior": UNIFORM, "prior": {"ham": 0.87, "spam": 0.13}}
