"""finetune from the feedback store: corrections read as rows (messages as serving reads them), relabelling the rows
they contradict and weighted among the training rows; the report before and after; a new checkpoint worse than the
serving one refused unless forced, leaving the serving one in place."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from tests.helpers import finetune_argv, run_training, write_messages_csv
from training.cli import main
from training.finetune.data import Dataset, Partition, load_dataset
from training.finetune.evaluate import classification_metrics
from training.finetune.feedback import (
    SQLITE_HEADER,
    compare,
    is_feedback_store,
    load_corrections,
    with_corrections,
    worse_than,
)
from training.runtime.checkpoint import REPORT_DIR, load_checkpoint
from training.runtime.feedback import FeedbackStore
from training.runtime.mail import read_message
from training.runtime.model import GPTClassifier
from training.runtime.text import near_duplicate_key

MESSAGE = (
    b"Message-ID: <9@example.org>\r\nSubject: Cheap meds\r\nContent-Type: text/html\r\n\r\n<p>Buy <b>now</b></p>\r\n"
)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, bpe_dir) -> tuple[Path, Path]:
    """Tiny messages and a checkpoint trained on them: the serving one, trained once for the module."""
    directory = tmp_path_factory.mktemp("serving")
    data = write_messages_csv(directory / "messages.csv", n=80)
    run_training(finetune_argv(data, bpe_dir, directory / "ckpt"))
    return data, directory / "ckpt"


@pytest.fixture
def serving(trained, tmp_path) -> tuple[Path, Path]:
    """The data and a copy of the serving checkpoint, which the test's run may replace."""
    data, checkpoint = trained
    return data, Path(shutil.copytree(checkpoint, tmp_path / "ckpt"))


def store_with(path, reports) -> str:
    with FeedbackStore(path, ("ham", "spam")) as store:
        for content, label in reports:
            store.record(content, label)
    return str(path)


def test_corrections_are_read_as_serving_reads_them(tmp_path):
    path = store_with(tmp_path / "feedback.db", [("free prize", "spam"), (MESSAGE, "spam"), ("free prize", "ham")])
    assert is_feedback_store(path) and not is_feedback_store(str(write_messages_csv(tmp_path / "m.csv")))
    rows = load_corrections(path)
    assert rows.texts == ["free prize", read_message(MESSAGE).text] and rows.labels == ["ham", "spam"]
    assert "Buy now" in rows.texts[1] and "<b>" not in rows.texts[1]


@pytest.mark.parametrize(
    ("make", "match"),
    [
        pytest.param(lambda path: None, "no feedback database there", id="missing"),
        pytest.param(lambda path: path.write_bytes(SQLITE_HEADER + b"\x00" * 5000), "feedback.db", id="damaged"),
        pytest.param(lambda path: store_with(path, []), "holds no corrections", id="empty"),
    ],
)
def test_a_store_that_cannot_be_learned_from_is_refused_naming_it(tmp_path, make, match):
    path = tmp_path / "feedback.db"
    make(path)
    with pytest.raises(ValueError, match=match):
        load_corrections(path)


def test_corrections_relabel_the_rows_they_contradict_and_weigh_on_training():
    rows = Dataset(["Free Prize", "see you", "lunch?", "call now"], ["spam", "ham", "ham", "spam"])
    parts = Partition(rows, rows, rows, rows, rows)
    corrections = Dataset(["free  prize", "new one"], ["ham", "spam"])
    mixed = with_corrections(parts, corrections, weight=3)
    for name in ("validation", "test", "selection", "evaluation"):
        assert getattr(mixed, name).texts == ["see you", "lunch?", "call now"], name
    assert mixed.train.texts.count("free  prize") == 3 and "Free Prize" not in mixed.train.texts
    relabelled = zip(mixed.train.texts, mixed.train.labels, strict=True)
    assert [label for text, label in relabelled if near_duplicate_key(text) == "free prize"] == ["ham"] * 3
    with pytest.raises(ValueError, match=r"labels \['eggs'\] are not among the data's labels \['ham', 'spam'\]"):
        with_corrections(parts, Dataset(["x"], ["eggs"]), weight=1)


