"""`python -m training predict` on mail: a directory of label folders, a Maildir, an .eml, an mbox; one record per
message with its path, mbox number, Message-ID and folder label, scored as the server scores a message; unreadable
messages are bad rows naming their file; resuming is refused against another folder."""

import csv
import json
import os
from pathlib import Path

import pytest

import training.runtime.mail_sources
from tests.helpers import tiny_settings
from training.cli import main
from training.runtime.classifier import Classifier


def message(subject: str, body: str = "see you at lunch", message_id: str | None = None) -> bytes:
    headers = f"From: a@example.com\r\nSubject: {subject}\r\n"
    headers += f"Message-ID: <{message_id}@example.com>\r\n" if message_id else ""
    return (headers + "\r\n" + body + "\r\n").encode()


def mbox(*messages: bytes) -> bytes:
    return b"".join(b"From a@example.com Thu Aug 22 13:17:22 2002\n" + m.replace(b"\r\n", b"\n") for m in messages)


def predict(*argv) -> int:
    return main(["predict", "--device", "cpu", "--no-progress", *map(str, argv)])


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def labelled_folder(root: Path) -> Path:
    (root / "spam").mkdir(parents=True)
    (root / "ham" / "cur").mkdir(parents=True)
    (root / "spam" / "1.eml").write_bytes(message("WIN a prize", "claim your cash now " * 50, message_id="one"))
    (root / "spam" / "2.eml").write_bytes(b"")
    (root / "ham" / "cur" / "3").write_bytes(message("lunch?", message_id="three"))
    (root / "ham.mbox").write_bytes(mbox(message("dinner", "at home tonight"), message("later")))
    return root


def test_a_labelled_folder_gives_one_record_per_message_as_the_server_scores_it(tmp_path, tiny_checkpoint, capsys):
    root = labelled_folder(tmp_path / "mail")
    out = tmp_path / "scores.jsonl"
    assert predict("--checkpoint", tiny_checkpoint, "--data", root, "--out", out) == 0
    rows = read_jsonl(out)
    assert [(r["message"], r["path"], r["mbox_message"], r["message_id"], r["true_label"]) for r in rows] == [
        (1, "ham/cur/3", None, "<three@example.com>", "ham"),
        (2, "ham.mbox", 1, None, "ham"),
        (3, "ham.mbox", 2, None, "ham"),
        (4, "spam/1.eml", None, "<one@example.com>", "spam"),
    ]
    classifier = Classifier.load(tiny_checkpoint, tiny_settings(tiny_checkpoint).classifier_options())
    raws = [(root / "ham/cur/3").read_bytes(), (root / "spam/1.eml").read_bytes()]
    expected = [p for _, p in classifier.classify_messages(raws)]
    for row, want in zip([rows[0], rows[3]], expected, strict=True):
        assert row["label"] == want.label and row["tokens"] == want.tokens and row["truncated"] == want.truncated
        assert row["probability_spam"] == pytest.approx(want.probabilities["spam"], abs=1e-6)
    # longer than the card's 48 tokens: read in its first window, the default rule (docs/mail.md)
    assert rows[3]["truncated"] and rows[3]["tokens"] == 48
    assert read_jsonl(tmp_path / "scores.jsonl.bad-rows.jsonl") == [
        {"message": 5, "error": "spam/2.eml: an empty file"}
    ]
    assert f"{root}, message 5: spam/2.eml: an empty file; skipped" in capsys.readouterr().err
    summary = json.loads((tmp_path / "scores.jsonl.summary.json").read_text())
    assert summary["rows_scored"] == 4 and summary["bad_rows"] == 1 and summary["run"]["input"]["files"] == 4


def test_csv_output_of_a_maildir_without_labels(tmp_path, tiny_checkpoint):
    (tmp_path / "Maildir" / "new").mkdir(parents=True)
    (tmp_path / "Maildir" / "new" / "1").write_bytes(message("hello"))
    out = tmp_path / "scores.csv"
    assert predict("--checkpoint", tiny_checkpoint, "--data", tmp_path / "Maildir", "--out", out) == 0
    header = out.read_text().splitlines()[0]
    assert header.startswith("path,mbox_message,message_id,message,label,probability_ham,probability_spam")


