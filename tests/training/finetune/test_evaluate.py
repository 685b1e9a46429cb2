import json
import sys
from dataclasses import asdict, replace
from fractions import Fraction

import pytest
import torch

from training.finetune import evaluate
from training.finetune.evaluate import (
    ClassMetrics,
    Predictions,
    Rate,
    ThresholdRule,
    choose_threshold,
    classification_metrics,
    evaluation_report,
    precision_recall_curve,
    predict,
    roc_auc,
    roc_curve,
    selection_warning,
    summary,
    write_plots,
    write_report,
)
from training.finetune.loop import EpochMetrics, History
from training.runtime.inference import NonFiniteLogits
from training.runtime.model import GPTClassifier
from training.runtime.tokenizer import encode_batch

LABELS = ["ham", "spam"]
# Spam probabilities and truths, small enough to check by hand (see the comments in the tests).
SPAM_P = [0.9, 0.8, 0.7, 0.6, 0.4, 0.3, 0.2, 0.1]
TRUTH = [1, 1, 0, 1, 0, 0, 1, 0]


def binary(spam_p: list[float], truth: list[int]) -> Predictions:
    p = torch.tensor(spam_p)
    return Predictions(torch.stack([1 - p, p], dim=1), torch.tensor(truth))


def without_rates(per_class: ClassMetrics) -> dict:
    return {k: v for k, v in asdict(per_class).items() if k != "rates"}


def test_metrics_by_hand():
    pred = binary(SPAM_P, TRUTH)
    m = classification_metrics(pred.probs, pred.targets, pred.probs.argmax(dim=1), LABELS)
    # argmax says spam for the first four: ham row [3 right, 1 wrong], spam row [1 missed, 3 right]
    assert m.confusion_matrix == [[3, 1], [1, 3]]
    assert m.accuracy == 0.75 and m.n == 8
    spam = m.per_class["spam"]
    assert without_rates(spam) == {"precision": 0.75, "recall": 0.75, "f1": 0.75, "support": 4}
    # 3 of 4 flagged are spam, 3 of 4 spam flagged, 1 of 4 ham flagged: counts behind the rates and intervals
    assert replace(spam.rates.precision, ci95=None) == Rate(value=0.75, count=3, of=4, ci95=None)
    assert spam.rates.false_positive_rate.count == 1 and spam.rates.false_positive_rate.of == 4
    assert spam.rates.false_positive_rate.ci95 == pytest.approx(evaluate.wilson_interval(1, 4))
    assert m.per_class["ham"].f1 == 0.75
    # spam above ham in 4 + 4 + 3 + 1 of the 16 pairs
    assert m.roc_auc == pytest.approx(12 / 16)


def test_precision_recall_f1_unbalanced():
    pred = binary([0.9, 0.9, 0.9, 0.1, 0.1], [1, 0, 0, 1, 0])
    m = classification_metrics(pred.probs, pred.targets, pred.probs.argmax(dim=1), LABELS)
    spam = m.per_class["spam"]  # 1 of 3 flagged is spam; 1 of 2 spam flagged
    assert (spam.precision, spam.recall) == pytest.approx((1 / 3, 1 / 2))
    assert spam.f1 == pytest.approx(2 * (1 / 3) * (1 / 2) / (1 / 3 + 1 / 2))
    assert m.confusion_matrix == [[1, 2], [1, 1]]


@pytest.mark.parametrize(
    ("scores", "truth", "expected"),
    [
        pytest.param([0.9, 0.1], [1, 0], 1.0, id="perfect"),
        pytest.param([0.1, 0.9], [1, 0], 0.0, id="inverted"),
        pytest.param([0.5, 0.5, 0.5], [1, 0, 0], 0.5, id="ties-count-half"),
        pytest.param([0.8, 0.5, 0.5, 0.2], [1, 1, 0, 0], 0.875, id="one-tie"),
        pytest.param([0.3, 0.2], [1, 1], None, id="one-class"),
    ],
)
def test_roc_auc(scores, truth, expected):
    auc = roc_auc(torch.tensor(scores), torch.tensor(truth).bool())
    assert auc == (pytest.approx(expected) if expected is not None else None)


# Ties: at 0.6 one spam and two ham cross the threshold together.
TIED_P = [0.9, 0.6, 0.6, 0.6, 0.1]
TIED_TRUTH = [1, 1, 0, 0, 0]


