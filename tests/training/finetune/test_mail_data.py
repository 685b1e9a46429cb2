"""`finetune --data DIR` on mail folders: one label per folder or mbox file, messages read by read_message, duplicates
removed before splitting, unreadable messages skipped by name, bad layouts refused with a named line; the card records
the extraction and `evaluate` reads the messages by it."""

import json
import random
from pathlib import Path

import pytest

from tests.helpers import HAM_WORDS, SPAM_WORDS, finetune_argv
from training.cli import main
from training.finetune.data import load_dataset, load_mail
from training.runtime.checkpoint import load_checkpoint
from training.runtime.mail import DEFAULT_EXTRACTION, read_message


def message(subject: str, body: str) -> bytes:
    return f"From: a@example.com\r\nSubject: {subject}\r\n\r\n{body}\r\n".encode()


def mail_folders(root: Path, n: int = 40, seed: int = 0) -> Path:
    """`n` distinct messages, spam in spam/ (files) and ham in ham.mbox, from different words."""
    rng = random.Random(seed)
    (root / "spam").mkdir(parents=True)
    mbox = []
    for i in range(n):
        words = SPAM_WORDS if i % 2 else HAM_WORDS
        raw = message(" ".join(rng.sample(words, 3)), " ".join(rng.sample(words, 5)) + f" {i}")
        if i % 2:
            (root / "spam" / f"{i:03}.eml").write_bytes(raw)
        else:
            mbox.append(b"From a@example.com Thu Aug 22 13:17:22 2002\n" + raw.replace(b"\r\n", b"\n") + b"\n")
    (root / "ham.mbox").write_bytes(b"".join(mbox))
    return root


def test_a_mail_directory_is_texts_read_by_read_message_labelled_by_folder(tmp_path):
    root = mail_folders(tmp_path / "mail", n=6)
    ds = load_dataset(str(root))
    assert ds.labels == ["ham", "ham", "ham", "spam", "spam", "spam"]
    assert ds.texts[3] == read_message((root / "spam" / "001.eml").read_bytes(), DEFAULT_EXTRACTION).text


def test_unreadable_messages_are_skipped_by_name(tmp_path, capsys):
    root = mail_folders(tmp_path / "mail", n=6)
    (root / "spam" / "empty.eml").write_bytes(b"")
    (root / "spam" / "zeros.eml").write_bytes(b"\0" * 512)
    (root / "README").write_text("what these folders hold\n")
    ds = load_mail(root)
    assert len(ds.texts) == 6
    err = capsys.readouterr().err
    assert f"{root}/spam/empty.eml: an empty file; skipped" in err
    assert f"{root}/spam/zeros.eml: not a message: it does not start with a header field" in err
    assert f"{root}/README: not in a label folder; skipped" in err


@pytest.mark.parametrize(
    ("layout", "message"),
    [
        pytest.param({}, "no label folders: put each label's messages in a folder named after it", id="empty"),
        pytest.param({"notes.eml": b"x"}, "no label folders", id="no label folders"),
        pytest.param({"spam/1.eml": message("a", "b")}, "at least 2 labels, found only ['spam']", id="one label"),
        pytest.param(
            {"spam/1.eml": message("a", "b"), "ham/.keep": b""},
            "no readable message for the label(s) ['ham']",
            id="an empty label folder",
        ),
        pytest.param(
            {"spam/1.eml": message("a", "b"), "Spam/2.eml": message("c", "d"), "ham/3.eml": message("e", "f")},
            "the label folders 'Spam' and 'spam' differ only by case",
            id="labels that differ by case",
        ),
    ],
)
def test_a_directory_that_cannot_train_is_refused_with_a_named_line(tmp_path, bpe_dir, capsys, layout, message):
    root = tmp_path / "mail"
    root.mkdir()
    for name, content in layout.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(content)
    assert main(finetune_argv(root, bpe_dir, tmp_path / "out")) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {root}: ") and message in err, err
    assert not (tmp_path / "out").exists()


def test_finetune_on_mail_records_the_extraction_and_drops_duplicates_before_splitting(tmp_path, bpe_dir, capsys):
    root = mail_folders(tmp_path / "mail")
    (root / "spam" / "copy.eml").write_bytes((root / "spam" / "001.eml").read_bytes())  # exact duplicate
    near = read_message((root / "spam" / "003.eml").read_bytes(), DEFAULT_EXTRACTION).text
    subject, _, body = near.removeprefix("Subject: ").partition("\n\n")
    (root / "spam" / "near.eml").write_bytes(message(subject.upper(), body + "  "))  # the same but case and spaces
    assert main(finetune_argv(root, bpe_dir, tmp_path / "out", "--epochs", "1")) == 0
    assert "dropped 1 exact and 1 near duplicates" in capsys.readouterr().out
    card = load_checkpoint(tmp_path / "out").card
    assert card.extraction == DEFAULT_EXTRACTION and card.data.source == str(root)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["extraction"] == DEFAULT_EXTRACTION.to_json()
    assert main(["evaluate", "--checkpoint", str(tmp_path / "out"), "--data", str(root), "--device", "cpu"]) == 0
    assert "n 40, accuracy" in capsys.readouterr().out


def test_a_checkpoint_trained_on_texts_records_no_extraction(tmp_path, tiny_checkpoint):
    assert load_checkpoint(tiny_checkpoint).card.extraction is None
