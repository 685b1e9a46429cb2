"""Fine-tuning from the corrections users reported (training.runtime.feedback): the feedback store read as data,
alone (`--data feedback.db`) or beside another source (`--feedback feedback.db`, each correction weighted among the
training rows), and the comparison with the serving checkpoint that refuses a new one worse on the evaluation rows.

The serving checkpoint and the new one are compared on the same rows: this run's evaluation rows (never trained on
here) less any the serving checkpoint trained on (its report/split.json), each model deciding by its own threshold.
For a binary model the positive label's false-positive rate and recall are compared, otherwise the accuracy: the new
checkpoint is refused when one of them is worse than the serving one's 95% Wilson interval (above its upper bound
for the false-positive rate, below its lower bound for the others), so that a difference the rows cannot tell from
chance does not block a run and a real loss does.
"""

import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import tiktoken

from training.config import FinetuneConfig
from training.finetune.data import Dataset, Partition, deduplicate, text_id
from training.finetune.evaluate import Metrics, Rate, predict, split_metrics
from training.runtime.checkpoint import SPLIT_FILE, load_checkpoint
from training.runtime.feedback import FeedbackStore, FeedbackStoreError, correction_text
from training.runtime.inference import Threshold, positive_label
from training.runtime.mail import DEFAULT_EXTRACTION, Extraction
from training.runtime.model import GPTClassifier
from training.runtime.text import has_visible_characters, near_duplicate_key
from training.runtime.tokenizer import encode_batch

SQLITE_HEADER = b"SQLite format 3\x00"  # the first 16 bytes of every SQLite database file (sqlite.org/fileformat.html)
COMPARISON_FILE = "feedback.json"  # in the checkpoint's report/: the comparison printed at the end of the run


class WorseThanServing(ValueError):
    """The new checkpoint is worse on the evaluation rows than the serving one beyond its 95% interval; the message
    holds the comparison and how to export it anyway."""


def is_feedback_store(source: str) -> bool:
    """Whether a --data argument names an SQLite file (a feedback store) rather than a table."""
    path = Path(source)
    if not path.is_file():
        return False
    with path.open("rb") as file:
        return file.read(len(SQLITE_HEADER)) == SQLITE_HEADER


def load_corrections(path: str | Path, extraction: Extraction = DEFAULT_EXTRACTION) -> Dataset:
    """The corrections in the feedback store at `path` as rows: each one's text (a message read by `extraction`,
    as serving reads it) and current label, oldest first, deduplicated as any source is. The store is read from one
    snapshot while a server may go on writing it.

    Raises ValueError when `path` is no feedback store (the file named) or holds no correction with visible text."""
    if not Path(path).is_file():
        raise ValueError(f"{path}: no feedback database there")
    try:
        with FeedbackStore(path, labels=()) as store:
            corrections = list(store.corrections())
    except FeedbackStoreError as exc:
        raise ValueError(str(exc)) from None
    texts, labels = [], []
    for correction in corrections:
        text = correction_text(correction, extraction)
        if has_visible_characters(text):
            texts.append(text)
            labels.append(correction.label)
    if len(texts) < len(corrections):
        print(f"{path}: {len(corrections) - len(texts)} reported messages have no readable text; left out")
    if not texts:
        raise ValueError(f"{path}: holds no corrections to learn from")
    return deduplicate(Dataset(texts, labels))


def with_corrections(parts: Partition, corrections: Dataset, weight: int) -> Partition:
    """`parts` less every row a correction relabels (the same near_duplicate_key, in any role: the user said its
    label is wrong), with each correction `weight` times among the training rows.

    Raises ValueError naming correction labels that the other source does not have."""
    known = set(parts.train.labels) | set(parts.evaluation.labels)
    unknown = sorted(set(corrections.labels) - known)
    if unknown:
        raise ValueError(f"the corrections' labels {unknown} are not among the data's labels {sorted(known)}")
    keys = {near_duplicate_key(text) for text in corrections.texts}

    def without(ds: Dataset) -> Dataset:
        kept = [i for i, text in enumerate(ds.texts) if near_duplicate_key(text) not in keys]
        return Dataset([ds.texts[i] for i in kept], [ds.labels[i] for i in kept])

    train = without(parts.train)
    train = Dataset(train.texts + corrections.texts * weight, train.labels + corrections.labels * weight)
    return Partition(
        train, without(parts.validation), without(parts.test), without(parts.selection), without(parts.evaluation)
    )