def test_curves_and_metrics_with_ties_by_hand():
    scores, positives = torch.tensor(TIED_P), torch.tensor(TIED_TRUTH).bool()
    # thresholds 0.9, 0.6, 0.1 flag TP / FP 1 / 0, 2 / 2, 2 / 3 of 2 spam and 3 ham
    fpr, tpr = roc_curve(scores, positives)
    torch.testing.assert_close(fpr, torch.tensor([0, 0, 2 / 3, 1]))
    torch.testing.assert_close(tpr, torch.tensor([0, 1 / 2, 1, 1]))
    # spam above ham in 3 + 1 pairs, tied in 2 of the 6: (4 + 2 / 2) / 6
    assert roc_auc(scores, positives) == pytest.approx(5 / 6)
    precision, recall = precision_recall_curve(scores, positives)
    torch.testing.assert_close(precision, torch.tensor([1, 2 / 4, 2 / 5]))
    torch.testing.assert_close(recall, torch.tensor([1 / 2, 1, 1]))
    # F1 = 2TP / (TP + FP + 2): 2/3 at 0.9 and at 0.6, 4/7 at 0.1; the higher of the tied thresholds
    assert choose_threshold(scores, positives) == pytest.approx(0.9)
    pred = binary(TIED_P, TIED_TRUTH)
    m = classification_metrics(pred.probs, pred.targets, pred.probs.argmax(dim=1), LABELS)
    # argmax flags 0.9 and the three 0.6: ham row [1 right, 2 flagged], spam row [0 missed, 2 found]
    assert m.confusion_matrix == [[1, 2], [0, 2]]
    assert {label: without_rates(c) for label, c in m.per_class.items()} == {
        "ham": {"precision": 1.0, "recall": pytest.approx(1 / 3), "f1": pytest.approx(1 / 2), "support": 3},
        "spam": {"precision": pytest.approx(2 / 4), "recall": 1.0, "f1": pytest.approx(2 / 3), "support": 2},
    }
    assert (m.accuracy, m.macro_f1, m.roc_auc) == pytest.approx((3 / 5, (1 / 2 + 2 / 3) / 2, 5 / 6))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_threshold_is_the_highest_exact_f1_maximum(seed):
    generator = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, 12, (300,), generator=generator) / 11  # few levels: many ties
    positives = torch.rand(300, generator=generator) < 0.3

    def f1(threshold: float) -> Fraction:  # exact, so that equal F1s tie
        flagged = scores >= threshold
        return Fraction(2 * int((flagged & positives).sum()), int(flagged.sum()) + int(positives.sum()))

    highest_first = sorted(set(scores.tolist()), reverse=True)
    assert choose_threshold(scores, positives) == max(highest_first, key=f1)  # max keeps the first maximum


@pytest.mark.parametrize(
    ("truth", "expected"),
    [
        pytest.param([0, 0, 0], 0.5, id="no-positives"),  # F1 0 everywhere: the highest threshold
        pytest.param([1, 1, 1], 0.3, id="all-positive"),  # recall 1 only when everything is flagged
    ],
)
def test_threshold_with_one_class(truth, expected):
    assert choose_threshold(torch.tensor([0.3, 0.5, 0.5]), torch.tensor(truth).bool()) == pytest.approx(expected)


def test_threshold_maximises_f1():
    # F1 of `p >= t` at each distinct t: .4, .67, .57, .75 (t=0.6), .67, .6, .73, .67
    assert choose_threshold(torch.tensor(SPAM_P), torch.tensor(TRUTH).bool()) == pytest.approx(0.6)


