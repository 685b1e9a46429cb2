"""`python -m training predict`: score a file of any size with an exported checkpoint, in constant memory.

    python -m training predict --checkpoint checkpoints/spamgpt --data messages.csv --out scores.csv

In: a .csv / .tsv with a header row (csv quoting; a quoted field may span lines), a .jsonl (one JSON object a line),
a file named SMSSpamCollection (`label<TAB>text` lines, read as `finetune` reads them: columns true_label and text),
mail (a directory of message files, Maildirs, mbox files or label folders, an .eml message or an mbox file, read by
training.runtime.mail_sources: columns path, mbox_message, message_id, and true_label for label folders) or, for any
other suffix, plain text (one text a line). Out: .csv, .tsv or .jsonl, one row per good input row, in
input order: the input's columns, then `line` (where the row starts in the input; for mail, `message`: the message's
number in the input's sorted order), `label`, `probability_<label>`
for each of the model's labels, `tokens` (after truncation) and `truncated`: what `POST /classify` answers for the
text (training.scoring.records builds both from training.runtime.classifier.Classifier.predictions).

Rows are read, scored and written `chunk_rows` at a time, so memory is bounded by one chunk whatever the file's size.
A bad row (not UTF-8, not JSON, no text, wrong number of fields, over MAX_ROW_CHARS; a message that cannot be read)
is reported with its line number (a message with its number and path) on stderr and in OUT.bad-rows.jsonl, and the
run goes on; OUT.summary.json counts both.

Rerun on the same --out, the run resumes when the same run made the output: OUT.summary.json records what made it
(run_record) before the first row is written, and a rerun with another input, checkpoint or record-changing option
is refused naming what differs (check_resumable). Resuming keeps the output's complete rows (a row cut short by a
crash is removed) and scores only input rows after the last line written (the input is read again up to there, for
the bad rows file, which each run writes whole). No file a run writes may be the input (PredictConfig).
"""

import csv
import hashlib
import io
import json
import os
import re
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from tqdm import tqdm

from training.config import PredictConfig, changed_options
from training.finetune.data import MAX_ROW_CHARS
from training.runtime.checkpoint import CONFIG_FILE, WEIGHTS_FILE
from training.runtime.classifier import Classifier
from training.runtime.inference import NonFiniteLogits, require_finite
from training.runtime.mail import DEFAULT_EXTRACTION, Extraction, MailText
from training.runtime.mail_sources import Unreadable, label_entries, read_mail
from training.runtime.mail_sources import fingerprint as mail_fingerprint
from training.scoring.records import result_columns, result_record, usable_text

MAX_PRINTED_BAD_ROWS = 20  # on stderr; all of them go to the bad-rows file
LINES_COLUMN = "text"  # the one column of a plain-text input
SMS_COLUMNS = ("true_label", "text")  # an SMSSpamCollection line's label and text; "label" is the result's column
# a message's file (relative to a directory input), its number within an mbox file, its Message-ID; and for a
# directory of label folders, the folder's label
MAIL_COLUMNS, MAIL_LABEL_COLUMN = ("path", "mbox_message", "message_id"), "true_label"
MAIL_FORMATS = ("mail", "mbox")


@dataclass(frozen=True)
class Row:
    line: int  # 1-based line of the input where the row starts; for mail, the message's number
    fields: dict  # the input's columns (a JSON object's fields) as read
    text: str
    mail: MailText | None = None  # a message as read_message read it (text is its text); None for a table's row


@dataclass(frozen=True)
class BadRow:
    line: int
    error: str


# --- Reading --------------------------------------------------------------------------------------


