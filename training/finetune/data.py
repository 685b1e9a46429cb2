"""Labelled texts: the SMS Spam Collection (packaged with spamgpt), any CSV / TSV / JSONL table or a directory of mail
(one folder or mbox per label, training.runtime.mail_sources), deduplicated, balanced and split.

Loaders check every row at the boundary and name the file, the line and the offending value.
"""

import csv
import gzip
import hashlib
import io
import json
import os
import random
import sys
import unicodedata
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from training.runtime.mail import DEFAULT_EXTRACTION, Extraction
from training.runtime.mail_sources import Unreadable, display, label_entries, read_mail
from training.runtime.text import NO_VISIBLE_CHARACTERS, has_visible_characters, near_duplicate_key
from training.runtime.tokenizer import file_problem

_SMS_FILE = "SMSSpamCollection"
# The UCI SMS Spam Collection v.1 (CC BY 4.0; credits in training/assets/README.md), gzipped: 206,683 bytes
# instead of 477,907. SMS_SHA256 is of the file as UCI distributes it, checked after decompressing.
PACKAGED_SMS = Path(__file__).parents[1] / "assets" / f"{_SMS_FILE}.gz"
# What CC BY 4.0 asks of whoever shares a model trained on it (training/assets/README.md has the full credit)
SMS_CREDIT = (
    "the SMS Spam Collection v.1 (UCI dataset 228) by Tiago A. Almeida, José María Gómez Hidalgo and Akebo Yamakami "
    '("Contributions to the Study of SMS Spam Filtering: New Collection and Results", DocEng 2011), '
    "CC BY 4.0 (https://creativecommons.org/licenses/by/4.0/)"
)
SMS_SHA256 = "7d039a24a6083ed9ef0f806ebad56bbb976e3aeb8de05669173bfdc4996c239d"
# A longer row is refused by finetune (by line) and is a bad row to predict, in every format: it bounds a chunk's
# memory, and it is csv's default field limit, so every field written to a CSV output reads back (resuming reads it)
# with Python's csv module, whose limit it is.
MAX_ROW_CHARS = 131_072
# Cyrillic and Greek letters that look like a Latin letter of the same case, each mapped to that letter (the entries
# of Unicode's confusables.txt, UTS #39, whose prototype is one ASCII letter, for the two scripts whose keyboards type
# Latin look-alikes). A label set is a few words a person typed: these are the look-alikes that occur there, and the
# full table (confusable-homoglyphs ships it as 1 MB of JSON, without a skeleton function) is no runtime dependency's
# worth for it.
_LATIN_LOOK_ALIKES = str.maketrans(
    "АВЕЅІЈКМНОРСТХԚԜӀаеѕіјорсхуүԁԛԝһӏΑΒΕΖΗΙΚΜΝΟΡΤΥΧαιονρυϲϳ",
    "ABESIJKMHOPCTXQWlaesijopcxyydqwhlABEZHIKMNOPTYXaiovpucj",
)


@dataclass(frozen=True)
class Dataset:
    texts: list[str]
    labels: list[str]  # one per text

    def __post_init__(self):
        if len(self.texts) != len(self.labels):
            raise ValueError(f"{len(self.texts)} texts but {len(self.labels)} labels")

    def label_names(self) -> list[str]:
        """Sorted distinct labels: the classifier's label order."""
        return sorted(set(self.labels))


SPLITS = ("train", "validation", "test")
# Every row's role in a run: trained on, early stopping and calibration, the balanced test split, threshold
# selection (validation plus held-out rows), evaluation (test plus held-out rows). split.json records each.
ROLES = (*SPLITS, "selection", "evaluation")
BALANCING = ("undersample", "class-weighted", "none")


@dataclass(frozen=True)
class Split:
    train: Dataset
    validation: Dataset
    test: Dataset


