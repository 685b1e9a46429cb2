"""The evaluation report: metrics on validation and test, the decision threshold chosen on validation, plots.

It knows nothing about training loops. Probabilities and thresholded labels come from training.inference
(predict_probabilities, decide), the same code the server runs.
"""

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from training.inference import Threshold, decide, predict_probabilities, require_finite
from training.model import GPTClassifier

EVAL_BATCH_SIZE = 32  # rows per forward pass: no gradients, so larger than training's batches


@dataclass
class Predictions:
    probs: torch.Tensor  # (N, n_labels) float32
    targets: torch.Tensor  # (N,) label indices


def predict(model: GPTClassifier, rows: list[list[int]], labels: list[str], label_names: list[str]) -> Predictions:
    """The model's probabilities for token id `rows` (truncated to its max_tokens) beside their true `labels`.

    Raises ValueError naming labels the model does not know, and training.inference.NonFiniteLogits naming the
    rows (indices into `rows`) whose logits are not finite: no metric is computed from a made-up probability.
    """
    unknown = sorted(set(labels) - set(label_names))
    if unknown:
        raise ValueError(f"labels {unknown!r} are not among the model's labels {label_names!r}")
    targets = torch.tensor([label_names.index(label) for label in labels], dtype=torch.long)
    return Predictions(require_finite(predict_probabilities(model, rows, EVAL_BATCH_SIZE)), targets)


def positive_label(label_names: list[str]) -> str | None:
    """The label a binary threshold applies to: "spam" if present, else the second label; None beyond 2 labels."""
    if len(label_names) != 2:
        return None
    return "spam" if "spam" in label_names else label_names[1]


# --- Curves and metrics ---------------------------------------------------------------------------


def _cumulative_counts(scores: torch.Tensor, positives: torch.Tensor):
    """Distinct thresholds in descending order, with the true and false positives of `score >= threshold`."""
    order = scores.argsort(descending=True)
    scores, positives = scores[order], positives[order].double()
    tps, fps = positives.cumsum(0), (1 - positives).cumsum(0)
    last_of_tie = torch.ones_like(scores, dtype=torch.bool)  # equal scores cross a threshold together
    last_of_tie[:-1] = scores[:-1] != scores[1:]
    return scores[last_of_tie], tps[last_of_tie], fps[last_of_tie]