def test_threshold_is_chosen_on_validation_only():
    validation = binary(SPAM_P, TRUTH)
    test_a = binary([0.35, 0.3, 0.25, 0.1], [1, 1, 1, 0])  # on its own it would pick 0.25
    test_b = binary([0.99, 0.01], [0, 1])
    assert choose_threshold(test_a.probs[:, 1], test_a.targets.bool()) == pytest.approx(0.25)
    report_a, report_b = evaluation_report(LABELS, validation, test_a), evaluation_report(LABELS, validation, test_b)
    assert report_a.threshold == report_b.threshold
    assert report_a.threshold.label == "spam" and report_a.threshold.value == pytest.approx(0.6)
    # at 0.6 none of test_a is flagged: recall 0, where argmax found none either and 0.25 would find all
    assert report_a.test.threshold.per_class["spam"].recall == 0.0
    assert report_a.selection.threshold.per_class["spam"].f1 == pytest.approx(0.75)


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        # negatives (ham) at 0.7, 0.4, 0.3, 0.1: flagging at 0.8 flags none of them and 2 of 4 spam; at 0.6, one
        # ham (FPR 0.25) and 3 spam; at 0.2, 3 ham (0.75) and 4 spam
        pytest.param(0.0, 0.8, id="no-false-positives"),
        pytest.param(0.25, 0.6, id="one-of-four"),
        pytest.param(0.2, 0.8, id="just-under-one"),
        pytest.param(0.75, 0.2, id="three-of-four"),
    ],
)
def test_threshold_for_a_target_false_positive_rate(target, expected):
    assert choose_threshold(torch.tensor(SPAM_P), torch.tensor(TRUTH).bool(), "fpr", target) == pytest.approx(expected)


def test_threshold_above_every_score_when_no_threshold_meets_the_target():
    # the highest score is a ham's: any threshold at or below it flags a ham
    chosen = choose_threshold(torch.tensor([0.9, 0.5]), torch.tensor([False, True]), "fpr", 0.0)
    assert chosen > torch.tensor(0.9).item() and chosen <= 1.0  # above 0.9 as a float32 probability is
    assert evaluate.decide(torch.tensor([[0.1, 0.9], [0.5, 0.5]]), LABELS, evaluate.Threshold("spam", chosen)) == [
        "ham",
        "ham",
    ]


def test_unknown_threshold_objective():
    with pytest.raises(ValueError, match=r"objective must be 'f1' or 'fpr', got 'auc'"):
        choose_threshold(torch.tensor(SPAM_P), torch.tensor(TRUTH).bool(), "auc")


@pytest.mark.parametrize(
    ("successes", "n", "expected"),
    [
        # the roots p of (successes / n - p)^2 = z^2 p (1 - p) / n, Wilson's definition, solved by hand
        pytest.param(0, 10, (0.0, 0.2775328), id="none"),
        pytest.param(5, 10, (0.2365931, 0.7634069), id="half"),
        pytest.param(89, 3865, (0.01875082, 0.02825071), id="issue-14-held-out-ham"),
        pytest.param(10, 10, (0.7224672, 1.0), id="all"),
    ],
)
def test_wilson_interval(successes, n, expected):
    assert evaluate.wilson_interval(successes, n) == pytest.approx(expected, abs=1e-7)


def test_wilson_interval_of_nothing():
    assert evaluate.wilson_interval(0, 0) is None


def test_report_on_held_out_rows_and_calibration():
    selection = binary(SPAM_P, TRUTH)
    test = binary([0.9, 0.1], [1, 0])
    evaluation = binary([0.9, 0.1, 0.8, 0.2, 0.7], [1, 0, 0, 0, 0])  # the test rows and three held-out ham
    uncalibrated = binary([0.6, 0.4, 0.6, 0.4, 0.6], [1, 0, 0, 0, 0])
    report = evaluation_report(LABELS, selection, test, evaluation, "fpr", 0.25, uncalibrated)
    assert report.threshold.value == pytest.approx(0.6)
    assert report.threshold_rule == ThresholdRule(objective="fpr", target_fpr=0.25)
    # at 0.6: 0.8 and 0.7 are ham flagged, 2 of 4 ham
    fpr = report.evaluation.threshold.per_class["spam"].rates.false_positive_rate
    assert (fpr.count, fpr.of) == (2, 4)
    assert report.test.threshold.per_class["spam"].rates.false_positive_rate.count == 0
    # top-label ECE: uncalibrated, one bin, 0.6 confident and 3 of 5 right (0.0); calibrated, three bins: 0.9
    # (2 rows, both right), 0.8 (2 rows, 1 right), 0.7 (1 row, wrong)
    ece_after = (2 * 0.1 + 2 * 0.3 + 1 * 0.7) / 5
    assert report.calibration.ece_before == pytest.approx(0.0, abs=1e-6)
    assert report.calibration.ece_after == pytest.approx(ece_after, abs=1e-6)
    headline = summary(report)
    assert headline.threshold.evaluation_false_positive_rate.value == 0.5
    assert headline.threshold.evaluation_false_positive_rate.ci95 == pytest.approx(evaluate.wilson_interval(2, 4))
    # the card's flat record of it
    flat = headline.to_json()
    assert flat["evaluation_false_positive_rate_at_threshold"] == 0.5
    assert flat["evaluation_false_positive_rate_at_threshold_ci95"] == pytest.approx(evaluate.wilson_interval(2, 4))