@dataclass(frozen=True)
class Partition:
    """Which rows play which part (ROLES); see partition."""

    train: Dataset  # trained on
    validation: Dataset  # picks the best epoch and fits the temperature
    test: Dataset  # the balanced test split: rows of `evaluation`, every label undersampled to the rarest's count
    selection: Dataset  # the threshold is chosen here: validation and held-out rows, never trained on
    evaluation: Dataset  # metrics: test and the held-out rows that neither training nor selection saw

    def sizes(self) -> dict[str, int]:
        return {name: len(getattr(self, name).texts) for name in ROLES}


# --- Loading --------------------------------------------------------------------------------------


def is_sms_spam(source: str) -> bool:
    """Whether a --data argument names the SMS Spam Collection: "sms" (packaged) or a SMSSpamCollection file."""
    return source == "sms" or Path(source).name == _SMS_FILE


def is_mail_folder(source: str) -> bool:
    """Whether a --data argument names a directory of mail (load_mail)."""
    return Path(source).is_dir()


def load_dataset(
    source: str, text_column: str = "text", label_column: str = "label", extraction: Extraction = DEFAULT_EXTRACTION
) -> Dataset:
    """The source "sms" (the packaged copy: no network), a local SMSSpamCollection file, a directory of mail read
    with `extraction` (load_mail), a feedback store's SQLite file (training.finetune.feedback.load_corrections), or
    a .csv / .tsv / .jsonl table."""
    if source == "sms":
        return load_sms_spam()
    if is_sms_spam(source):
        return load_sms_spam(source)
    if is_mail_folder(source):
        return load_mail(source, extraction)
    from training.finetune.feedback import is_feedback_store, load_corrections  # it reads rows as this module does

    if is_feedback_store(source):
        return load_corrections(source)
    return load_table(source, text_column, label_column)


def load_sms_spam(path: str | Path | None = None) -> Dataset:
    """The SMS Spam Collection from a local file, or by default the copy packaged with spamgpt (5,574 rows, 747
    spam; never the network), which must have SMS_SHA256: ValueError names the file and both hashes otherwise.

    Parsed as plain `label<TAB>text` lines, not as CSV: three messages contain quote characters that CSV
    quoting would merge with their neighbours.
    """
    path, content = (PACKAGED_SMS, _packaged_sms()) if path is None else (Path(path), Path(path).read_bytes())
    lines = _decode(path, content).split("\n")
    if lines[-1] == "":  # the file's final newline
        lines.pop()
    rows = []
    for number, line in enumerate(lines, start=1):
        label, tab, text = line.removesuffix("\r").partition("\t")
        if not tab:
            raise ValueError(f"{path}, line {number}: expected 'label<TAB>text', got {_clip(line)!r}")
        rows.append(_row(path, number, text, label))
    return _dataset(path, rows)


MAX_PRINTED_SKIPPED = 20  # messages load_mail names on stderr one by one; then how many more