@contextmanager
def open_rows(
    path: Path, fmt: str, text_column: str, extraction: Extraction = DEFAULT_EXTRACTION
) -> Iterator[tuple[list[str] | None, Iterator[Row | BadRow]]]:
    """The input's columns (None for JSONL, whose objects name their own) and its rows, read lazily while the
    context is open; mail is read with `extraction`.

    Raises ValueError for a CSV / TSV without a header row or without `text_column`, OSError for a missing file.
    """
    if fmt in MAIL_FORMATS:
        labelled = path.is_dir() and bool(label_entries(path))
        yield [*MAIL_COLUMNS, *[MAIL_LABEL_COLUMN] * labelled], _mail_rows(path, fmt, extraction, labelled)
        return
    with open(path, "rb") as file:
        if fmt == "jsonl":
            yield None, _jsonl_rows(file, text_column)
        elif fmt == "lines":
            yield [LINES_COLUMN], _plain_rows(file)
        elif fmt == "sms":
            yield list(SMS_COLUMNS), _sms_rows(file)
        else:
            with io.TextIOWrapper(file, encoding="utf-8-sig", errors="surrogateescape", newline="") as text:
                delimiter = "\t" if fmt == "tsv" else ","
                lines = _BoundedLines(text, delimiter)
                reader = csv.reader(lines, delimiter=delimiter)
                header = next(reader, None)
                if not header:
                    raise ValueError(f"{path}: no header row")
                if text_column not in header or len(set(header)) != len(header):
                    raise ValueError(
                        f"{path}: the header must name distinct columns including {text_column!r}, got {header!r}"
                    )
                limit = csv.field_size_limit(sys.maxsize)  # _BoundedLines bounds a record instead
                try:
                    yield header, _csv_rows(reader, lines, header, text_column)
                finally:
                    csv.field_size_limit(limit)


class _BoundedLines:
    """A text file's lines for csv.reader, each record's bounded: once the record being read passes MAX_ROW_CHARS,
    each further line of it goes to csv with every run of other characters than quotes, the delimiter and line ends
    collapsed to one "x". csv's states change on those characters alone, so it still ends the record where the file
    does (a field over the limit cannot leave csv inside a quoted field, reading the rest of it as rows), and the
    record in memory stays about MAX_ROW_CHARS whatever the file holds."""

    def __init__(self, lines: Iterator[str], delimiter: str):
        self.lines, self.chars = lines, 0
        self.others = re.compile(f'[^"{re.escape(delimiter)}\r\n]+')

    def __iter__(self):
        return self

    def __next__(self) -> str:
        line = next(self.lines)
        self.chars += len(line)
        return self.others.sub("x", line) if self.oversized else line

    @property
    def oversized(self) -> bool:
        """Whether the record read since new_record() passed MAX_ROW_CHARS."""
        return self.chars > MAX_ROW_CHARS

    def new_record(self) -> None:
        self.chars = 0


def _csv_rows(reader, lines: _BoundedLines, header: list[str], text_column: str) -> Iterator[Row | BadRow]:
    column = header.index(text_column)
    while True:
        line = reader.line_num + 1  # where the next record starts
        lines.new_record()
        try:
            record = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            yield BadRow(line, f"not CSV: {exc}")
            continue
        if lines.oversized:
            yield BadRow(line, f"longer than {MAX_ROW_CHARS} characters")
        elif not record:  # a blank line
            continue
        elif len(record) != len(header):
            yield BadRow(line, f"{len(record)} fields, the header has {len(header)}")
        elif any(_undecodable(value) for value in record):
            yield BadRow(line, "not UTF-8 text")
        else:
            yield _checked(line, dict(zip(header, record, strict=True)), record[column], text_column)


def _jsonl_rows(file: IO[bytes], text_column: str) -> Iterator[Row | BadRow]:
    for line, source in _numbered_lines(file):
        if isinstance(source, BadRow):
            yield source
            continue
        if not source.strip():
            continue
        try:
            obj = json.loads(source)
        except json.JSONDecodeError as exc:
            yield BadRow(line, f"not JSON ({exc.msg} at character {exc.pos})")
            continue
        if not isinstance(obj, dict):
            yield BadRow(line, f"expected a JSON object, got {type(obj).__name__}")
        elif text_column not in obj:
            yield BadRow(line, f"no field {text_column!r}")
        else:
            yield _checked(line, obj, obj[text_column], text_column)


