"""The feedback store: the corrections users report (a text or a raw mail message, and the label it really is), kept
durably in one SQLite file that the server writes (POST /feedback, spamd's TELL) and finetune reads as data.

Durability: the database runs in WAL mode with synchronous=FULL, so a commit has been fsynced to the write-ahead log
before record() returns (https://www.sqlite.org/pragma.html#pragma_synchronous, https://www.sqlite.org/wal.html): an
acknowledged correction survives a killed process and a power cut; one cut short mid-write is rolled back whole.
WAL lets a reader (a fine-tune) read a consistent snapshot while the server goes on writing.

Identity: a text is one correction per near_duplicate_key (the key finetune deduplicates by, so two reports that
training would merge are one correction). A raw message is one correction per Message-ID and body: the headers that
mail servers add in transit (Received, X-Spam-*) do not make it another message, and a Message-ID that a spammer
reuses with another body does not merge two messages; a message without a Message-ID is identified by all its bytes.
Line endings are normalised first (CRLF as LF), as messages are stored with either.

The same content reported again is stored once: its current label is the latest report's, and every report is kept in
the history (the `reports` table)."""

import hashlib
import re
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from training.runtime.mail import DEFAULT_EXTRACTION, Extraction, read_message
from training.runtime.text import NO_VISIBLE_CHARACTERS, has_visible_characters, near_duplicate_key

# PRAGMA user_version of the schema below; a database of another version is refused, never rewritten
SCHEMA_VERSION = 1
SCHEMA = (
    """CREATE TABLE corrections (
        key TEXT PRIMARY KEY,          -- content_key(content): the identity of the reported text or message
        kind TEXT NOT NULL CHECK (kind IN ('text', 'message')),
        content BLOB NOT NULL,         -- a text as UTF-8 (surrogatepass), a message as its raw bytes
        label TEXT NOT NULL,           -- the latest report's label: what the content is
        reason TEXT,                   -- the latest report's reason, if it gave one
        source TEXT NOT NULL,          -- where the latest report came from: "http", "spamd", ...
        first_reported REAL NOT NULL,  -- Unix time, seconds
        last_reported REAL NOT NULL,
        reports INTEGER NOT NULL       -- how many reports this content has had
    )""",
    """CREATE TABLE reports (           -- every report, in order: the history of each correction
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        key TEXT NOT NULL REFERENCES corrections (key),
        label TEXT NOT NULL,
        reason TEXT,
        source TEXT NOT NULL,
        reported REAL NOT NULL
    )""",
    "CREATE INDEX reports_by_key ON reports (key)",
)
Kind = Literal["text", "message"]
Outcome = Literal["new", "replaced", "same"]


class FeedbackStoreError(RuntimeError):
    """The database file cannot be used: not a SQLite database, damaged, another schema version, or unwritable.
    The message names the file."""


class UnknownLabel(ValueError):
    """A report's label is not one of the model's labels; the message names the labels it knows."""


@dataclass(frozen=True)
class Recorded:
    """What record() did: "new" (first report of this content), "replaced" (the label changed), "same" (the same
    label again; only the history grew)."""

    outcome: Outcome
    key: str  # the correction's identity (content_key), hex sha256
    label: str  # its label now
    previous: str | None  # its label before this report; None when new


@dataclass(frozen=True)
class Correction:
    """One reported content with its current label: a text (str) or a raw message (bytes)."""

    key: str
    kind: Kind
    content: str | bytes
    label: str
    reason: str | None
    source: str
    first_reported: float  # Unix time, seconds
    last_reported: float
    reports: int


@dataclass(frozen=True)
class FeedbackStats:
    corrections: int  # distinct contents
    reports: int  # reports received, repeats included
    by_label: dict[str, int]  # corrections by current label, every known label present
    by_kind: dict[str, int]  # corrections by kind: "text", "message"