def load_mail(directory: str | Path, extraction: Extraction = DEFAULT_EXTRACTION) -> Dataset:
    """A labelled mail directory (training.runtime.mail_sources: a folder or a <label>.mbox file per label, holding
    message files, a Maildir or mbox files) as the text read_message makes of each message (`extraction`) and its
    folder's label, in the directory's sorted order, one message in memory at a time.

    A message that cannot be read (mail_sources.read_mail's Unreadable: an empty file, a file of NUL bytes, no
    readable text, an mbox that is not one) and a file beside the label folders are skipped, each named on stderr
    with why (the first MAX_PRINTED_SKIPPED, then a count), as `sa-learn` skips them: one broken file in a mail
    folder does not stop training. Raises ValueError naming the directory for no label folder, fewer than 2
    labels, two labels that differ only by case or look-alike letters (label_skeleton), or a label folder left
    without a readable message.
    """
    directory = Path(directory)
    labels = list(label_entries(directory))
    if not labels:
        raise ValueError(
            f"{display(directory)}: no label folders: put each label's messages in a folder named after it (spam/, "
            "ham/: message files, a Maildir or .mbox files) or in a <label>.mbox file"
        )
    if len(labels) < 2:
        raise ValueError(f"{display(directory)}: a classifier needs at least 2 labels, found only {labels!r}")
    by_skeleton = {}
    for label in labels:
        other = by_skeleton.setdefault(label_skeleton(label), label)
        if other != label:
            raise ValueError(
                f"{display(directory)}: the label folders {other!r} and {label!r} differ only by case or look-alike "
                "letters; put their messages in one folder if they are one label"
            )
    texts, names, skipped = [], [], 0
    for item in read_mail(directory, extraction):
        why = "not in a label folder" if item.label is None else item.error if isinstance(item, Unreadable) else None
        if why is None:
            texts.append(item.mail.text)
            names.append(item.label)
            continue
        skipped += 1
        if skipped <= MAX_PRINTED_SKIPPED:
            print(f"{display(directory)}{os.sep}{item.origin}: {why}; skipped", file=sys.stderr)
    if skipped > MAX_PRINTED_SKIPPED:
        print(f"{display(directory)}: {skipped - MAX_PRINTED_SKIPPED} more messages skipped", file=sys.stderr)
    empty = sorted(set(labels) - set(names))
    if empty:
        raise ValueError(f"{display(directory)}: no readable message for the label(s) {empty!r}")
    return Dataset(texts, names)


def _packaged_sms() -> bytes:
    """PACKAGED_SMS decompressed, once its sha256 is SMS_SHA256."""
    try:
        content = gzip.decompress(PACKAGED_SMS.read_bytes())
    except (gzip.BadGzipFile, EOFError, zlib.error) as exc:
        raise ValueError(f"{PACKAGED_SMS}: not a readable gzip file ({exc}); reinstall spamgpt") from exc
    actual = hashlib.sha256(content).hexdigest()
    if actual != SMS_SHA256:
        raise ValueError(
            f"{PACKAGED_SMS}: decompressed, its sha256 is {actual}, expected {SMS_SHA256} (the SMS Spam Collection "
            "as UCI distributes it); reinstall spamgpt"
        )
    return content


def load_table(path: str | Path, text_column: str = "text", label_column: str = "label") -> Dataset:
    """A .csv, .tsv (header row, csv quoting) or .jsonl (one JSON object a line) table of texts and labels.

    Raises ValueError naming the file, the line and the value for: an unknown suffix, text that is not UTF-8, a
    CSV / TSV record whose field count differs from the header's, a JSONL line that is not a JSON object, a row
    without the text or label column, a label that is empty or not a string, a text with no visible characters
    (has_visible_characters) or longer than MAX_ROW_CHARS, labels that differ only by case or by look-alike letters
    (label_skeleton), or fewer than 2 labels.
    """
    path = Path(path)
    readers = {".csv": _csv_rows, ".tsv": _csv_rows, ".jsonl": _jsonl_rows}
    suffix = path.suffix.lower()
    if suffix not in readers:
        raise ValueError(f"{path}: unknown table format {suffix!r}; use one of {sorted(readers)}")
    rows = []
    for number, row in readers[suffix](path):
        for column in (text_column, label_column):
            if column not in row:
                raise ValueError(f"{path}, line {number}: no column {column!r}; the row has {list(row)!r}")
        rows.append(_row(path, number, row[text_column], row[label_column]))
    return _dataset(path, rows)


