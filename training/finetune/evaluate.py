"""The evaluation report: metrics on the test split and on every held-out row, the decision threshold chosen on
the selection rows (never on evaluation rows), calibration before and after, plots.

It knows nothing about how training runs: it plots the History the loop returns. Probabilities and thresholded
labels come from training.runtime.inference (predict_logits, decide), the same code the server runs. Curves
and metrics come from torchmetrics, the plots from matplotlib (the plots extra; the report is written without them
when it is absent). The report is typed (Report, SplitMetrics, Metrics, ClassMetrics, Rate); metrics.json holds
its to_json().
"""

import json
import math
import sys
import warnings
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import torch
from torchmetrics.functional.classification import (
    binary_auroc,
    binary_average_precision,
    binary_precision_recall_curve,
    binary_roc,
    multiclass_calibration_error,
    multiclass_confusion_matrix,
    multiclass_f1_score,
    multiclass_precision,
    multiclass_recall,
)
from tqdm import tqdm

from training.finetune.loop import History
from training.runtime.inference import Threshold, decide, positive_label, predict_logits, probabilities, require_finite
from training.runtime.model import GPTClassifier

EVAL_BATCH_SIZE = 32  # rows per forward pass: no gradients, so larger than training's batches


@dataclass
class Predictions:
    """A split's probabilities beside its true labels."""

    probs: torch.Tensor  # (N, n_labels) float32
    targets: torch.Tensor  # (N,) label indices


def predict(model: GPTClassifier, rows: list[list[int]], labels: list[str], label_names: list[str]) -> Predictions:
    """The model's probabilities for token id `rows` (truncated to its max_tokens) beside their true `labels`.

    Raises ValueError naming labels the model does not know, and training.runtime.inference.NonFiniteLogits naming the
    rows (indices into `rows`) whose logits are not finite: no metric is computed from a made-up probability.
    """
    unknown = sorted(set(labels) - set(label_names))
    if unknown:
        raise ValueError(f"labels {unknown!r} are not among the model's labels {label_names!r}")
    targets = torch.tensor([label_names.index(label) for label in labels], dtype=torch.long)
    with tqdm(total=len(rows), desc="scoring", unit="row", file=sys.stderr, dynamic_ncols=True) as bar:
        logits = predict_logits(model, rows, EVAL_BATCH_SIZE, on_batch=bar.update)
    return Predictions(require_finite(probabilities(logits)), targets)


# --- Curves and metrics ---------------------------------------------------------------------------
# Scores are probabilities in [0, 1]: torchmetrics takes anything outside that range for logits and applies a sigmoid.


def _cumulative_counts(scores: torch.Tensor, positives: torch.Tensor):
    """Distinct thresholds in descending order, with the true and false positives of `score >= threshold`.

    Read back from torchmetrics' ROC: its rates are counts over class totals, so rate * total rounds back to the
    exact count (to well under half a count below 2**23 samples), and equal F1s below still tie exactly.
    """
    with warnings.catch_warnings():  # a class is absent: its rates are zeros, which are still the right counts
        warnings.filterwarnings("ignore", "No (positive|negative) samples in targets", UserWarning)
        fpr, tpr, thresholds = binary_roc(scores, positives.long())
    n_pos = int(positives.sum())
    tps, fps = (tpr.double() * n_pos).round(), (fpr.double() * (len(positives) - n_pos)).round()
    return thresholds[1:], tps[1:], fps[1:]  # [0] is the (0, 0) point torchmetrics puts above every score