def _plain_rows(file: IO[bytes]) -> Iterator[Row | BadRow]:
    for line, text in _numbered_lines(file):
        yield text if isinstance(text, BadRow) else _checked(line, {LINES_COLUMN: text}, text, LINES_COLUMN)


def _sms_rows(file: IO[bytes]) -> Iterator[Row | BadRow]:
    """The SMS Spam Collection's `label<TAB>text` lines, split as training.finetune.data.load_sms_spam splits them
    (not as CSV: some texts hold quote characters); a line without a tab is a bad row."""
    label_column, text_column = SMS_COLUMNS
    for line, source in _numbered_lines(file):
        if isinstance(source, BadRow):
            yield source
            continue
        label, tab, text = source.partition("\t")
        if tab:
            yield _checked(line, {label_column: label, text_column: text}, text, text_column)
        else:
            yield BadRow(line, "expected 'label<TAB>text'")


def _mail_rows(path: Path, fmt: str, extraction: Extraction, labelled: bool) -> Iterator[Row | BadRow]:
    """Each message of a mail input as a row numbered by its place in the input, its text what read_message makes of
    it; a message that cannot be read (mail_sources.Unreadable) is a bad row naming its file within a folder (a
    file's number already names the message)."""
    folder = path.is_dir()
    for item in read_mail(path, extraction, mbox=fmt == "mbox"):
        if isinstance(item, Unreadable):
            yield BadRow(item.origin.number, f"{item.origin}: {item.error}" if folder else item.error)
            continue
        origin = item.origin
        fields = dict(zip(MAIL_COLUMNS, (origin.path, origin.mbox_message, item.mail.message_id), strict=True))
        if labelled:
            fields[MAIL_LABEL_COLUMN] = item.label or ""
        yield Row(origin.number, fields, item.mail.text, item.mail)


def _numbered_lines(file: IO[bytes]) -> Iterator[tuple[int, str | BadRow]]:
    """(1-based number, the line without "\n" or "\r\n", or a BadRow where it is not UTF-8 or longer than
    MAX_ROW_CHARS); decoded line by line, so that a bad byte costs only its own line."""
    for number, raw in enumerate(file, start=1):
        if number == 1:
            raw = raw.removeprefix(b"\xef\xbb\xbf")  # a UTF-8 byte order mark
        try:
            text = raw.removesuffix(b"\n").removesuffix(b"\r").decode("utf-8")
        except UnicodeDecodeError:
            yield number, BadRow(number, "not UTF-8 text")
            continue
        yield number, BadRow(number, f"longer than {MAX_ROW_CHARS} characters") if len(text) > MAX_ROW_CHARS else text


def _checked(line: int, fields: dict, text, column: str) -> Row | BadRow:
    if usable_text(text):
        return Row(line, fields, text)
    if not isinstance(text, str):
        return BadRow(line, f"{column!r} must be a string, got {type(text).__name__}")
    return BadRow(line, f"{column!r} has no visible characters")


def _undecodable(value: str) -> bool:
    """Whether a string read with errors="surrogateescape" held bytes that are not UTF-8."""
    return any("\udc80" <= ch <= "\udcff" for ch in value)


# --- Writing --------------------------------------------------------------------------------------


class Output:
    """The results file, appended to chunk by chunk and flushed after each, so a crash loses at most the chunk
    being written (resume_point then removes its partial tail)."""

    def __init__(self, path: Path, fmt: str, header: list[str] | None):
        self.path, self.fmt, self.header = path, fmt, header  # header: the CSV's columns once known
        self.file = open(path, "a", encoding="utf-8", newline="")  # noqa: SIM115 (closed by close())
        self.writer = None
        self.dropped: set[str] = set()  # JSONL fields that a CSV header from the first object did not name

    def start(self, columns: list[str]) -> None:
        """Fix the CSV columns (written as the header unless the file already has it). Raises ValueError when an
        existing file has other columns."""
        if self.fmt == "jsonl" or self.writer is not None:
            return
        if self.header is not None and self.header != columns:
            raise ValueError(
                f"{self.path} has the columns {self.header!r}, this run writes {columns!r}: "
                "pass --no-resume to replace it, or another --out"
            )
        self.writer = csv.DictWriter(
            self.file, columns, delimiter="\t" if self.fmt == "tsv" else ",", extrasaction="ignore"
        )
        if self.header is None:
            self.writer.writeheader()
            self.header = columns

    def write(self, records: list[dict]) -> None:
        if self.fmt == "jsonl":
            self.file.writelines(_json_line(record) for record in records)
        else:
            for record in records:
                self.dropped.update(record.keys() - set(self.header))
                self.writer.writerow({key: _cell(value) for key, value in record.items()})
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def _json_line(record: dict) -> str:
    line = json.dumps(record, ensure_ascii=False)
    try:
        line.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate (valid in JSON, not in UTF-8): keep it as a \\u escape
        line = json.dumps(record)
    return line + "\n"