def metrics(predicted: list[int], targets: list[int]):
    probs = torch.nn.functional.one_hot(torch.tensor(predicted), 2).float()
    return classification_metrics(probs, torch.tensor(targets), torch.tensor(predicted), ["ham", "spam"])


def test_worse_means_beyond_the_serving_ones_95_percent_interval():
    targets = [0] * 100 + [1] * 100
    serving = metrics([0] * 98 + [1] * 2 + [1] * 90 + [0] * 10, targets)  # FPR 2%, recall 90%
    slightly = metrics([0] * 96 + [1] * 4 + [1] * 86 + [0] * 14, targets)  # within both intervals
    assert worse_than(serving, slightly) == []
    flagging = metrics([0] * 85 + [1] * 15 + [1] * 90 + [0] * 10, targets)
    assert worse_than(serving, flagging) == [
        "spam false-positive rate 15.00% is above the serving checkpoint's 95% interval [0.55, 7.00]%"
    ]
    missing = metrics([0] * 98 + [1] * 2 + [1] * 50 + [0] * 50, targets)
    assert [r.split(" is ")[0] for r in worse_than(serving, missing)] == ["spam recall 50.00%"]


def test_an_untrained_model_is_worse_than_a_trained_one(trained, tokenizer):
    data, serving = trained
    checkpoint = load_checkpoint(serving)
    torch.manual_seed(1)
    untrained = GPTClassifier(checkpoint.model.config)
    rows = load_dataset(str(data))
    comparison = compare(serving, untrained, tokenizer, 48, ["ham", "spam"], None, rows, 1, rows)
    assert comparison.worse, comparison.table()
    assert comparison.before.corrections.value > comparison.after.corrections.value
    # --compare-with without feedback: the evaluation rows only
    alone = compare(serving, untrained, tokenizer, 48, ["ham", "spam"], None, Dataset([], []), 1, rows)
    assert alone.worse == comparison.worse and alone.after.corrections is None
    assert "accuracy on the corrections" in alone.table() and "  -" in alone.table()


def test_finetune_learns_from_feedback_and_reports_before_and_after(serving, tmp_path, bpe_dir):
    data, out = serving
    first = data.read_text().splitlines()[1].rsplit(",", 1)[0]  # a ham row of the data, reported as spam
    store = store_with(tmp_path / "feedback.db", [(first, "spam"), ("urgent cash bonus reply", "spam")])
    output = run_training(finetune_argv(data, bpe_dir, out, "--feedback", store, "--overwrite", "--force"))
    assert "accuracy on the corrections" in output and f"serving checkpoint {out}" in output
    report = json.loads((out / REPORT_DIR / "feedback.json").read_text())
    assert (report["corrections"], report["weight"], report["serving"]) == (2, 10, str(out))
    assert report["before"]["corrections"]["of"] == report["after"]["corrections"]["of"] == 2
    card = load_checkpoint(out).card
    assert card.data.fingerprint["feedback"]["rows"] == 2 and card.training["feedback_weight"] == 10


def test_a_worse_checkpoint_is_refused_and_the_serving_one_stays(serving, tmp_path, bpe_dir, capsys):
    data, out = serving
    before = (out / "model.safetensors").read_bytes()
    store = store_with(tmp_path / "feedback.db", [("urgent cash bonus reply", "spam")])
    # a learning rate too small to learn anything: the new checkpoint is no better than random weights
    argv = finetune_argv(data, bpe_dir, out, "--feedback", store, "--overwrite", "--lr", "1e-12", "--epochs", "1")
    assert main(argv) == 1
    error = capsys.readouterr().err
    assert "worse than the serving one" in error and "pass --force" in error and "accuracy on the corrections" in error
    assert (out / "model.safetensors").read_bytes() == before