def test_an_eml_file_and_an_mbox_without_its_suffix(tmp_path, tiny_checkpoint):
    (tmp_path / "one.eml").write_bytes(message("one"))
    (tmp_path / "inbox").write_bytes(mbox(message("a"), message("b")))
    assert predict("--checkpoint", tiny_checkpoint, "--data", tmp_path / "one.eml", "--out", tmp_path / "a.jsonl") == 0
    assert len(read_jsonl(tmp_path / "a.jsonl")) == 1
    argv = ("--checkpoint", tiny_checkpoint, "--data", tmp_path / "inbox", "--input-format", "mbox")
    assert predict(*argv, "--out", tmp_path / "b.jsonl") == 0
    assert [r["mbox_message"] for r in read_jsonl(tmp_path / "b.jsonl")] == [1, 2]


def test_a_rerun_resumes_on_the_same_folder_and_is_refused_on_another(tmp_path, tiny_checkpoint, capsys):
    root = labelled_folder(tmp_path / "mail")
    out = tmp_path / "scores.jsonl"
    assert predict("--checkpoint", tiny_checkpoint, "--data", root, "--out", out) == 0
    first = out.read_text()
    assert predict("--checkpoint", tiny_checkpoint, "--data", root, "--out", out) == 0
    assert out.read_text() == first and "resuming: 4 rows already" in capsys.readouterr().out
    (root / "spam" / "4.eml").write_bytes(message("one more"))  # the folder changed
    assert predict("--checkpoint", tiny_checkpoint, "--data", root, "--out", out) == 1
    assert "was made by another run (another input" in capsys.readouterr().err
    assert out.read_text() == first
    assert predict("--checkpoint", tiny_checkpoint, "--data", root, "--out", out, "--mail-windows", "max") == 1


def test_an_output_inside_the_input_folder_is_refused(tmp_path, tiny_checkpoint, capsys):
    root = labelled_folder(tmp_path / "mail")
    with pytest.raises(SystemExit):
        predict("--checkpoint", tiny_checkpoint, "--data", root, "--out", root / "scores.jsonl")
    assert "inside the input folder, where it would be read as mail" in capsys.readouterr().err


def test_each_bad_input_is_a_bad_row_naming_its_file_and_the_run_goes_on(tmp_path, tiny_checkpoint, capsys):
    root = tmp_path / "mail"
    (root / "spam").mkdir(parents=True)
    bad = {
        "empty.eml": b"",
        "zeros.eml": b"\0" * 4096,
        "notes.txt": b"not a message, just notes\n",
        "broken.mbox": b"Fro m a@example.com Thu Aug 22 13:17:22 2002\nSubject: x\n\nbody\n",
    }
    for name, content in bad.items():
        (root / "spam" / name).write_bytes(content)
    (root / "spam" / os.fsdecode(b"caf\xe9.eml")).write_bytes(message("a name that is not UTF-8"))
    out = tmp_path / "scores.csv"
    assert predict("--checkpoint", tiny_checkpoint, "--data", root, "--out", out) == 0
    errors = dict(row["error"].split(": ", 1) for row in read_jsonl(tmp_path / "scores.csv.bad-rows.jsonl"))
    no_header = "not a message: it does not start with a header field"
    assert errors == {
        "spam/broken.mbox": "not an mbox: its first line starts b'Fro m', not with a 'From ' line",
        "spam/empty.eml": "an empty file",
        "spam/notes.txt": f"{no_header} (b'not a message, just ')",
        "spam/zeros.eml": f"{no_header} ({bytes(20)!r})",
    }
    err = capsys.readouterr().err
    assert all(f"{root}, message " in line for line in err.splitlines() if "skipped" in line)
    with open(out, newline="", encoding="utf-8") as f:
        (row,) = list(csv.DictReader(f))
    assert row["path"] == "spam/caf\\xe9.eml" and row["true_label"] == "spam"


def test_a_bad_message_of_one_mbox_file_is_named_once(tmp_path, tiny_checkpoint, capsys, monkeypatch):
    monkeypatch.setattr(training.runtime.mail_sources, "MAX_MESSAGE_BYTES", 100)
    (tmp_path / "giant.mbox").write_bytes(mbox(message("big", "x" * 200), message("small")))
    out = tmp_path / "scores.jsonl"
    assert predict("--checkpoint", tiny_checkpoint, "--data", tmp_path / "giant.mbox", "--out", out) == 0
    (bad,) = read_jsonl(tmp_path / "scores.jsonl.bad-rows.jsonl")
    assert bad["error"] == "larger than 0 MiB, not read"
    (line,) = [line for line in capsys.readouterr().err.splitlines() if "skipped" in line]
    assert line == f"{tmp_path / 'giant.mbox'}, message 1: larger than 0 MiB, not read; skipped"