def _cell(value) -> str:
    """A CSV cell: strings as they are, null empty, booleans and nested values as JSON, numbers as Python writes
    them (a float's shortest repr, which reads back to the same value)."""
    if isinstance(value, str):
        return value
    if value is None:
        return ""
    return json.dumps(value) if isinstance(value, bool | dict | list) else str(value)


def _csv_encodable(fields: dict) -> bool:
    """Whether every string field can be written as UTF-8 (a JSON lone surrogate cannot)."""
    try:
        for value in fields.values():
            if isinstance(value, str):
                value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


# --- Resuming -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ResumePoint:
    last_line: int  # input rows up to this line are done (0: none)
    rows: int  # complete result rows the output keeps
    header: list[str] | None  # a CSV output's columns, when it has its header


def resume_point(path: Path, fmt: str, line_column: str) -> ResumePoint:
    """Where an earlier run on `path` stopped. A partial tail (a crash in mid-write) is truncated away.

    Raises ValueError when the file has rows but no `line_column` to resume from.
    """
    if not path.exists():
        return ResumePoint(0, 0, None)
    with open(path, "r+b") as file:
        end, last_line, rows, header = _complete_records(file, fmt, line_column)
        file.truncate(end)
    return ResumePoint(last_line, rows, header)


def _complete_records(file: IO[bytes], fmt: str, line_column: str) -> tuple[int, int, int, list[str] | None]:
    """(byte offset after the last complete record, its line, how many, the CSV header). Only the file's tail may
    be incomplete (a crash in mid-write); a file that is not a results file with `line_column` raises ValueError,
    so that resuming never truncates someone else's file."""
    size = os.fstat(file.fileno()).st_size
    ends, whole = [0], [True]  # after the line last read; whether it ended with a newline

    def lines() -> Iterator[str]:
        for raw in iter(file.readline, b""):
            ends[0], whole[0] = file.tell(), raw.endswith(b"\n")
            yield raw.decode("utf-8")  # what we wrote is UTF-8; a multibyte character cut short ends the tail

    def not_ours(why: str) -> ValueError:
        return ValueError(f"{file.name}: {why}, so it is not a results file to resume; pass --no-resume to replace it")

    records, header = lines(), None
    end = last_line = rows = 0
    try:
        if fmt != "jsonl":
            records = csv.reader(records, delimiter="\t" if fmt == "tsv" else ",", strict=True)
            header = next(records, None)
            if header is None or not whole[0]:
                return 0, 0, 0, None  # empty, or its header cut short
            if line_column not in header:
                raise not_ours(f"no column {line_column!r} in its header")
            end = ends[0]
        for record in records:
            if not whole[0]:
                break  # the last line, cut short
            if fmt == "jsonl":
                record = json.loads(record)
                line = record.get(line_column) if isinstance(record, dict) else None
            else:
                line = record[header.index(line_column)] if len(record) == len(header) else None
                line = int(line) if line is not None and line.isdigit() else None
            if not isinstance(line, int) or isinstance(line, bool) or line <= last_line:
                raise not_ours(f"the record ending at byte {ends[0]} has no increasing {line_column!r}")
            end, last_line, rows = ends[0], line, rows + 1
    except (csv.Error, UnicodeDecodeError, json.JSONDecodeError) as exc:
        if ends[0] < size:
            raise not_ours(f"unreadable after byte {end} ({exc})") from exc
    return end, last_line, rows, header