def test_positive_label_is_spam_wherever_it_sorts():
    report = evaluation_report(["spam", "zzz"], binary(SPAM_P, TRUTH), binary(SPAM_P, TRUTH))
    assert report.threshold.label == "spam"  # column 0 here
    report = evaluation_report(["a", "b"], binary(SPAM_P, TRUTH), binary(SPAM_P, TRUTH))
    assert report.threshold.label == "b"
    assert summary(report).argmax.test_f1 == 0.75 and summary(report).f1_label == "b"


def test_multiclass_has_no_threshold():
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6], [0.5, 0.4, 0.1]])
    pred = Predictions(probs, torch.tensor([0, 1, 2, 1]))
    report = evaluation_report(["a", "b", "c"], pred, pred)
    assert report.threshold is None and set(report.test.decisions()) == {"argmax"}
    assert report.threshold_rule is None  # no threshold objective applies: the argmax decides
    assert report.test.argmax.confusion_matrix == [[1, 0, 0], [1, 1, 0], [0, 0, 1]]
    # one-vs-rest: a 1.0, b 1.0 (0.8, 0.4 over 0.2, 0.2), c 1.0
    assert report.test.argmax.roc_auc == pytest.approx(1.0)
    assert summary(report).f1_label == "macro"


def test_multiclass_auc_averages_the_classes_present():
    probs = torch.tensor([[0.6, 0.3, 0.1], [0.5, 0.4, 0.1], [0.2, 0.5, 0.3], [0.4, 0.4, 0.2]])
    targets = torch.tensor([0, 0, 1, 1])  # no "c": its one-vs-rest area is undefined, not 0
    m = classification_metrics(probs, targets, probs.argmax(dim=1), ["a", "b", "c"])
    # a: 0.6, 0.5 over 0.2, 0.4 (1.0); b: 0.5, 0.4 over 0.3, 0.4 with one tie (3.5 / 4)
    assert m.roc_auc == pytest.approx((1.0 + 0.875) / 2)
    c = m.per_class["c"]
    assert without_rates(c) == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    assert c.rates.recall == Rate(value=None, count=0, of=0, ci95=None)  # undefined, not 0


def test_report_files(tmp_path):
    pred = binary(SPAM_P, TRUTH)
    report = evaluation_report(LABELS, pred, pred)
    history = History([EpochMetrics(epoch=1, train_loss=1.0, train_accuracy=0.5, val_loss=0.9, val_accuracy=0.6)], 1)
    write_report(tmp_path, report, pred, history)
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["test"]["argmax"]["accuracy"] == 0.75 and saved["history"]["best_epoch"] == 1
    pngs = sorted(p.name for p in tmp_path.glob("*.png"))
    assert pngs == ["accuracy.png", "confusion_matrix.png", "loss.png", "precision_recall.png", "roc.png"]
    assert all((tmp_path / name).read_bytes().startswith(b"\x89PNG") for name in pngs)


def test_reliability_diagram(tmp_path):
    pytest.importorskip("matplotlib")
    pred = binary(SPAM_P, TRUTH)
    written = write_plots(tmp_path, evaluation_report(LABELS, pred, pred), pred, None, (pred, pred))
    assert tmp_path / "reliability.png" in written
    # top probability 0.9 / 0.8 / 0.7 / 0.6 twice each (0.1 is ham's 0.9): 2 of 2 right at 0.9, 1 of 2 at 0.7
    bins = {round(confidence, 6): (accuracy, n) for confidence, accuracy, n in evaluate.reliability_bins(pred)}
    assert bins[0.9] == (1.0, 2) and bins[0.7] == (0.5, 2) and sum(n for _, n in bins.values()) == 8