_MESSAGE_ID = re.compile(rb"^message-id:[ \t]*(.*(?:\n[ \t].*)*)", re.IGNORECASE | re.MULTILINE)


def content_key(content: str | bytes) -> str:
    """The identity of reported content (the module's docstring gives the rule), as hex sha256.

    A str is a text; bytes are a raw RFC 5322 message."""
    if isinstance(content, str):
        return hashlib.sha256(b"text\0" + near_duplicate_key(content).encode("utf-8", "surrogatepass")).hexdigest()
    raw = content.replace(b"\r\n", b"\n")
    head, separator, body = raw.partition(b"\n\n")
    found = _MESSAGE_ID.search(head) if separator else None
    if found is None or not found.group(1).strip():
        return hashlib.sha256(b"message\0" + raw).hexdigest()
    message_id = b" ".join(found.group(1).split())
    return hashlib.sha256(b"message-id\0" + message_id + b"\0" + body.rstrip(b"\n")).hexdigest()


class FeedbackStore:
    """The corrections in the SQLite file `path` (created with its directory when missing), for a model whose labels
    are `labels` (record() refuses others).

    Thread-safe: one connection, one lock; every write is one durable transaction. Other processes (a fine-tune)
    may open the same file at the same time, readers beside the writer.

    Raises FeedbackStoreError naming the file when it is not a usable feedback database.
    """

    def __init__(self, path: str | Path, labels: Sequence[str]):
        self.path, self.labels = Path(path), tuple(labels)
        self._lock = threading.Lock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # isolation_level=None: transactions are ours (BEGIN IMMEDIATE ... COMMIT), not the module's implicit ones
            self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30)
        except (OSError, sqlite3.Error) as exc:
            raise FeedbackStoreError(f"{self.path}: cannot open the feedback database ({exc})") from exc
        try:
            self._prepare()
        except sqlite3.DatabaseError as exc:
            self._db.close()
            raise FeedbackStoreError(f"{self.path}: not a usable feedback database ({exc})") from exc
        except FeedbackStoreError:
            self._db.close()
            raise

    def _prepare(self) -> None:
        db = self._db
        if db.execute("PRAGMA journal_mode=WAL").fetchone()[0].lower() != "wal":
            raise FeedbackStoreError(f"{self.path}: SQLite cannot use a write-ahead log here (a network filesystem?)")
        db.execute("PRAGMA synchronous=FULL")  # in WAL mode: each commit fsyncs the log before it returns
        db.execute("PRAGMA foreign_keys=ON")
        problems = [row[0] for row in db.execute("PRAGMA quick_check")]
        if problems != ["ok"]:
            raise FeedbackStoreError(f"{self.path}: damaged: {'; '.join(problems[:5])}")
        with _Transaction(db):  # under the write lock: two processes opening a new file create the schema once
            version = db.execute("PRAGMA user_version").fetchone()[0]
            tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            if version == 0 and not tables:
                for statement in SCHEMA:
                    db.execute(statement)
                db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            elif version != SCHEMA_VERSION or not {"corrections", "reports"} <= tables:
                raise FeedbackStoreError(
                    f"{self.path}: schema version {version} with tables {sorted(tables)}, not a feedback database "
                    f"of version {SCHEMA_VERSION}"
                )

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> "FeedbackStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def record(self, content: str | bytes, label: str, reason: str | None = None, source: str = "http") -> Recorded:
        """Stores one report, durably (fsynced) before it returns: `content` (a text, or a raw message as bytes)
        is `label`. Blocks on the disk: call it from a worker thread, not an event loop.

        Raises UnknownLabel naming the known labels; ValueError for empty content or a text without a visible
        character; FeedbackStoreError when the disk refuses the write (named file)."""
        if label not in self.labels:
            raise UnknownLabel(f"{label!r} is not one of the model's labels {list(self.labels)}")
        if not content:
            raise ValueError("content is empty")
        if isinstance(content, str) and not has_visible_characters(content):
            raise ValueError(f"the text {NO_VISIBLE_CHARACTERS}")
        kind: Kind = "text" if isinstance(content, str) else "message"
        stored = content.encode("utf-8", "surrogatepass") if kind == "text" else bytes(content)
        key, now = content_key(content), time.time()
        with self._lock:
            try:
                with _Transaction(self._db):
                    row = self._db.execute("SELECT label FROM corrections WHERE key = ?", (key,)).fetchone()
                    if row is None:
                        self._db.execute(
                            "INSERT INTO corrections VALUES (?, ?, ?, ?, ?, ?, ?, ?, 1)",
                            (key, kind, stored, label, reason, source, now, now),
                        )
                    else:
                        self._db.execute(
                            "UPDATE corrections SET label = ?, reason = ?, source = ?, last_reported = ?, "
                            "reports = reports + 1 WHERE key = ?",
                            (label, reason, source, now, key),
                        )
                    self._db.execute(
                        "INSERT INTO reports (key, label, reason, source, reported) VALUES (?, ?, ?, ?, ?)",
                        (key, label, reason, source, now),
                    )
            except sqlite3.Error as exc:
                raise FeedbackStoreError(f"{self.path}: the report was not stored ({exc})") from exc
        previous = None if row is None else row[0]
        outcome: Outcome = "new" if row is None else "same" if previous == label else "replaced"
        return Recorded(outcome=outcome, key=key, label=label, previous=previous)

    def stats(self) -> FeedbackStats:
        """Counts of corrections by current label (every label of the model, 0 where none) and by kind."""
        with self._lock:
            by_label = dict(self._db.execute("SELECT label, COUNT(*) FROM corrections GROUP BY label").fetchall())
            by_kind = dict(self._db.execute("SELECT kind, COUNT(*) FROM corrections GROUP BY kind").fetchall())
            reports = self._db.execute("SELECT COUNT(*) FROM reports").fetchone()[0]
        labels = {label: by_label.get(label, 0) for label in self.labels} | by_label
        return FeedbackStats(
            corrections=sum(by_label.values()),
            reports=reports,
            by_label=labels,
            by_kind={kind: by_kind.get(kind, 0) for kind in ("text", "message")},
        )

    def corrections(self) -> Iterator[Correction]:
        """Every correction with its current label, oldest first, read from one consistent snapshot (the
        writers' later commits are not seen)."""
        with self._lock:
            rows = self._db.execute("SELECT * FROM corrections ORDER BY first_reported, key").fetchall()
        for key, kind, content, label, reason, source, first, last, reports in rows:
            yield Correction(
                key=key,
                kind=kind,
                content=content.decode("utf-8", "surrogatepass") if kind == "text" else content,
                label=label,
                reason=reason,
                source=source,
                first_reported=first,
                last_reported=last,
                reports=reports,
            )

    def history(self, key: str) -> list[tuple[str, str | None, str, float]]:
        """Every report of the correction `key`, oldest first: (label, reason, source, Unix time)."""
        with self._lock:
            return self._db.execute(
                "SELECT label, reason, source, reported FROM reports WHERE key = ? ORDER BY id", (key,)
            ).fetchall()


class _Transaction:
    """BEGIN IMMEDIATE (the write lock taken at once, so two writers never deadlock upgrading) ... COMMIT, or
    ROLLBACK when the block raises."""

    def __init__(self, db: sqlite3.Connection):
        self._db = db

    def __enter__(self) -> None:
        self._db.execute("BEGIN IMMEDIATE")

    def __exit__(self, kind, exc, tb) -> None:
        self._db.execute("COMMIT" if kind is None else "ROLLBACK")


def correction_text(correction: Correction, extraction: Extraction = DEFAULT_EXTRACTION) -> str:
    """The text the model reads for a correction: a text as it is, a message through read_message with the
    model's `extraction` (training.runtime.mail), as serving reads it."""
    return correction.content if correction.kind == "text" else read_message(correction.content, extraction).text