# --- What made an output -------------------------------------------------------------------------


def run_record(config: PredictConfig) -> dict:
    """What decides an output's records, recorded in OUT.summary.json before the first row is written and compared
    before a run adds to an output: the input's size and sha256, the sha256 of the checkpoint's config.json (labels,
    threshold, calibration, tokenizer hashes) and model.safetensors, and every option that changes a record: the
    input's and output's formats, text column, output prefix, device type, dtype, int8 and prior; for mail, how long
    messages are read (mail_windows, mail_max_windows). Batch and chunk sizes and threads are left out: they move
    probabilities only within the batch-independence bound (docs/scoring.md).

    A directory of mail is identified by its files' relative paths, sizes and sha256 in reading order
    (mail_sources.fingerprint), so resuming against another folder, or one with a file added or changed, is refused.
    Hashing reads the input and the weights once more (sha256 runs at about 480 MB/s on a 2-core EPYC: a few seconds
    a gigabyte, next to hours of scoring one). An input that is not a regular file (a pipe) is not read here; its
    sha256 is None, and check_resumable refuses to resume from it.
    """
    data, checkpoint = Path(config.data), Path(config.checkpoint)
    in_fmt, out_fmt = config.formats()
    regular = data.is_file()
    if data.is_dir():
        given = mail_fingerprint(data)
    else:
        given = {"bytes": data.stat().st_size if regular else None, "sha256": _sha256(data) if regular else None}
    return {
        "input": given,
        "checkpoint": {name: _sha256(checkpoint / name) for name in (CONFIG_FILE, WEIGHTS_FILE)},
        "input_format": in_fmt,
        "output_format": out_fmt,
        "text_column": config.text_column,
        "output_prefix": config.output_prefix,
        "device": config.scoring.torch_device.type,
        "dtype": str(config.scoring.torch_dtype).removeprefix("torch."),
        "quantize_int8": config.scoring.quantize_int8,
        "prior": config.scoring.prior,
    } | (
        {"mail_windows": config.scoring.mail_windows, "mail_max_windows": config.scoring.mail_max_windows}
        if in_fmt in MAIL_FORMATS
        else {}
    )


def check_resumable(config: PredictConfig, record: dict) -> None:
    """Nothing when --out is absent or empty, or OUT.summary.json records `record` (run_record); else ValueError
    naming what differs and how to start over, before anything is written."""
    out, _, summary_path = config.written_paths()
    if not out.exists() or out.stat().st_size == 0:
        return
    start_over = f"write to another --out, or pass --no-resume to score the input again from its start into {out}"
    try:
        recorded = json.loads(summary_path.read_text(encoding="utf-8"))["run"]
    except (OSError, ValueError, KeyError, TypeError):
        recorded = None
    if not isinstance(recorded, dict):
        raise ValueError(f"{out} exists but {summary_path} does not record the run that made it, so resuming could "
                         f"mix two runs; {start_over}")  # fmt: skip
    if record["input"]["sha256"] is None:
        raise ValueError(f"{out} exists and {config.data} is not a regular file, so resuming cannot check that it is "
                         f"the input the output was made from; {start_over}")  # fmt: skip
    differ = [_difference(name, recorded.get(name), record[name]) for name in changed_options(record, recorded)]
    if differ:
        raise ValueError(f"{out} was made by another run ({'; '.join(differ)}); resuming would mix the two in one "
                         f"file: {start_over}")  # fmt: skip


def _difference(name: str, then, now) -> str:
    if name == "input":
        return f"another input: {_brief(then)} then, {_brief(now)} now"
    if name == "checkpoint":
        files = sorted(k for k in (now or {}) if (then or {}).get(k) != now[k])
        return f"another checkpoint: its {' and '.join(files)} differ"
    return f"{name} {then!r} then, {now!r} now"