def test_report_without_matplotlib(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # import now raises ImportError
    pred = binary(SPAM_P, TRUTH)
    write_report(tmp_path, evaluation_report(LABELS, pred, pred), pred)
    assert (tmp_path / "metrics.json").is_file() and not list(tmp_path.glob("*.png"))
    assert "matplotlib is not installed" in capsys.readouterr().out


def test_plots_of_a_multiclass_report(tmp_path):
    pytest.importorskip("matplotlib")
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6], [0.5, 0.4, 0.1]])
    pred = Predictions(probs, torch.tensor([0, 1, 2, 1]))
    written = write_plots(tmp_path, evaluation_report(["a", "b", "c"], pred, pred), pred, history=None)
    assert written == [tmp_path / "confusion_matrix.png"]  # no binary threshold: no ROC or precision-recall
    assert written[0].read_bytes().startswith(b"\x89PNG")


def test_plots_without_positives_in_test(tmp_path):
    pytest.importorskip("matplotlib")
    validation, test = binary(SPAM_P, TRUTH), binary([0.9, 0.2], [0, 0])
    written = write_plots(tmp_path, evaluation_report(LABELS, validation, test), test, history=None)
    assert [p.name for p in written] == ["confusion_matrix.png"]  # ROC and recall are undefined


@pytest.mark.parametrize(
    ("cell", "text"),
    [
        pytest.param((0.03, 0.19, 0.42, 1.0), "white", id="dark-blue"),
        pytest.param((0.42, 0.68, 0.84, 1.0), "black", id="mid-blue"),
        pytest.param((0.97, 0.98, 1.0, 1.0), "black", id="near-white"),
    ],
)
def test_confusion_numbers_contrast_with_their_cell(cell, text):
    assert evaluate._text_colour_on(cell) == text


def test_predict_uses_model_probabilities(tiny_config, tokenizer):
    torch.manual_seed(0)
    model = GPTClassifier(tiny_config).eval()
    rows, _ = encode_batch(tokenizer, ["hi there", "win a prize"], 16)
    pred = predict(model, rows, ["spam", "ham"], LABELS)
    assert pred.targets.tolist() == [1, 0]
    torch.testing.assert_close(pred.probs.sum(dim=1), torch.ones(2))
    with pytest.raises(ValueError, match=r"\['eggs'\]"):
        predict(model, rows[:1], ["eggs"], LABELS)


def test_predict_refuses_rows_whose_logits_are_not_finite(tiny_config):
    torch.manual_seed(0)
    model = GPTClassifier(tiny_config).eval()
    with torch.no_grad():
        model.transformer.wte.weight[42] = 3e38  # one token's embedding overflows
    rows = [[5, 6, 7], [8, 42], [9], [42, 10, 11]]
    with pytest.raises(NonFiniteLogits, match=r"for 2 of the rows: 1, 3;") as caught:
        predict(model, rows, ["ham", "spam", "ham", "spam"], LABELS)  # not P = 0.5 made up for rows 1 and 3
    assert caught.value.rows == [1, 3]


@pytest.mark.parametrize(
    ("ham", "objective", "target_fpr", "warned"),
    [
        pytest.param(12, "fpr", 0.01, True, id="12-ham-for-1%"),
        pytest.param(380, "fpr", 0.01, True, id="one-short"),
        pytest.param(381, "fpr", 0.01, False, id="enough"),
        pytest.param(12, "f1", 0.01, False, id="no-rate-asked"),
        pytest.param(5000, "fpr", 0.0, True, id="zero-never-shown"),
    ],
)
def test_selection_warning_when_the_ham_cannot_show_the_target_rate(ham, objective, target_fpr, warned):
    """381 ham with none flagged is the fewest whose 95% Wilson upper bound reaches 1%."""
    targets = torch.tensor([0] * ham + [1] * 10)
    probs = torch.stack([1 - targets.double(), targets.double()], dim=1)
    warning = selection_warning(["ham", "spam"], Predictions(probs, targets), objective, target_fpr)
    assert (warning is not None) == warned
    if ham == 12 and warned:
        assert warning == (
            "too few selection rows for --target-fpr 0.01: 12 'ham' rows, where even none flagged leaves a 95% upper "
            "bound of 0.242 on the false-positive rate; at least 381 rows can show it"
        )
