"""How much each correction should weigh when finetune learns from the feedback store beside its usual data: a model
trained on the SMS data, corrected with a few dozen real mails it got wrong (the SpamAssassin public corpus), retrained
with each --feedback-weight; reported: accuracy on the corrections, on other mails of the corpus it never saw, and
the false-positive rate and recall on the SMS evaluation rows (finetune's own comparison, report/feedback.json).

    python -m benchmarks.feedback_finetune                          # tiny model, 2 epochs, weights 1 10 30
    python -m benchmarks.feedback_finetune --weights 1 10 --epochs 1

Every run trains from random weights with the same seed and split, so the runs differ only by the corrections'
weight. The checkpoints stay in benchmarks/checkpoints/feedback/ and are reused by the next run (the corrections are
chosen by the same seed from the same serving model); delete that directory to train them again. A tiny random-init
model is weak on SMS already and weaker on mail: the comparison between weights is the point, not the absolute
numbers.
"""

import argparse
import json
import random
from pathlib import Path

from benchmarks.common import (
    BPE_DIR,
    ROOT,
    SHARED_DATA,
    SMS_FILE,
    count,
    print_table,
    require_shared_data,
    write_result,
)
from training.config import BaseModelConfig, DataConfig, FinetuneConfig, TrainConfig
from training.finetune.feedback import COMPARISON_FILE
from training.finetune.pipeline import finetune
from training.runtime.checkpoint import REPORT_DIR
from training.runtime.classifier import Classifier
from training.runtime.feedback import FeedbackStore
from training.runtime.mail import read_message
from training.runtime.options import ClassifierOptions

CORPUS = SHARED_DATA / "spamassassin-public-corpus"
WORK = ROOT / "benchmarks" / "checkpoints" / "feedback"  # git-ignored, as the other benchmarks' checkpoints


def mail(label: str) -> list[Path]:
    return sorted((CORPUS / label).glob("*.eml"))


def labels_given(checkpoint: Path, messages: list[Path]) -> list[str]:
    """The checkpoint's label for each message, read as serving reads it."""
    classifier = Classifier.load(checkpoint, ClassifierOptions(device="cpu"))
    return [p.label for p in classifier.classify([read_message(m.read_bytes()).text for m in messages])]


def accuracy(checkpoint: Path, messages: dict[str, list[Path]]) -> float:
    paths = [m for ms in messages.values() for m in ms]
    truth = [label for label, ms in messages.items() for _ in ms]
    given = labels_given(checkpoint, paths)
    return sum(g == t for g, t in zip(given, truth, strict=True)) / len(truth)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", type=int, nargs="+", default=[1, 10, 30])
    parser.add_argument("--epochs", type=count, default=2)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--corrections-per-label", type=count, default=20)
    parser.add_argument("--unseen-per-label", type=count, default=100, help="other mails, never reported")
    parser.add_argument("--seed", type=int, default=123)
    args = parser.parse_args()
    require_shared_data()
    WORK.mkdir(parents=True, exist_ok=True)

    def config(out: Path, **extra) -> FinetuneConfig:
        base = BaseModelConfig(preset=args.preset, init="random", tokenizer_dir=str(BPE_DIR))
        train = TrainConfig(trainable="all", epochs=args.epochs, seed=args.seed, device="cpu")
        return FinetuneConfig(DataConfig(str(SMS_FILE)), base, train, out=str(out), overwrite=True, **extra)

    serving = WORK / "serving"
    if not (serving / "config.json").is_file():
        finetune(config(serving))

    # the corrections: mails of each label the serving model gets wrong, as users would report them
    rng = random.Random(args.seed)
    pools = {label: rng.sample(mail(label), len(mail(label))) for label in ("ham", "spam")}
    corrections, unseen = {}, {}
    for label, pool in pools.items():
        unseen[label] = pool[: args.unseen_per_label]
        rest = pool[args.unseen_per_label :][: 20 * args.corrections_per_label]
        wrong = [m for m, given in zip(rest, labels_given(serving, rest), strict=True) if given != label]
        corrections[label] = wrong[: args.corrections_per_label]
    store_path = WORK / "feedback.db"
    store_path.unlink(missing_ok=True)
    with FeedbackStore(store_path, ("ham", "spam")) as store:
        for label, messages in corrections.items():
            for message in messages:
                store.record(message.read_bytes(), label, source="benchmark")

    rows = []
    serving_unseen = accuracy(serving, unseen)
    for weight in args.weights:
        out = WORK / f"weight-{weight}"
        if not (out / REPORT_DIR / COMPARISON_FILE).is_file():  # kept from an earlier run of the same corrections
            feedback = {"feedback": str(store_path), "feedback_weight": weight}
            finetune(config(out, **feedback, compare_with=str(serving), force=True))
        comparison = json.loads((out / REPORT_DIR / COMPARISON_FILE).read_text())
        before, after = comparison["before"], comparison["after"]

        def rate(judged: dict, name: str) -> float:
            return judged["evaluation"]["per_class"]["spam"]["rates"][name]["value"]

        rows.append(
            {
                "weight": weight,
                "corrections": comparison["corrections"],
                "corrections_accuracy_before": before["corrections"]["value"],
                "corrections_accuracy_after": after["corrections"]["value"],
                "unseen_mail_accuracy_before": serving_unseen,
                "unseen_mail_accuracy_after": accuracy(out, unseen),
                "sms_fpr_before": rate(before, "false_positive_rate"),
                "sms_fpr_after": rate(after, "false_positive_rate"),
                "sms_recall_before": rate(before, "recall"),
                "sms_recall_after": rate(after, "recall"),
                "refused_without_force": bool(comparison["worse"]),
                "evaluation_rows": comparison["evaluation_rows"],
            }
        )
    print_table(rows)
    counts = {label: len(ms) for label, ms in corrections.items()}
    settings = {**vars(args), "corrections_by_label": counts, "unseen_by_label": {k: len(v) for k, v in unseen.items()}}
    path = write_result("feedback_finetune", {"settings": settings, "runs": rows})
    print(f"written to {path}")


if __name__ == "__main__":
    main()
