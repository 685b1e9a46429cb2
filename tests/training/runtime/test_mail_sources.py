"""Mail folders, Maildirs and mbox files read one message at a time: every layout, the order, and each bad input named
rather than raised (tests build their own messages)."""

import os
from pathlib import Path

import pytest

import training.runtime.mail_sources
from training.runtime.mail import DEFAULT_EXTRACTION, read_message
from training.runtime.mail_sources import Mail, Unreadable, fingerprint, label_entries, read_mail


def message(subject: str, body: str = "body text", message_id: str | None = None) -> bytes:
    """A small RFC 5322 message with CRLF line ends."""
    headers = ["From: sender@example.com", f"Subject: {subject}"]
    headers += [f"Message-ID: <{message_id}@example.com>"] if message_id else []
    return ("\r\n".join(headers) + "\r\n\r\n" + body + "\r\n").encode()


def write(path: Path, content: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return path


def mbox(*messages: bytes) -> bytes:
    return b"".join(
        b"From sender@example.com Thu Aug 22 13:17:22 2002\n" + m.replace(b"\r\n", b"\n") + b"\n" for m in messages
    )


def read(path: Path, **kwargs) -> list[tuple]:
    """(label, str(origin), subject or the error) of each item read_mail gives."""
    return [
        (item.label, str(item.origin), item.mail.subject if isinstance(item, Mail) else item.error)
        for item in read_mail(path, DEFAULT_EXTRACTION, **kwargs)
    ]


def test_a_labelled_directory_reads_folders_maildirs_and_mbox_files_in_sorted_order(tmp_path):
    write(tmp_path / "spam" / "b.eml", message("spam b"))
    write(tmp_path / "spam" / "a.txt", message("spam a"))  # any file name: the corpus's are .txt
    write(tmp_path / "spam" / "2002" / "c.eml", message("spam c"))  # folders inside a label folder are read too
    write(tmp_path / "spam" / ".hidden.eml", message("hidden"))  # skipped
    write(tmp_path / "ham" / "cur" / "1:2,S", message("ham cur"))  # a Maildir
    write(tmp_path / "ham" / "new" / "2", message("ham new"))
    write(tmp_path / "ham" / "tmp" / "3", message("being delivered"))  # skipped: not delivered yet
    write(tmp_path / "ham" / "dovecot-uidlist", b"3 V1 N2\n")  # skipped: a mail server's index, beside cur/ new/
    write(tmp_path / "ham.mbox", mbox(message("ham mbox 1"), message("ham mbox 2")))
    assert label_entries(tmp_path).keys() == {"ham", "spam"}
    assert read(tmp_path) == [
        ("ham", "ham/cur/1:2,S", "ham cur"),
        ("ham", "ham/new/2", "ham new"),
        ("ham", "ham.mbox, message 1", "ham mbox 1"),
        ("ham", "ham.mbox, message 2", "ham mbox 2"),
        ("spam", "spam/2002/c.eml", "spam c"),
        ("spam", "spam/a.txt", "spam a"),
        ("spam", "spam/b.eml", "spam b"),
    ]
    numbers = [item.origin.number for item in read_mail(tmp_path, DEFAULT_EXTRACTION)]
    assert numbers == list(range(1, 8))


def test_the_text_is_read_messages_and_the_message_id_comes_along(tmp_path):
    raw = message("Cheap meds", "Buy now", message_id="abc")
    write(tmp_path / "one.eml", raw)
    (item,) = read_mail(tmp_path / "one.eml", DEFAULT_EXTRACTION)
    assert item.mail == read_message(raw, DEFAULT_EXTRACTION)
    assert item.mail.message_id == "<abc@example.com>" and item.label is None
    assert item.origin.path == str(tmp_path / "one.eml")  # a file: named as given


def test_a_folder_of_messages_and_a_maildir_are_unlabelled(tmp_path):
    write(tmp_path / "inbox" / "1.eml", message("one"))
    write(tmp_path / "inbox" / "2.eml", message("two"))
    write(tmp_path / "Maildir" / "cur" / "x", message("three"))
    write(tmp_path / "Maildir" / "new" / "y", message("four"))
    assert read(tmp_path / "inbox") == [(None, "1.eml", "one"), (None, "2.eml", "two")]
    assert read(tmp_path / "Maildir") == [(None, "cur/x", "three"), (None, "new/y", "four")]


def test_an_mbox_without_its_suffix_is_read_as_one_when_asked(tmp_path):
    box = write(tmp_path / "inbox", mbox(message("first", ">From the body, escaped"), message("second")))
    assert [subject for _, _, subject in read(box, mbox=True)] == ["first", "second"]
    assert [subject for _, _, subject in read(box)] == ["first"]  # without mbox=True: one message, From line and all


def test_an_unescaped_from_line_in_a_body_splits_the_message_as_mbox_readers_do(tmp_path):
    write(tmp_path / "spam.mbox", mbox(message("first", "From here on, a body line")))
    assert read(tmp_path) == [
        ("spam", "spam.mbox, message 1", "first"),
        ("spam", "spam.mbox, message 2", "an empty message"),
    ]


def test_a_file_beside_the_label_folders_is_in_no_label(tmp_path):
    write(tmp_path / "spam" / "1.eml", message("s"))
    write(tmp_path / "notes.eml", message("n"))
    assert read(tmp_path) == [(None, "notes.eml", "n"), ("spam", "spam/1.eml", "s")]


@pytest.mark.parametrize(
    ("content", "error"),
    [
        pytest.param(b"", "an empty file", id="0-byte file"),
        pytest.param(b"\0" * 4096, "not a message: it does not start with a header field", id="NUL-filled file"),
        pytest.param(b"just some notes, no mail\n", "not a message", id="a text that is not a message"),
        pytest.param(b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR", "not a message", id="a picture"),
        pytest.param(b"Subject:\r\n\r\n \r\n", "no readable text", id="a message that shows nothing"),
    ],
)
def test_a_file_that_is_no_readable_message_is_named_not_raised(tmp_path, content, error):
    write(tmp_path / "spam" / "bad", content)
    write(tmp_path / "spam" / "good", message("fine"))
    items = list(read_mail(tmp_path, DEFAULT_EXTRACTION))
    assert isinstance(items[0], Unreadable) and items[0].error.startswith(error), items[0]
    assert (items[0].origin.path, items[0].label) == ("spam/bad", "spam")
    assert isinstance(items[1], Mail)


def test_a_file_name_that_is_not_utf8_is_read_and_named_with_escapes(tmp_path):
    name = os.fsdecode(b"caf\xe9.eml")
    write(tmp_path / "spam" / name, message("latin-1 name"))
    (item,) = read_mail(tmp_path, DEFAULT_EXTRACTION)
    assert item.origin.path == "spam/caf\\xe9.eml" and item.mail.subject == "latin-1 name"
    item.origin.path.encode("utf-8")  # printable and writable anywhere


@pytest.mark.parametrize(
    "content",
    [
        pytest.param(b"From: someone@example.com\nSubject: x\n\nbody\n", id="a message, not an mbox"),
        pytest.param(b"Fro m a@b Thu Aug 22 13:17:22 2002\nSubject: x\n\nbody\n", id="a broken From line"),
        pytest.param(b"\0" * 100, id="NUL bytes"),
    ],
)
def test_an_mbox_whose_first_line_is_no_from_line_is_one_unreadable(tmp_path, content):
    write(tmp_path / "spam.mbox", content)
    assert read(tmp_path) == [
        ("spam", "spam.mbox", f"not an mbox: its first line starts {content[:5]!r}, not with a 'From ' line")
    ]


def test_an_empty_mbox_holds_no_message(tmp_path):
    write(tmp_path / "spam.mbox", b"")
    assert read(tmp_path) == []


def test_a_fifo_is_named_without_waiting_for_a_writer(tmp_path):
    write(tmp_path / "spam" / "1.eml", message("s"))
    os.mkfifo(tmp_path / "spam" / "pipe")
    assert read(tmp_path)[1] == ("spam", "spam/pipe", "not a regular file")


def test_a_folder_linked_into_itself_is_read_once(tmp_path):
    write(tmp_path / "spam" / "1.eml", message("s"))
    (tmp_path / "spam" / "loop").symlink_to(tmp_path / "spam")
    (tmp_path / "spam" / "gone").symlink_to(tmp_path / "nowhere")
    assert read(tmp_path) == [("spam", "spam/1.eml", "s"), ("spam", "spam/gone", "a link to nothing")]


def test_a_message_over_the_size_limit_is_skipped_unread(tmp_path, monkeypatch):
    monkeypatch.setattr(training.runtime.mail_sources, "MAX_MESSAGE_BYTES", 100)
    write(tmp_path / "big.eml", message("big", "x" * 200))
    write(tmp_path / "big.mbox", mbox(message("small"), message("big", "x" * 200)))
    assert read(tmp_path / "big.eml")[0][2] == "larger than 0 MiB, not read"
    assert [r[2] for r in read(tmp_path / "big.mbox")] == ["small", "larger than 0 MiB, not read"]


def test_a_missing_path_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file or directory"):
        list(read_mail(tmp_path / "nowhere", DEFAULT_EXTRACTION))


def test_the_fingerprint_changes_with_any_file_and_not_with_where_the_folder_is(tmp_path):
    for folder in ("a", "b"):
        write(tmp_path / folder / "spam" / "1.eml", message("one"))
        write(tmp_path / folder / "ham" / "2.eml", message("two"))
    first = fingerprint(tmp_path / "a")
    assert first == fingerprint(tmp_path / "b") and first["files"] == 2
    (tmp_path / "b" / "ham" / "2.eml").rename(tmp_path / "b" / "ham" / "3.eml")
    renamed = fingerprint(tmp_path / "b")
    write(tmp_path / "b" / "ham" / "3.eml", message("changed"))
    changed = fingerprint(tmp_path / "b")
    write(tmp_path / "b" / "ham" / "4.eml", message("added"))
    assert len({first["sha256"], renamed["sha256"], changed["sha256"], fingerprint(tmp_path / "b")["sha256"]}) == 4