@dataclass(frozen=True)
class Judged:
    """One model on the corrections and on the compared evaluation rows, deciding as it serves."""

    corrections: Rate | None  # corrections it labels as reported; None without corrections
    evaluation: Metrics  # at its threshold when it has one, else at argmax


def judge(
    model: GPTClassifier,
    enc: tiktoken.Encoding,
    max_tokens: int,
    labels: list[str],
    threshold: Threshold | None,
    corrections: Dataset,
    evaluation: Dataset,
) -> Judged:
    """`model` (with its tokenizer, max_tokens, labels and threshold) on `corrections` and `evaluation` rows."""

    def decided(ds: Dataset) -> Metrics:
        rows, _ = encode_batch(enc, ds.texts, max_tokens)
        metrics = split_metrics(predict(model, rows, ds.labels, labels), labels, threshold)
        return metrics.threshold or metrics.argmax

    if not corrections.texts:
        return Judged(None, decided(evaluation))
    on_corrections = decided(corrections)
    right = sum(on_corrections.confusion_matrix[i][i] for i in range(len(labels)))
    return Judged(Rate.of_counts(right, on_corrections.n), decided(evaluation))


@dataclass(frozen=True)
class Comparison:
    """Before (the serving checkpoint) and after (this run's), on the corrections and the same evaluation rows."""

    serving: str | None  # the serving checkpoint's directory; None when there is none to compare with
    corrections: int  # distinct corrections
    weight: int  # times each counts among the training rows (1 when they are the whole data)
    evaluation_rows: int  # the rows compared
    left_out: int  # this run's evaluation rows left out because the serving checkpoint trained on them
    before: Judged | None
    after: Judged
    worse: list[str]  # why the new checkpoint is refused; empty when it is not

    def table(self) -> str:
        """The comparison as a small table, for the end of the run."""
        columns = ["serving" if self.before else "serving (none)", "new"]
        rows = [("accuracy on the corrections", [j and j.corrections for j in (self.before, self.after)])]
        for name, rate in headline_rates(self.after.evaluation).items():
            before = None if self.before is None else headline_rates(self.before.evaluation)[name]
            rows.append((f"{name} on the evaluation rows", [before, rate]))
        width = max(len(name) for name, _ in rows)
        lines = [f"{'':{width}}  {columns[0]:36}  {columns[1]}"]
        for name, (before, after) in rows:
            shown = [rate.describe() if rate is not None else "-" for rate in (before, after)]
            lines.append(f"{name:{width}}  {shown[0]:36}  {shown[1]}")
        head = (
            f"corrections: {self.corrections}, each weighted {self.weight}; compared on {self.evaluation_rows} "
            f"evaluation rows"
            + (f" ({self.left_out} left out: the serving checkpoint trained on them)" if self.left_out else "")
            + (f"; serving checkpoint {self.serving}" if self.serving else "; no serving checkpoint to compare with")
        )
        return "\n".join([head, *lines])

    def to_json(self) -> dict:
        return asdict(self)


def headline_rates(metrics: Metrics) -> dict[str, Rate]:
    """The rates compared: for a binary model the positive label's false-positive rate and recall (with the label
    in the name), else the accuracy."""
    labels = list(metrics.per_class)
    positive = positive_label(labels)
    if positive is None:
        right = sum(metrics.confusion_matrix[i][i] for i in range(len(labels)))
        return {"accuracy": Rate.of_counts(right, metrics.n)}
    rates = metrics.per_class[positive].rates
    return {f"{positive} false-positive rate": rates.false_positive_rate, f"{positive} recall": rates.recall}


def worse_than(before: Metrics, after: Metrics) -> list[str]:
    """Each compared rate of `after` that is worse than `before`'s 95% interval, as words."""
    reasons = []
    for name, old in headline_rates(before).items():
        new = headline_rates(after)[name]
        if old.ci95 is None or new.value is None:
            continue
        lower_is_better = name.endswith("false-positive rate")
        low, high = old.ci95
        if (new.value > high) if lower_is_better else (new.value < low):
            reasons.append(
                f"{name} {100 * new.value:.2f}% is {'above' if lower_is_better else 'below'} the serving "
                f"checkpoint's 95% interval [{100 * low:.2f}, {100 * high:.2f}]%"
            )
    return reasons