def roc_curve(scores: torch.Tensor, positives: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """False and true positive rates, from (0, 0) through every distinct threshold to (1, 1)."""
    fpr, tpr, _ = binary_roc(scores, positives.long())
    return fpr, tpr


def roc_auc(scores: torch.Tensor, positives: torch.Tensor) -> float | None:
    """Area under the ROC curve (ties count half); None when only one class is present."""
    n_pos = int(positives.sum())
    if n_pos in (0, len(positives)):
        return None
    return binary_auroc(scores, positives.long()).item()


def precision_recall_curve(scores: torch.Tensor, positives: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Precision and recall of `score >= threshold` at every distinct threshold, highest threshold first."""
    precision, recall, _ = binary_precision_recall_curve(scores, positives.long())
    # torchmetrics orders them lowest threshold first and ends with (precision 1, recall 0), above every score
    return precision[:-1].flip(0), recall[:-1].flip(0)


def choose_threshold(
    scores: torch.Tensor, positives: torch.Tensor, objective: str = "f1", target_fpr: float = 0.0
) -> float:
    """The score threshold of the decision `score >= threshold` that is best for `objective`:
    "f1": the highest F1 of the positive class; "fpr": the highest recall (true-positive rate) among thresholds
    whose false-positive rate (negatives at or above it, over all negatives) is at most target_fpr.
    Ties go to the highest threshold. When even the highest score's FPR is over the target, the threshold lies
    just above every score (nothing is flagged; 1.0 at most).

    Raises ValueError for an unknown objective.
    """
    thresholds, tps, fps = _cumulative_counts(scores, positives)
    if objective == "f1":
        goal = 2 * tps / (tps + fps + positives.sum())  # 2TP / (2TP + FP + FN), as TP + FN = all positives
    elif objective == "fpr":
        negatives = max(1, len(positives) - int(positives.sum()))
        allowed = fps / negatives <= target_fpr + 1e-12  # a count exactly at the target is allowed
        if not allowed.any():
            above = torch.nextafter(thresholds[0].float(), torch.tensor(math.inf))  # the next float32 up
            return min(1.0, float(above))
        goal = torch.where(allowed, tps, -1.0)
    else:
        raise ValueError(f"objective must be 'f1' or 'fpr', got {objective!r}")
    return float(thresholds[goal.argmax()])  # argmax takes the first maximum: the highest such threshold


# --- Rates with confidence intervals ---------------------------------------------------------------

Z95 = 1.959963984540054  # the standard normal's 0.975 quantile: two-sided 95%


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float] | None:
    """The Wilson score interval of a binomial proportion `successes` / `n` (95% for the default z), or None for
    n = 0. Wilson (1927), "Probable inference, the law of succession, and statistical inference", JASA 22; the
    interval Brown, Cai & DasGupta (2001), "Interval Estimation for a Binomial Proportion", recommend for small n
    and for rates near 0, where the normal approximation's interval collapses or leaves [0, 1]."""
    if n == 0:
        return None
    p, z2 = successes / n, z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def selection_warning(
    label_names: list[str], selection: Predictions, objective: str, target_fpr: float, z: float = Z95
) -> str | None:
    """Why the selection rows cannot show the false-positive rate `target_fpr` asks for (objective "fpr", binary
    labels), or None when they can.

    The rule is the Wilson interval's: with no negative row flagged among n, its 95% upper bound of the rate is
    z^2 / (n + z^2), so n must reach z^2 (1 - target) / target (381 for 1%) before any threshold can be shown to hold
    the target; fewer, and the threshold chosen meets the target only on rows too few to tell.
    """
    positive = positive_label(label_names)
    if objective != "fpr" or positive is None:
        return None
    negatives = int((selection.targets != label_names.index(positive)).sum())
    upper = 1.0 if negatives == 0 else wilson_interval(0, negatives, z)[1]
    if upper <= target_fpr:
        return None
    others = ", ".join(repr(label) for label in label_names if label != positive)
    needed = f"at least {math.ceil(z * z * (1 - target_fpr) / target_fpr)}" if target_fpr > 0 else "no number of"
    return (
        f"too few selection rows for --target-fpr {target_fpr}: {negatives} {others} rows, where even none flagged "
        f"leaves a 95% upper bound of {upper:.3f} on the false-positive rate; {needed} rows can show it"
    )


@dataclass(frozen=True)
class Rate:
    """`count` of `of` rows: `value` their share (None for of = 0), `ci95` its 95% Wilson interval (None for
    of = 0). In metrics.json: {"value", "count", "of", "ci95": [low, high]}."""

    value: float | None
    count: int
    of: int
    ci95: tuple[float, float] | None

    @classmethod
    def of_counts(cls, successes: int, n: int) -> "Rate":
        """successes / n with its Wilson interval."""
        return cls(successes / n if n else None, successes, n, wilson_interval(successes, n))

    def describe(self) -> str:
        """The rate as "2.30% [1.87, 2.83] (89 / 3,865)", or "n/a (0 / 0)"."""
        if self.value is None:
            return "n/a (0 / 0)"
        low, high = self.ci95
        return f"{100 * self.value:.2f}% [{100 * low:.2f}, {100 * high:.2f}] ({self.count:,} / {self.of:,})"


@dataclass(frozen=True)
class ClassRates:
    """One class c's rates with their intervals. For spam, the false-positive rate is the share of ham flagged."""

    precision: Rate  # rows predicted c that are c
    recall: Rate  # rows that are c predicted c
    false_positive_rate: Rate  # rows of other classes predicted c


def class_rates(confusion: torch.Tensor) -> list[ClassRates]:
    """Each class's ClassRates, in index order, from a (k, k) confusion matrix (rows: true)."""
    out = []
    for c in range(len(confusion)):
        hits, predicted, true = int(confusion[c, c]), int(confusion[:, c].sum()), int(confusion[c].sum())
        others = int(confusion.sum()) - true
        out.append(
            ClassRates(
                precision=Rate.of_counts(hits, predicted),
                recall=Rate.of_counts(hits, true),
                false_positive_rate=Rate.of_counts(predicted - hits, others),
            )
        )
    return out


@dataclass(frozen=True)
class ClassMetrics:
    """One class's scores: precision, recall and F1 in [0, 1] (0 where undefined: nothing predicted, or nothing
    true, as that class), its support (true rows) and its rates with intervals."""

    precision: float
    recall: float
    f1: float
    support: int
    rates: ClassRates


@dataclass(frozen=True)
class Metrics:
    """One decision rule's metrics on one set of rows."""

    n: int  # rows
    accuracy: float
    per_class: dict[str, ClassMetrics]  # by label, in label order
    macro_f1: float
    roc_auc: float | None  # the positive label's, or the macro one-vs-rest average; None with one class present
    confusion_matrix: list[list[int]]  # rows: true labels, columns: predicted, in label order


def classification_metrics(
    probs: torch.Tensor, targets: torch.Tensor, predicted: torch.Tensor, label_names: list[str]
) -> Metrics:
    """Metrics of `predicted` (N,) label indices against `targets` (N,), with (N, n_labels) `probs` for ROC-AUC."""
    k = len(label_names)
    confusion = multiclass_confusion_matrix(predicted, targets, num_classes=k)  # rows: true, columns: predicted
    by_name = {"precision": multiclass_precision, "recall": multiclass_recall, "f1": multiclass_f1_score}
    scores = {name: metric(predicted, targets, num_classes=k, average="none") for name, metric in by_name.items()}
    rates = class_rates(confusion)
    per_class = {
        label: ClassMetrics(
            **{name: values[i].item() for name, values in scores.items()},
            support=confusion[i].sum().item(),
            rates=rates[i],
        )
        for i, label in enumerate(label_names)
    }
    return Metrics(
        n=len(targets),
        accuracy=(predicted == targets).double().mean().item(),
        per_class=per_class,
        macro_f1=sum(c.f1 for c in per_class.values()) / k,
        roc_auc=_roc_auc(probs, targets, label_names),
        confusion_matrix=confusion.tolist(),
    )


def _roc_auc(probs: torch.Tensor, targets: torch.Tensor, label_names: list[str]) -> float | None:
    """The positive label's ROC-AUC; beyond two labels the macro average of the one-vs-rest areas over the classes
    where one is defined (torchmetrics would count the rest 0)."""
    positive = positive_label(label_names)
    if positive is not None:
        return roc_auc(probs[:, label_names.index(positive)], targets == label_names.index(positive))
    areas = [a for i in range(len(label_names)) if (a := roc_auc(probs[:, i], targets == i)) is not None]
    return sum(areas) / len(areas) if areas else None


@dataclass(frozen=True)
class SplitMetrics:
    """A split's metrics at argmax and, for a binary model with a threshold, at that threshold. In metrics.json:
    {"argmax": ..., "threshold": ...}, without "threshold" when there is none."""

    argmax: Metrics
    threshold: Metrics | None = None

    def decisions(self) -> dict[str, Metrics]:
        """{"argmax": ..., "threshold": ...}: the rules measured, argmax first."""
        return {"argmax": self.argmax} | ({} if self.threshold is None else {"threshold": self.threshold})

    def to_json(self) -> dict:
        """metrics.json's shape."""
        return {name: asdict(metrics) for name, metrics in self.decisions().items()}


def split_metrics(predictions: Predictions, label_names: list[str], threshold: Threshold | None) -> SplitMetrics:
    """Metrics at argmax, and with a binary threshold also at that threshold."""
    probs, targets = predictions.probs, predictions.targets
    at_argmax = classification_metrics(probs, targets, probs.argmax(dim=1), label_names)
    if threshold is None:
        return SplitMetrics(at_argmax)
    decided = torch.tensor([label_names.index(label) for label in decide(probs, label_names, threshold)])
    return SplitMetrics(at_argmax, classification_metrics(probs, targets, decided, label_names))


def expected_calibration_error(predictions: Predictions, n_bins: int = 15) -> float:
    """Top-label expected calibration error (Guo et al. 2017): |accuracy - confidence| over n_bins equal-width
    bins of the top probability, weighted by the bins' shares of rows (torchmetrics)."""
    probs, targets = predictions.probs, predictions.targets
    k = probs.shape[1]
    return multiclass_calibration_error(probs, targets, num_classes=k, n_bins=n_bins, norm="l1").item()


@dataclass(frozen=True)
class ThresholdRule:
    """What chose a threshold on the selection rows (choose_threshold): target_fpr only for objective "fpr"."""

    objective: str
    target_fpr: float | None


@dataclass(frozen=True)
class CalibrationErrors:
    """Expected calibration error of the evaluation rows before and after calibration, over n rows."""

    ece_before: float
    ece_after: float
    n: int


@dataclass(frozen=True)
class Report:
    """The evaluation report: metrics on the selection rows, the test split and the evaluation rows (test and the
    held-out rows), at the threshold the rule chose on the selection rows alone. metrics.json holds to_json()."""

    labels: list[str]
    threshold: Threshold | None  # None beyond two labels: the argmax decides
    threshold_rule: ThresholdRule | None
    selection: SplitMetrics
    test: SplitMetrics
    evaluation: SplitMetrics
    calibration: CalibrationErrors | None = None  # measured when the uncalibrated probabilities were given

    def to_json(self) -> dict:
        """metrics.json's shape (without the history): a key per field, "calibration" only when measured."""
        out = {
            "labels": self.labels,
            "threshold": None if self.threshold is None else asdict(self.threshold),
            "threshold_rule": None if self.threshold_rule is None else asdict(self.threshold_rule),
        }
        out |= {name: getattr(self, name).to_json() for name in ("selection", "test", "evaluation")}
        return out | ({} if self.calibration is None else {"calibration": asdict(self.calibration)})


def evaluation_report(
    label_names: list[str],
    selection: Predictions,
    test: Predictions,
    evaluation: Predictions | None = None,
    objective: str = "f1",
    target_fpr: float = 0.0,
    uncalibrated: Predictions | None = None,
) -> Report:
    """Metrics on the selection rows, the test split and the evaluation rows (None: the test split); the binary
    threshold is chosen on the selection rows alone (choose_threshold's objective and target_fpr), then applied to
    the others.

    uncalibrated: the evaluation rows' probabilities before calibration; with it, the report's calibration holds
    the expected calibration error of both (after: `evaluation`'s).
    """
    evaluation = test if evaluation is None else evaluation
    positive = positive_label(label_names)
    threshold, rule = None, None
    if positive is not None:
        index = label_names.index(positive)
        value = choose_threshold(selection.probs[:, index], selection.targets == index, objective, target_fpr)
        threshold = Threshold(positive, value)
        rule = ThresholdRule(objective, target_fpr if objective == "fpr" else None)
    calibration = None
    if uncalibrated is not None:
        before, after = expected_calibration_error(uncalibrated), expected_calibration_error(evaluation)
        calibration = CalibrationErrors(before, after, len(evaluation.targets))
    return Report(
        labels=label_names,
        threshold=threshold,
        threshold_rule=rule,
        selection=split_metrics(selection, label_names, threshold),
        test=split_metrics(test, label_names, threshold),
        evaluation=split_metrics(evaluation, label_names, threshold),
        calibration=calibration,
    )


@dataclass(frozen=True)
class Headline:
    """One decision rule's headline numbers: test accuracy and F1 (the positive label's, or macro), and for a
    binary model the positive label's false-positive rate and recall on the evaluation rows."""

    test_accuracy: float
    test_f1: float
    evaluation_false_positive_rate: Rate | None
    evaluation_recall: Rate | None

    def to_json(self, suffix: str) -> dict:
        """The card's flat keys, each name followed by `suffix`; a rate as its value and its "_ci95"."""
        out = {f"test_accuracy{suffix}": self.test_accuracy, f"test_f1{suffix}": self.test_f1}
        for name in ("false_positive_rate", "recall"):
            rate = getattr(self, f"evaluation_{name}")
            if rate is not None:
                out[f"evaluation_{name}{suffix}"] = rate.value
                out[f"evaluation_{name}{suffix}_ci95"] = rate.ci95
        return out


@dataclass(frozen=True)
class Summary:
    """The headline numbers the model card records ("metrics" in config.json, flat: to_json)."""

    argmax: Headline
    threshold: Headline | None  # at the chosen threshold; None without one
    test_roc_auc: float | None
    selection_accuracy: float
    f1_label: str  # which F1 the headlines' test_f1 is: the positive label, or "macro"
    calibration: CalibrationErrors | None

    def to_json(self) -> dict:
        """config.json's "metrics": test_accuracy, test_f1, evaluation_false_positive_rate (and _ci95),
        evaluation_recall (and _ci95), the same at the threshold with the suffix _at_threshold, test_roc_auc,
        selection_accuracy, f1_label and, when measured, evaluation_ece_before and evaluation_ece_after."""
        out = self.argmax.to_json("")
        out |= {} if self.threshold is None else self.threshold.to_json("_at_threshold")
        out |= {"test_roc_auc": self.test_roc_auc, "selection_accuracy": self.selection_accuracy}
        out["f1_label"] = self.f1_label
        if self.calibration is not None:
            out |= {"evaluation_ece_before": self.calibration.ece_before}
            out |= {"evaluation_ece_after": self.calibration.ece_after}
        return out

    def headline(self, threshold: Threshold | None) -> str:
        """One line of the test metrics, at argmax and at `threshold` (the card's)."""

        def num(x):
            return "n/a" if x is None else f"{x:.4f}"

        line = (
            f"test accuracy {num(self.argmax.test_accuracy)}, F1 ({self.f1_label}) {num(self.argmax.test_f1)}, "
            f"ROC-AUC {num(self.test_roc_auc)}"
        )
        if threshold is not None and self.threshold is not None:
            line += (
                f"; at threshold {threshold.label} >= {threshold.value:.3f}: accuracy "
                f"{num(self.threshold.test_accuracy)}, F1 {num(self.threshold.test_f1)}"
            )
        return line


def summary(report: Report) -> Summary:
    """The report's headline numbers: test metrics at argmax and, if chosen, at the threshold; for a binary model
    the false-positive rate and recall of the positive label on the evaluation rows, with their 95% intervals;
    calibration errors when measured."""
    positive = positive_label(report.labels)

    def headline(test: Metrics, evaluation: Metrics) -> Headline:
        if positive is None:
            return Headline(test.accuracy, test.macro_f1, None, None)
        rates = evaluation.per_class[positive].rates
        return Headline(test.accuracy, test.per_class[positive].f1, rates.false_positive_rate, rates.recall)

    at_threshold = None
    if report.test.threshold is not None:
        at_threshold = headline(report.test.threshold, report.evaluation.threshold)
    return Summary(
        argmax=headline(report.test.argmax, report.evaluation.argmax),
        threshold=at_threshold,
        test_roc_auc=report.test.argmax.roc_auc,
        selection_accuracy=report.selection.argmax.accuracy,
        f1_label=positive or "macro",
        calibration=report.calibration,
    )


# --- Writing --------------------------------------------------------------------------------------


def write_report(
    directory: Path,
    report: Report,
    test: Predictions,
    history: History | None = None,
    calibration: tuple[Predictions, Predictions] | None = None,
) -> None:
    """metrics.json (the report and the training history) and, when matplotlib is installed, PNG plots."""
    directory.mkdir(parents=True, exist_ok=True)
    saved = report.to_json() | {"history": None if history is None else history.to_json()}
    (directory / "metrics.json").write_text(json.dumps(saved, indent=2) + "\n")
    write_plots(directory, report, test, history, calibration)


def write_plots(
    directory: Path,
    report: Report,
    test: Predictions,
    history: History | None,
    calibration: tuple[Predictions, Predictions] | None = None,
) -> list[Path]:
    """PNG plots of the test split at argmax, of the training history and, given the evaluation rows' predictions
    (before, after) calibration, their reliability diagram; none, with a note, without matplotlib."""
    try:
        from matplotlib.figure import Figure  # no pyplot: no global figure state, no GUI backend
    except ImportError:
        print("note: matplotlib is not installed, so the report has no plots (pip install 'spamgpt[plots]')")
        return []
    figure = partial(Figure, layout="constrained")  # sizes titles, labels and colour bar to fit: nothing clipped
    figures = {}
    if history and history.epochs:
        for metric in ("loss", "accuracy"):
            figures[f"{metric}.png"] = _history_plot(figure, history, metric)
    labels, test_metrics = report.labels, report.test.argmax
    figures["confusion_matrix.png"] = _confusion_plot(figure, labels, test_metrics)
    positive = positive_label(labels)
    if positive is not None:
        index = labels.index(positive)
        scores, positives = test.probs[:, index], test.targets == index
        if test_metrics.roc_auc is not None:
            figures["roc.png"] = _roc_plot(figure, scores, positives, positive, test_metrics.roc_auc)
        if positives.any():  # without positives, recall is undefined
            figures["precision_recall.png"] = _precision_recall_plot(figure, scores, positives, positive)
    if calibration is not None:
        figures["reliability.png"] = _reliability_plot(figure, *calibration)
    for name, fig in figures.items():
        fig.savefig(directory / name, dpi=100)
    return [directory / name for name in figures]


RATE_AXIS = (-0.02, 1.02)  # 0 to 1, with a margin so that a curve along an edge is not hidden by the frame


def _history_plot(figure, history: History, metric: str):
    ax = (fig := figure(figsize=(5, 3.5))).subplots()
    epochs = [e.epoch for e in history.epochs]
    for split in ("train", "val"):
        ax.plot(epochs, [getattr(e, f"{split}_{metric}") for e in history.epochs], marker="o", label=split)
    ax.axvline(history.best_epoch, color="grey", linestyle=":", label="best epoch")
    ax.set_xticks(epochs[:: math.ceil(len(epochs) / 10)])  # whole epochs, at most about ten ticks
    # half an epoch of margin, so that a best epoch at either end is not drawn on the frame
    ax.set(xlabel="epoch", ylabel=metric, title=f"{metric} per epoch", xlim=(epochs[0] - 0.5, epochs[-1] + 0.5))
    ax.legend()
    return fig


def _confusion_plot(figure, labels: list[str], metrics: Metrics):
    confusion, size = metrics.confusion_matrix, 0.6 * len(labels)  # inches for each row and column
    ax = (fig := figure(figsize=(3.3 + size, 2.8 + size))).subplots()
    # from zero, so that colour reads as a count; vmax at least 1 so that an all-zero matrix still has a scale
    image = ax.imshow(confusion, cmap="Blues", vmin=0, vmax=max(1, max(map(max, confusion))))
    for i, row in enumerate(confusion):
        for j, count in enumerate(row):
            colour = _text_colour_on(image.cmap(image.norm(count)))
            ax.text(j, i, f"{count:,}", ha="center", va="center", color=colour, fontsize="large")
    ticks = range(len(labels))
    rotation = {} if len(labels) == 2 else {"rotation": 45, "ha": "right", "rotation_mode": "anchor"}
    ax.set_xticks(ticks, labels, **rotation)
    ax.set_yticks(ticks, labels)
    ax.set(xlabel="predicted", ylabel="true")
    fig.suptitle(f"test confusion matrix (argmax), n = {metrics.n:,}")  # over the colour bar too
    _integer_ticks(fig.colorbar(image, label="texts").ax.yaxis)
    return fig


def _integer_ticks(axis) -> None:
    """Ticks on whole numbers only (epochs, counts)."""
    from matplotlib.ticker import MaxNLocator  # here, as matplotlib is optional; write_plots checked it is installed

    axis.set_major_locator(MaxNLocator(integer=True))


def _text_colour_on(rgba) -> str:
    """Black or white, whichever contrasts more with `rgba` (WCAG relative luminance; they tie at 0.179)."""
    linear = [c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4 for c in rgba[:3]]
    luminance = 0.2126 * linear[0] + 0.7152 * linear[1] + 0.0722 * linear[2]
    return "white" if luminance < 0.179 else "black"


def _roc_plot(figure, scores: torch.Tensor, positives: torch.Tensor, positive: str, auc: float):
    ax = (fig := figure(figsize=(4.5, 4.5))).subplots()
    ax.plot(*roc_curve(scores, positives), label=f"{positive} (AUC = {auc:.3f})")
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", label="chance (AUC = 0.5)")
    ax.set(xlim=RATE_AXIS, ylim=RATE_AXIS, aspect="equal", xlabel="false positive rate", ylabel="true positive rate")
    ax.set_title(f"test ROC, n = {len(positives):,}")
    ax.legend(loc="lower right")
    return fig


def _precision_recall_plot(figure, scores: torch.Tensor, positives: torch.Tensor, positive: str):
    precision, recall = precision_recall_curve(scores, positives)
    average_precision = binary_average_precision(scores, positives.long()).item()
    ax = (fig := figure(figsize=(4.5, 4.5))).subplots()
    # each threshold's precision holds from the recall of the threshold above it: the area is average precision
    ax.step(
        [0.0, *recall.tolist()],
        [precision[0].item(), *precision.tolist()],
        where="pre",
        label=f"{positive} (AP = {average_precision:.3f})",
    )
    share = positives.double().mean().item()
    ax.axhline(share, color="grey", linestyle=":", label=f"chance (precision = {share:.3f})")
    ax.set(xlim=RATE_AXIS, ylim=RATE_AXIS, aspect="equal", xlabel="recall", ylabel="precision")
    ax.set_title(f"test precision-recall, n = {len(positives):,}")
    ax.legend(loc="best")  # below the curve; where depends on the class balance
    return fig


def reliability_bins(predictions: Predictions, n_bins: int = 15) -> list[tuple[float, float, int]]:
    """(mean top probability, accuracy, rows) of each non-empty bin of n_bins equal-width bins of the top
    probability: the points of a reliability diagram (Guo et al. 2017), the bins expected_calibration_error uses."""
    confidence, predicted = predictions.probs.max(dim=1)
    correct = (predicted == predictions.targets).double()
    bins = (confidence.double() * n_bins).ceil().clamp(1, n_bins).long() - 1  # (lo, hi] as torchmetrics bins
    out = []
    for b in range(n_bins):
        in_bin = bins == b
        if in_bin.any():
            out.append((confidence[in_bin].double().mean().item(), correct[in_bin].mean().item(), int(in_bin.sum())))
    return out


def _reliability_plot(figure, before: Predictions, after: Predictions):
    ax = (fig := figure(figsize=(4.5, 4.5))).subplots()
    for name, predictions in (("before", before), ("after", after)):
        points = reliability_bins(predictions)
        ece = expected_calibration_error(predictions)
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=f"{name} (ECE = {ece:.4f})")
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", label="perfect calibration")
    ax.set(xlim=RATE_AXIS, ylim=RATE_AXIS, aspect="equal", xlabel="top probability", ylabel="accuracy")
    ax.set_title(f"reliability, evaluation rows, n = {len(after.targets):,}")
    ax.legend(loc="lower right")
    return fig