def _csv_rows(path: Path) -> Iterator[tuple[int, dict]]:
    """(line where the record starts, record); a quoted field may span several lines. A record whose field
    count is not the header's is refused: csv would drop surplus fields or fill missing ones silently, and an
    unquoted delimiter inside a text then turns part of the text into its label."""
    stream = io.StringIO(_read_text(path), newline="")  # newline="": quoted line breaks stay as written
    reader = csv.reader(stream, delimiter="\t" if path.suffix.lower() == ".tsv" else ",")
    header = next(reader, None)
    if header is None:
        return
    repeated = sorted({name for name in header if header.count(name) > 1})
    if repeated:
        raise ValueError(f"{path}, line 1: the header names column {repeated[0]!r} more than once: {header!r}")
    start = reader.line_num + 1
    while True:
        try:
            fields = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:  # csv's field limit is MAX_ROW_CHARS: a longer field raises here
            raise ValueError(
                f"{path}, line {start}: not a CSV record this reader takes ({exc}); a text may hold at most "
                f"{MAX_ROW_CHARS:,} characters"
            ) from exc
        if fields:  # a blank line is no record
            if len(fields) != len(header):
                which = "too many" if len(fields) > len(header) else "too few"
                raise ValueError(
                    f"{path}, line {start}: {len(fields)} fields, {which} for the header's {len(header)} "
                    f"{header!r} (quote a field that holds the delimiter): {[_clip(f, 40) for f in fields]!r}"
                )
            yield start, dict(zip(header, fields, strict=True))
        start = reader.line_num + 1


def _jsonl_rows(path: Path) -> Iterator[tuple[int, dict]]:
    for number, line in enumerate(_read_text(path).split("\n"), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}, line {number}: not JSON ({exc.msg}): {_clip(line)!r}") from exc
        if not isinstance(row, dict):
            raise ValueError(f"{path}, line {number}: expected a JSON object, got {_clip(line)!r}")
        yield number, row


def _read_text(path: Path) -> str:
    # Bytes, then decode: text mode would turn a "\r" inside a message into a line break.
    return _decode(path, path.read_bytes())


def _decode(path: Path, content: bytes) -> str:
    """`content`, the bytes of `path`, as UTF-8 text (a byte order mark dropped); ValueError naming the file."""
    try:
        return content.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not UTF-8 text ({exc})") from exc


def _row(path: Path, number: int, text, label) -> tuple[int, str, str]:
    """(line, text, label stripped of surrounding whitespace), or ValueError naming the line and the value."""
    if not isinstance(label, str) or not label.strip():
        raise ValueError(f"{path}, line {number}: label must be a non-empty string, got {_clip(label)!r}")
    if not isinstance(text, str) or not text:
        raise ValueError(f"{path}, line {number}: text must be a non-empty string, got {_clip(text)!r}")
    if not has_visible_characters(text):
        raise ValueError(f"{path}, line {number}: text {NO_VISIBLE_CHARACTERS}, got {_clip(text)!r}")
    if len(text) > MAX_ROW_CHARS:
        raise ValueError(
            f"{path}, line {number}: text of {len(text):,} characters, longer than the {MAX_ROW_CHARS:,} a text may "
            f"hold: {_clip(text)!r}"
        )
    return number, text, label.strip()


def _dataset(path: Path, rows: list[tuple[int, str, str]]) -> Dataset:
    """The rows (line, text, label) as a Dataset, once its labels are at least 2 and no two share a label_skeleton
    (differ only by case or by look-alike letters)."""
    if not rows:
        raise ValueError(f"{path}: no rows")
    first_line = {}  # label -> the line it first appears on
    for number, _, label in rows:
        first_line.setdefault(label, number)
    by_skeleton = {}
    for label, number in first_line.items():
        other = by_skeleton.setdefault(label_skeleton(label), label)
        if other != label:
            how = (
                "only by case"
                if other.casefold() == label.casefold()
                else f"by look-alike letters ({_odd(other + label)})"
            )
            raise ValueError(
                f"{path}: labels {other!r} (line {first_line[other]}) and {label!r} (line {number}) differ {how}; "
                "write them the same way if they are one label"
            )
    ds = Dataset([text for _, text, _ in rows], [label for _, _, label in rows])
    if len(ds.label_names()) < 2:
        raise ValueError(f"{path}: a classifier needs at least 2 labels, found only {ds.label_names()!r}")
    return ds