def _brief(record) -> str:
    if not isinstance(record, dict):
        return repr(record)
    return f"{record.get('bytes')} bytes, sha256 {str(record.get('sha256'))[:12]}"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while block := file.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


# --- The command ----------------------------------------------------------------------------------


def predict(config: PredictConfig) -> dict:
    """Score a CSV / TSV / JSONL / SMSSpamCollection / plain-text file into a CSV / TSV / JSONL file, in constant
    memory; resumes an output that the same run made (run_record), and refuses any other.

    Returns the summary also written to OUT.summary.json: what made the output (run_record), rows written in all,
    scored by this run and kept from an earlier one, bad rows, seconds and rows per second.
    Raises CheckpointError for a checkpoint that cannot be loaded, RuntimeError for a device that is not there
    (Classifier.load); ValueError for an input without a header or text
    column, result columns that clash with the input's, or an output to resume that another run made or that has
    other columns; OSError.
    """
    data = Path(config.data)
    in_fmt, out_fmt = config.formats()
    out, bad_path, summary_path = config.written_paths()
    classifier = Classifier.load(config.checkpoint, config.scoring)
    index = _index_column(in_fmt)
    added = [config.output_prefix + name for name in (index, *result_columns(classifier.card.labels))]
    record = run_record(config)
    if config.resume:
        check_resumable(config, record)
    else:
        out.unlink(missing_ok=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    about = {"input": str(data), "output": str(out), "checkpoint": str(config.checkpoint), "run": record}
    _write_json(summary_path, {**about, "complete": False})  # before the first row: a crash leaves it resumable
    point = resume_point(out, out_fmt, added[0])
    with open_rows(data, in_fmt, config.text_column, classifier.extraction) as (columns, rows):
        clash = sorted(set(columns or ()) & set(added))
        if clash:
            raise ValueError(f"{data}: the input has columns named like the results {clash}; pass --output-prefix, "
                             "e.g. --output-prefix predicted_")  # fmt: skip
        if point.rows:
            print(f"resuming: {point.rows} rows already in {out}; scoring the input after {index} {point.last_line}")
        output = Output(out, out_fmt, point.header)
        try:
            if columns is not None:  # known before any row: the header goes out (or is checked) even with no rows
                output.start([*columns, *added])
        except ValueError:
            output.close()
            raise
        run = _Run(classifier, output, added, columns, bad_path, config)
        start = time.perf_counter()
        try:
            run.score(rows, point.last_line)
        finally:
            run.close()
    seconds = time.perf_counter() - start
    summary = {
        **about,
        "complete": True,
        "rows_written": point.rows + run.scored,
        "rows_scored": run.scored,
        "rows_kept_from_earlier_run": point.rows,
        "bad_rows": run.bad,
        "bad_rows_file": str(bad_path),
        "seconds": round(seconds, 3),
        "rows_per_second": round(run.scored / seconds, 2) if seconds > 0 else None,
    }
    _write_json(summary_path, summary)
    print(
        f"{run.scored} rows scored ({summary['rows_per_second']} rows/s), {point.rows} kept from an earlier run; "
        f"{run.bad} bad rows" + (f", listed in {bad_path}" if run.bad else "") + f"; results in {out}"
    )
    if run.output.dropped:
        print(f"note: fields missing from the CSV header (taken from the first object) were left out: "
              f"{sorted(run.output.dropped)}", file=sys.stderr)  # fmt: skip
    return summary


def _index_column(in_fmt: str) -> str:
    """The column numbering the input's rows: `line` where a row starts, or for mail the `message`'s number."""
    return "message" if in_fmt in MAIL_FORMATS else "line"


def _write_json(path: Path, value: dict) -> None:
    """`value` as `path`, whole or not at all: written to a new file beside it (never an existing one, which could be
    the input), then renamed over it."""
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=path.name, delete=False) as partial:
        partial.write(json.dumps(value, indent=2) + "\n")
    Path(partial.name).replace(path)