def roc_curve(scores: torch.Tensor, positives: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """False and true positive rates, from (0, 0) through every distinct threshold to (1, 1)."""
    _, tps, fps = _cumulative_counts(scores, positives)
    zero = tps.new_zeros(1)
    return torch.cat([zero, fps / fps[-1]]), torch.cat([zero, tps / tps[-1]])


def roc_auc(scores: torch.Tensor, positives: torch.Tensor) -> float | None:
    """Area under the ROC curve (ties count half); None when only one class is present."""
    n_pos = int(positives.sum())
    if n_pos in (0, len(positives)):
        return None
    fpr, tpr = roc_curve(scores, positives)
    return float(torch.trapezoid(tpr, fpr))


def precision_recall_curve(scores: torch.Tensor, positives: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Precision and recall of `score >= threshold` at every distinct threshold, highest threshold first."""
    _, tps, fps = _cumulative_counts(scores, positives)
    return tps / (tps + fps), tps / positives.sum().clamp(min=1)


def choose_threshold(scores: torch.Tensor, positives: torch.Tensor) -> float:
    """The score threshold whose `score >= threshold` decision maximises F1 of the positive class."""
    thresholds, tps, fps = _cumulative_counts(scores, positives)
    f1 = 2 * tps / (tps + fps + positives.sum())  # 2TP / (2TP + FP + FN), as TP + FN = all positives
    return float(thresholds[f1.argmax()])  # argmax takes the first maximum: the highest such threshold


def classification_metrics(
    probs: torch.Tensor, targets: torch.Tensor, predicted: torch.Tensor, label_names: list[str]
) -> dict:
    """Accuracy, per-class precision / recall / F1, macro F1, ROC-AUC and the confusion matrix (rows: true)."""
    k = len(label_names)
    confusion = torch.bincount(targets * k + predicted, minlength=k * k).view(k, k)
    tp, predicted_n, true_n = confusion.diag(), confusion.sum(0), confusion.sum(1)
    per_class = {}
    for i, label in enumerate(label_names):
        precision = tp[i].item() / predicted_n[i].item() if predicted_n[i] else 0.0
        recall = tp[i].item() / true_n[i].item() if true_n[i] else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[label] = {"precision": precision, "recall": recall, "f1": f1, "support": true_n[i].item()}
    positive = positive_label(label_names)
    if positive is not None:
        auc = roc_auc(probs[:, label_names.index(positive)], targets == label_names.index(positive))
    else:  # macro average of one-vs-rest areas over the classes where one is defined
        areas = [a for i in range(k) if (a := roc_auc(probs[:, i], targets == i)) is not None]
        auc = sum(areas) / len(areas) if areas else None
    return {
        "n": len(targets),
        "accuracy": (predicted == targets).double().mean().item(),
        "per_class": per_class,
        "macro_f1": sum(c["f1"] for c in per_class.values()) / k,
        "roc_auc": auc,
        "confusion_matrix": confusion.tolist(),
    }


def split_metrics(predictions: Predictions, label_names: list[str], threshold: Threshold | None) -> dict:
    """Metrics at argmax, and with a binary threshold also at that threshold."""
    probs, targets = predictions.probs, predictions.targets
    out = {"argmax": classification_metrics(probs, targets, probs.argmax(dim=1), label_names)}
    if threshold is not None:
        decided = torch.tensor([label_names.index(label) for label in decide(probs, label_names, threshold)])
        out["threshold"] = classification_metrics(probs, targets, decided, label_names)
    return out


def evaluation_report(label_names: list[str], validation: Predictions, test: Predictions) -> dict:
    """Validation and test metrics; the binary threshold is chosen on validation alone, then applied to test.
    The report's "threshold" is a Threshold or None."""
    positive = positive_label(label_names)
    threshold = None
    if positive is not None:
        index = label_names.index(positive)
        threshold = Threshold(positive, choose_threshold(validation.probs[:, index], validation.targets == index))
    return {
        "labels": label_names,
        "threshold": threshold,
        "validation": split_metrics(validation, label_names, threshold),
        "test": split_metrics(test, label_names, threshold),
    }


def summary(report: dict) -> dict:
    """The headline numbers for the model card: test metrics at argmax and, if chosen, at the threshold."""
    positive = positive_label(report["labels"])
    out = {}
    for decision, metrics in report["test"].items():
        suffix = "" if decision == "argmax" else "_at_threshold"
        f1 = metrics["per_class"][positive]["f1"] if positive else metrics["macro_f1"]
        out |= {f"test_accuracy{suffix}": metrics["accuracy"], f"test_f1{suffix}": f1}
    out["test_roc_auc"] = report["test"]["argmax"]["roc_auc"]
    out["validation_accuracy"] = report["validation"]["argmax"]["accuracy"]
    out["f1_label"] = positive or "macro"  # which F1 the test_f1 fields are
    return out


# --- Writing --------------------------------------------------------------------------------------


def write_report(directory: Path, report: dict, test: Predictions, history: dict | None = None) -> None:
    """metrics.json (the report and the training history) and, when matplotlib is installed, PNG plots."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "metrics.json").write_text(json.dumps({**report, "history": history}, indent=2, default=asdict) + "\n")
    write_plots(directory, report, test, history)


def write_plots(directory: Path, report: dict, test: Predictions, history: dict | None) -> list[Path]:
    try:
        from matplotlib.figure import Figure  # no pyplot: no global figure state, no GUI backend
    except ImportError:
        print("note: matplotlib is not installed, so the report has no plots (pip install 'spamgpt[plots]')")
        return []
    written = []

    def save(fig, name: str) -> None:
        fig.tight_layout()
        fig.savefig(directory / name, dpi=100)
        written.append(directory / name)

    if history and history["epochs"]:
        epochs = [e["epoch"] for e in history["epochs"]]
        for metric in ("loss", "accuracy"):
            ax = (fig := Figure(figsize=(5, 3.5))).subplots()
            for split in ("train", "val"):
                ax.plot(epochs, [e[f"{split}_{metric}"] for e in history["epochs"]], marker="o", label=split)
            ax.axvline(history["best_epoch"], color="grey", linestyle=":", label="best epoch")
            ax.set(xlabel="epoch", ylabel=metric, title=f"{metric} per epoch")
            ax.legend()
            save(fig, f"{metric}.png")

    labels, confusion = report["labels"], report["test"]["argmax"]["confusion_matrix"]
    ax = (fig := Figure(figsize=(4, 3.5))).subplots()
    image = ax.imshow(confusion, cmap="Blues")
    for i, row in enumerate(confusion):
        for j, count in enumerate(row):
            ax.text(j, i, str(count), ha="center", va="center")
    ax.set(xticks=range(len(labels)), yticks=range(len(labels)), xticklabels=labels, yticklabels=labels)
    ax.set(xlabel="predicted", ylabel="true", title="test confusion matrix (argmax)")
    fig.colorbar(image)
    save(fig, "confusion_matrix.png")

    positive = positive_label(labels)
    if positive is not None:
        index = labels.index(positive)
        scores, positives = test.probs[:, index], test.targets == index
        if report["test"]["argmax"]["roc_auc"] is not None:
            ax = (fig := Figure(figsize=(4, 4))).subplots()
            ax.plot(*roc_curve(scores, positives))
            ax.plot([0, 1], [0, 1], color="grey", linestyle=":")
            ax.set(xlabel="false positive rate", ylabel="true positive rate", title=f"test ROC ({positive})")
            save(fig, "roc.png")
        precision, recall = precision_recall_curve(scores, positives)
        ax = (fig := Figure(figsize=(4, 4))).subplots()
        ax.plot(recall, precision)
        ax.set(xlabel="recall", ylabel="precision", title=f"test precision-recall ({positive})")
        save(fig, "precision_recall.png")
    return written