def label_skeleton(label: str) -> str:
    """What two labels that read the same share: Unicode NFKC (full-width and styled letters to plain ones),
    Cyrillic and Greek look-alikes to the Latin letters they look like (_LATIN_LOOK_ALIKES), case folded. "Spam",
    "ｓｐａｍ" and "ѕpam" (a Cyrillic dze) share "spam"."""
    return unicodedata.normalize("NFKC", label).translate(_LATIN_LOOK_ALIKES).casefold()


def _odd(text: str) -> str:
    """The characters of `text` beyond ASCII, each with its code point and name."""
    odd = sorted({c for c in text if not c.isascii()})
    return ", ".join(f"{c!r} U+{ord(c):04X} {unicodedata.name(c, 'unnamed')}" for c in odd)


def _clip(value, limit: int = 80):
    """Long values shortened for an error message."""
    return value[:limit] + "..." if isinstance(value, str) and len(value) > limit else value


# --- Preparing ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Duplicates:
    """Rows deduplicate_counted dropped."""

    exact: int  # the same text as an earlier row
    near: int  # not the same text as any earlier row, but the same near_duplicate_key as one


def deduplicate(ds: Dataset) -> Dataset:
    """Duplicate texts removed, exact and near (the same near_duplicate_key), keeping the first occurrence, so
    that no text, nor a variant of it in case, width or spacing, sits in two splits.

    A text seen with two different labels keeps the label of its first occurrence.
    """
    return deduplicate_counted(ds)[0]


def deduplicate_counted(ds: Dataset) -> tuple[Dataset, Duplicates]:
    """deduplicate's result, with how many rows it dropped as exact and as near duplicates."""
    first, seen, exact = {}, set(), 0
    for i, text in enumerate(ds.texts):
        if text in seen:
            exact += 1
            continue
        seen.add(text)
        first.setdefault(near_duplicate_key(text), i)
    kept = sorted(first.values())
    return _subset(ds, kept), Duplicates(exact=exact, near=len(ds.texts) - len(kept) - exact)


def balance(ds: Dataset, seed: int) -> Dataset:
    """Every label undersampled at random (seeded) to the smallest label's count; rows keep their order."""
    rng = random.Random(seed)
    by_label = _indices_by_label(ds)
    smallest = min(len(indices) for indices in by_label.values())
    kept = [i for label in sorted(by_label) for i in rng.sample(by_label[label], smallest)]
    return _subset(ds, sorted(kept))


FRACTIONS = (0.7, 0.1, 0.2)  # train, validation, test


