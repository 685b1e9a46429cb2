"""The feedback store: identity of reported content, history, label and content checks, schema and damaged files."""

import re
import sqlite3
import threading

import pytest

from training.runtime.feedback import FeedbackStore, FeedbackStoreError, UnknownLabel, content_key

LABELS = ("ham", "spam")
MESSAGE = b"Message-ID: <1@example.org>\r\nSubject: prize\r\n\r\nClaim your prize\r\n"


@pytest.fixture
def store(tmp_path):
    with FeedbackStore(tmp_path / "feedback" / "feedback.db", LABELS) as opened:
        yield opened


def test_a_report_is_new_then_same_then_replaced_and_the_history_keeps_each(store):
    assert store.record("WIN a prize now", "spam").outcome == "new"
    assert store.record("win a   prize now\n", "spam").outcome == "same"  # the same text as finetune sees it
    replaced = store.record("WIN a prize now", "ham", reason="from my bank")
    assert (replaced.outcome, replaced.previous, replaced.label) == ("replaced", "spam", "ham")
    [correction] = list(store.corrections())
    assert (correction.content, correction.label, correction.reason, correction.reports) == (
        "WIN a prize now",
        "ham",
        "from my bank",
        3,
    )
    assert [label for label, *_ in store.history(correction.key)] == ["spam", "spam", "ham"]
    stats = store.stats()
    assert (stats.corrections, stats.reports, stats.by_label, stats.by_kind) == (
        1,
        3,
        {"ham": 1, "spam": 0},
        {"text": 1, "message": 0},
    )


@pytest.mark.parametrize(
    "variant",
    [
        pytest.param(MESSAGE.replace(b"\r\n", b"\n"), id="lf-line-endings"),
        pytest.param(b"Received: from mx by mx2\r\nX-Spam-Flag: YES\r\n" + MESSAGE, id="transit-headers"),
        pytest.param(MESSAGE.replace(b"Message-ID: <1", b"message-id:   <1"), id="header-case-and-spacing"),
    ],
)
def test_a_message_is_the_same_message_whatever_transit_added(variant):
    assert content_key(variant) == content_key(MESSAGE)


@pytest.mark.parametrize(
    "other",
    [
        pytest.param(MESSAGE.replace(b"Claim", b"Collect"), id="reused-message-id-other-body"),
        pytest.param(MESSAGE.replace(b"<1@", b"<2@"), id="other-message-id"),
        pytest.param(b"Subject: prize\r\n\r\nClaim your prize\r\n", id="no-message-id"),
        pytest.param("Claim your prize", id="the-body-as-a-text"),
    ],
)
def test_other_messages_are_other_corrections(other):
    assert content_key(other) != content_key(MESSAGE)


def test_a_message_is_stored_as_its_raw_bytes(store):
    store.record(MESSAGE, "spam", source="spamd")
    assert store.record(b"Received: from mx\r\n" + MESSAGE, "ham").outcome == "replaced"
    [correction] = list(store.corrections())
    assert (correction.kind, correction.content, correction.label) == ("message", MESSAGE, "ham")


def test_an_unknown_label_is_refused_naming_the_known_ones(store):
    with pytest.raises(UnknownLabel, match=r"'eggs' is not one of the model's labels \['ham', 'spam'\]"):
        store.record("hello", "eggs")
    assert store.stats().corrections == 0


@pytest.mark.parametrize("content", ["", b"", " \u200b\n"], ids=["empty-text", "empty-message", "invisible-text"])
def test_empty_content_is_refused(store, content):
    with pytest.raises(ValueError, match=r"empty|visible"):
        store.record(content, "spam")


def test_the_store_reopens_with_what_was_committed(tmp_path):
    path = tmp_path / "feedback.db"
    with FeedbackStore(path, LABELS) as store:
        store.record("free entry", "spam")
    with FeedbackStore(path, LABELS) as store:
        assert [c.content for c in store.corrections()] == ["free entry"]
        assert store.record("free entry", "spam").outcome == "same"


def test_writes_are_durable_in_wal_mode(store):
    db = sqlite3.connect(store.path)
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    db.close()
    assert store._db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL


def test_concurrent_writers_lose_nothing(store, tmp_path):
    other = FeedbackStore(store.path, LABELS)  # a second connection, as a second process would hold

    def write(target, prefix):
        for i in range(25):
            target.record(f"{prefix} message {i}", "spam")

    threads = [threading.Thread(target=write, args=(s, p)) for s, p in ((store, "a"), (store, "b"), (other, "c"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    other.close()
    assert store.stats().corrections == 75


def test_a_reader_sees_one_snapshot_while_a_writer_goes_on(store):
    store.record("first", "spam")
    reader = FeedbackStore(store.path, LABELS)
    corrections = reader.corrections()
    first = next(corrections)
    store.record("second", "ham")
    assert (first.content, list(corrections)) == ("first", [])
    assert [c.content for c in reader.corrections()] == ["first", "second"]
    reader.close()


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(lambda path: path.write_bytes(b"not a database at all" * 100), id="not-sqlite"),
        pytest.param(lambda path: path.write_bytes(path.read_bytes()[:5000] + b"\xff" * 3000), id="truncated"),
        pytest.param(
            lambda path: sqlite3.connect(path).execute("PRAGMA user_version = 7").connection.close(),
            id="other-schema-version",
        ),
    ],
)
def test_a_damaged_or_foreign_file_is_refused_naming_it(tmp_path, damage):
    path = tmp_path / "feedback.db"
    with FeedbackStore(path, LABELS) as store:
        for i in range(200):
            store.record(f"message number {i} " * 10, "spam")
    sqlite3.connect(path).execute("PRAGMA wal_checkpoint(TRUNCATE)").connection.close()
    damage(path)
    with pytest.raises(FeedbackStoreError, match=re.escape(str(path))):
        FeedbackStore(path, LABELS)


def test_another_sqlite_database_is_refused(tmp_path):
    path = tmp_path / "other.db"
    sqlite3.connect(path).execute("CREATE TABLE t (x)").connection.close()
    with pytest.raises(FeedbackStoreError, match="not a feedback database"):
        FeedbackStore(path, LABELS)