def serving_checkpoint(compare_with: str | None, out: str, learns_from_feedback: bool) -> Path | None:
    """The checkpoint a new one is compared with: `compare_with` when given, else, for a run that learns from
    feedback, the one in `out` that it would replace (None when there is none: nothing to compare with)."""
    if compare_with is not None:
        return Path(compare_with)
    if learns_from_feedback and (Path(out) / "config.json").is_file():
        return Path(out)
    return None


def compare(
    serving: Path | None,
    model: GPTClassifier,
    enc: tiktoken.Encoding,
    max_tokens: int,
    labels: list[str],
    threshold: Threshold | None,
    corrections: Dataset,
    weight: int,
    evaluation: Dataset,
) -> Comparison:
    """The new `model` (with its tokenizer, max_tokens, labels and threshold) against the `serving` checkpoint
    (None: nothing to compare with) on `corrections` and the `evaluation` rows.

    Raises CheckpointError when `serving` cannot be loaded; ValueError when its labels are not `labels`."""
    checkpoint, left_out = None, 0
    if serving is not None:
        checkpoint = load_checkpoint(serving)
        if list(checkpoint.card.labels) != labels:
            raise ValueError(
                f"the serving checkpoint {serving} has labels {list(checkpoint.card.labels)}, this run {labels}: "
                "they cannot be compared (pass another --compare-with)"
            )
        evaluation, left_out = unseen_by(checkpoint.path, evaluation)
    after = judge(model, enc, max_tokens, labels, threshold, corrections, evaluation)
    before = None
    if checkpoint is not None:
        card = checkpoint.card
        model, enc = checkpoint.model, checkpoint.tokenizer
        before = judge(model, enc, card.max_tokens, labels, card.threshold, corrections, evaluation)
    worse = [] if before is None else worse_than(before.evaluation, after.evaluation)
    return Comparison(
        serving=None if serving is None else str(serving),
        corrections=len(corrections.texts),
        weight=weight,
        evaluation_rows=len(evaluation.texts),
        left_out=left_out,
        before=before,
        after=after,
        worse=worse,
    )


def unseen_by(checkpoint_dir: Path, evaluation: Dataset) -> tuple[Dataset, int]:
    """The `evaluation` rows the checkpoint did not train on (by its report/split.json's train ids; all of them
    when it records none), and how many were left out."""
    split = checkpoint_dir / SPLIT_FILE
    if not split.is_file():
        return evaluation, 0
    trained = set(json.loads(split.read_text()).get("train", ()))
    kept = [i for i, text in enumerate(evaluation.texts) if text_id(text) not in trained]
    unseen = Dataset([evaluation.texts[i] for i in kept], [evaluation.labels[i] for i in kept])
    return unseen, len(evaluation.texts) - len(kept)


def compare_with_serving(
    config: FinetuneConfig,
    model: GPTClassifier,
    enc: tiktoken.Encoding,
    max_tokens: int,
    labels: list[str],
    threshold: Threshold | None,
    corrections: Dataset | None,
    evaluation: Dataset,
) -> Comparison | None:
    """For a run that learns from `corrections` (None: it does not) or has config.compare_with: the new `model` (with
    its tokenizer, max_tokens, labels and threshold) compared with the serving checkpoint (serving_checkpoint),
    printed, and refused when worse unless config.force; None for other runs.

    Raises WorseThanServing; what compare raises."""
    serving = serving_checkpoint(config.compare_with, config.out, corrections is not None)
    if corrections is None and serving is None:
        return None
    weight = config.feedback_weight if config.feedback else 1
    rows = Dataset([], []) if corrections is None else corrections
    comparison = compare(serving, model, enc, max_tokens, labels, threshold, rows, weight, evaluation)
    refuse_if_worse(comparison, config.force)
    return comparison


def refuse_if_worse(comparison: Comparison, force: bool) -> None:
    """Prints the comparison; raises WorseThanServing holding it instead when the new checkpoint is worse, unless
    `force`."""
    why = "; ".join(comparison.worse)
    if comparison.worse and not force:
        raise WorseThanServing(
            f"the new checkpoint is worse than the serving one {comparison.serving} on the evaluation rows: {why}; "
            f"nothing was exported (pass --force to export it anyway)\n{comparison.table()}"
        )
    print(comparison.table())
    if comparison.worse:
        print(f"warning: exported although worse than the serving checkpoint (--force): {why}", file=sys.stderr)