def stratified_split(ds: Dataset, seed: int, fractions: tuple[float, float, float] = FRACTIONS) -> Split:
    """Train / validation / test, each label shuffled (seeded) and cut by the fractions, so every split keeps
    the label proportions. Rows keep their order within a split.

    Raises ValueError for fractions that are not three positive numbers summing to 1, or a split left empty.
    """
    if len(fractions) != 3 or any(f <= 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-9:
        raise ValueError(f"fractions must be three positive numbers that sum to 1, got {fractions!r}")
    split = _stratified(ds, seed, fractions)
    if not all(part.texts for part in (split.train, split.validation, split.test)):
        sizes = [len(part.texts) for part in (split.train, split.validation, split.test)]
        raise ValueError(f"{len(ds.texts)} rows are too few to split by {fractions!r}: split sizes {sizes}")
    return split


def _stratified(ds: Dataset, seed: int, fractions: tuple[float, float, float]) -> Split:
    """stratified_split without its checks: a split may be empty."""
    rng = random.Random(seed)
    parts = ([], [], [])
    by_label = _indices_by_label(ds)
    for label in sorted(by_label):
        indices = by_label[label]
        rng.shuffle(indices)
        cut_train = round(len(indices) * fractions[0])
        cut_validation = round(len(indices) * (fractions[0] + fractions[1]))
        parts[0].extend(indices[:cut_train])
        parts[1].extend(indices[cut_train:cut_validation])
        parts[2].extend(indices[cut_validation:])
    return Split(*(_subset(ds, sorted(part)) for part in parts))


def partition(ds: Dataset, seed: int, balancing: str) -> Partition:
    """Every row of `ds` (deduplicated) in its roles, seeded; the evaluation rows are the same whatever `balancing`.

    The rows are undersampled (balance) and split (stratified_split): the reference's balanced train, validation
    and test splits. The rows undersampling leaves out are split by the same fractions. With "undersample",
    training sees the balanced train split only, and the left-out train and validation rows join threshold
    selection; with "class-weighted" or "none" the left-out train and validation rows are trained and validated
    on too. Either way evaluation is the balanced test split plus the left-out test rows, and `test` is the
    balanced test split.

    Raises ValueError for an unknown `balancing` or too few rows to split.
    """
    if balancing not in BALANCING:
        raise ValueError(f"balancing must be one of {BALANCING}, got {balancing!r}")
    balanced = balance(ds, seed)
    core = stratified_split(balanced, seed)
    kept = set(balanced.texts)  # texts are distinct after deduplication
    left = _stratified(_subset(ds, [i for i, t in enumerate(ds.texts) if t not in kept]), seed, FRACTIONS)
    evaluation = _concat(core.test, left.test)
    if balancing == "undersample":
        selection = _concat(core.validation, left.train, left.validation)
        return Partition(core.train, core.validation, core.test, selection, evaluation)
    validation = _concat(core.validation, left.validation)
    return Partition(_concat(core.train, left.train), validation, core.test, validation, evaluation)


def _concat(*parts: Dataset) -> Dataset:
    return Dataset([t for p in parts for t in p.texts], [label for p in parts for label in p.labels])


def _subset(ds: Dataset, indices: list[int]) -> Dataset:
    return Dataset([ds.texts[i] for i in indices], [ds.labels[i] for i in indices])


def _indices_by_label(ds: Dataset) -> dict[str, list[int]]:
    by_label = {}
    for i, label in enumerate(ds.labels):
        by_label.setdefault(label, []).append(i)
    return by_label


# --- Provenance -----------------------------------------------------------------------------------


def fingerprint(ds: Dataset) -> dict:
    """{"sha256": over texts and labels in order, "rows": n, "labels": {label: count}}."""
    digest = hashlib.sha256()
    for text, label in zip(ds.texts, ds.labels, strict=True):
        # one JSON array a row: unambiguous whatever tabs or newlines the text holds
        digest.update(json.dumps([text, label]).encode() + b"\n")
    counts = Counter(ds.labels)
    return {"sha256": digest.hexdigest(), "rows": len(ds.texts), "labels": dict(sorted(counts.items()))}


def text_id(text: str) -> str:
    """A short sha256 of a text: names it in the saved split without copying it."""
    # surrogatepass: a JSON table can carry a lone surrogate, which strict UTF-8 cannot encode
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:16]


def write_split(file: Path, parts: Partition) -> None:
    """split.json: the text ids (text_id) of each role's rows (ROLES; validation is within selection, test within
    evaluation), so that evaluation can select them later."""
    ids = {name: [text_id(text) for text in getattr(parts, name).texts] for name in ROLES}
    file.write_text(json.dumps(ids) + "\n")


def select_split(ds: Dataset, file: Path, name: str) -> Dataset:
    """The rows of `ds` that split.json `file` puts in role `name` (one of ROLES).

    Raises ValueError when the file is missing, records no such role or none of the rows is in it.
    """
    if problem := file_problem(file):
        raise ValueError(f"{file}: {problem}, so --split {name} cannot be selected")
    recorded = json.loads(file.read_text())
    if name not in recorded:
        raise ValueError(f"{file}: records no {name!r} rows (it has {sorted(recorded)})")
    ids = set(recorded[name])
    keep = [i for i, text in enumerate(ds.texts) if text_id(text) in ids]
    if not keep:
        raise ValueError(f"none of these rows is in the checkpoint's {name} split")
    return _subset(ds, keep)