class _Run:
    """One pass over the remaining input: chunks scored and written, bad rows reported and recorded."""

    def __init__(self, classifier: Classifier, output, added, columns, bad_path, config: PredictConfig):
        self.classifier, self.output, self.added, self.columns, self.config = classifier, output, added, columns, config
        self.bad_file = open(bad_path, "w", encoding="utf-8")  # noqa: SIM115 (closed by close())
        self.scored = self.bad = 0
        self.index = _index_column(config.formats()[0])
        self.bar = tqdm(desc="scoring", unit="row", disable=not config.progress, file=sys.stderr, dynamic_ncols=True)

    def score(self, items: Iterator[Row | BadRow], done_through: int) -> None:
        """Score the rows after line `done_through`; bad rows are recorded all through the input (reading them
        again is cheap and gives the same verdicts), and reported on stderr only after that line."""
        chunk = []
        for item in items:
            if isinstance(item, Row):
                item = self._writable(item)
            if isinstance(item, BadRow):
                self._report(item, quiet=item.line <= done_through)
                continue
            if item.line <= done_through:
                continue
            chunk.append(item)
            if len(chunk) == self.config.chunk_rows:
                self._flush(chunk)
                chunk = []
        self._flush(chunk)

    def _writable(self, row: Row) -> Row | BadRow:
        clash = row.fields.keys() & set(self.added)
        if clash:
            return BadRow(row.line, f"fields named like the results {sorted(clash)}; pass --output-prefix")
        if self.output.fmt != "jsonl" and not _csv_encodable(row.fields):
            return BadRow(row.line, "a field cannot be written as UTF-8 CSV (a lone surrogate); write .jsonl")
        return row

    def _flush(self, chunk: list[Row]) -> None:
        if not chunk:
            return
        self.output.start([*(self.columns or list(chunk[0].fields)), *self.added])
        try:
            predictions = self._predictions(chunk)
        except NonFiniteLogits as exc:  # a fault of the model: stop, with every earlier chunk written (resumable)
            lines = ", ".join(str(chunk[i].line) for i in exc.rows)
            raise ValueError(f"{self.config.data}, lines {lines}: {exc}; the output stops before them") from exc
        prefix = self.config.output_prefix
        self.output.write(
            [
                {**row.fields, self.added[0]: row.line, **{prefix + k: v for k, v in result_record(p).items()}}
                for row, p in zip(chunk, predictions, strict=True)
            ]
        )
        self.scored += len(chunk)
        self.bar.update(len(chunk))

    def _predictions(self, chunk: list[Row]) -> list:
        """The chunk's Predictions: texts by Classifier.classify; messages as the server reads them, in windows
        combined by the options' rule (Classifier.message_rows, message_predictions). Raises NonFiniteLogits naming
        rows of the chunk."""
        if chunk[0].mail is None:
            return self.classifier.classify([row.text for row in chunk])
        messages = [self.classifier.message_rows(row.mail) for row in chunk]
        owner = [i for i, m in enumerate(messages) for _ in m.rows]  # each window's message
        options = self.classifier.options
        try:
            logits = self.classifier.predict_logits([w for m in messages for w in m.rows], options.batch_size,
                                                    options.max_batch_tokens)  # fmt: skip
            require_finite(logits)
        except NonFiniteLogits as exc:
            raise NonFiniteLogits(sorted({owner[i] for i in exc.rows})) from exc
        return self.classifier.message_predictions(messages, logits)

    def _report(self, bad: BadRow, quiet: bool) -> None:
        self.bad += 1
        self.bad_file.write(json.dumps({self.index: bad.line, "error": bad.error}) + "\n")
        self.bar.set_postfix(bad=self.bad, refresh=False)
        if quiet:
            return
        if self.bad <= MAX_PRINTED_BAD_ROWS:
            self.bar.write(f"{self.config.data}, {self.index} {bad.line}: {bad.error}; skipped", file=sys.stderr)
        elif self.bad == MAX_PRINTED_BAD_ROWS + 1:
            self.bar.write(f"more bad rows: see {self.bad_file.name}", file=sys.stderr)

    def close(self) -> None:
        self.bar.close()
        self.bad_file.close()
        self.output.close()
