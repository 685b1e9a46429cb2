"""`python -m training predict`: score a file of any size with an exported checkpoint, in constant memory.

    python -m training predict --checkpoint checkpoints/spamgpt --data messages.csv --out scores.csv

In: a .csv / .tsv with a header row (csv quoting; a quoted field may span lines), a .jsonl (one JSON object a line)
or, for any other suffix, plain text (one text a line). Out: .csv, .tsv or .jsonl, one row per good input row, in
input order: the input's columns, then `line` (where the row starts in the input), `label`, `probability_<label>`
for each of the model's labels, `tokens` (after truncation) and `truncated`: what `POST /classify` answers for the
text (training.scoring.records builds both from training.runtime.classifier.Classifier.predictions).

Rows are read, scored and written `chunk_rows` at a time, so memory is bounded by one chunk whatever the file's size.
A bad row (not UTF-8, not JSON, no text, wrong number of fields) is reported with its line number on stderr and in
OUT.bad-rows.jsonl, and the run goes on; OUT.summary.json counts both. Rerun on the same --out, the run resumes: the
output's complete rows are kept (a row cut short by a crash is removed) and only input rows after the last line
written are scored (the input is read again up to there, for the bad rows file, which each run writes whole).
"""

import csv
import io
import json
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from tqdm import tqdm

from training.config import INPUT_FORMATS, OUTPUT_FORMATS, PredictConfig, file_format
from training.runtime.classifier import Classifier
from training.runtime.inference import NonFiniteLogits
from training.scoring.records import result_columns, result_record, usable_text

BAD_ROWS_SUFFIX, SUMMARY_SUFFIX = ".bad-rows.jsonl", ".summary.json"
MAX_PRINTED_BAD_ROWS = 20  # on stderr; all of them go to the bad-rows file
LINES_COLUMN = "text"  # the one column of a plain-text input


@dataclass(frozen=True)
class Row:
    line: int  # 1-based line of the input where the row starts
    fields: dict  # the input's columns (a JSON object's fields) as read
    text: str


@dataclass(frozen=True)
class BadRow:
    line: int
    error: str


# --- Reading --------------------------------------------------------------------------------------


@contextmanager
def open_rows(path: Path, fmt: str, text_column: str) -> Iterator[tuple[list[str] | None, Iterator[Row | BadRow]]]:
    """The input's columns (None for JSONL, whose objects name their own) and its rows, read lazily while the
    context is open.

    Raises ValueError for a CSV / TSV without a header row or without `text_column`, OSError for a missing file.
    """
    with open(path, "rb") as file:
        if fmt == "jsonl":
            yield None, _jsonl_rows(file, text_column)
        elif fmt == "lines":
            yield [LINES_COLUMN], _plain_rows(file)
        else:
            with io.TextIOWrapper(file, encoding="utf-8-sig", errors="surrogateescape", newline="") as text:
                reader = csv.reader(text, delimiter="\t" if fmt == "tsv" else ",")
                header = next(reader, None)
                if not header:
                    raise ValueError(f"{path}: no header row")
                if text_column not in header or len(set(header)) != len(header):
                    raise ValueError(
                        f"{path}: the header must name distinct columns including {text_column!r}, got {header!r}"
                    )
                yield header, _csv_rows(reader, header, text_column)


def _csv_rows(reader, header: list[str], text_column: str) -> Iterator[Row | BadRow]:
    column = header.index(text_column)
    while True:
        line = reader.line_num + 1  # where the next record starts
        try:
            record = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            yield BadRow(line, f"not CSV: {exc}")
            continue
        if not record:  # a blank line
            continue
        if len(record) != len(header):
            yield BadRow(line, f"{len(record)} fields, the header has {len(header)}")
        elif any(_undecodable(value) for value in record):
            yield BadRow(line, "not UTF-8 text")
        else:
            yield _checked(line, dict(zip(header, record, strict=True)), record[column], text_column)


def _jsonl_rows(file: IO[bytes], text_column: str) -> Iterator[Row | BadRow]:
    for line, source in _numbered_lines(file):
        if source is None:
            yield BadRow(line, "not UTF-8 text")
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
        if text is None:
            yield BadRow(line, "not UTF-8 text")
        else:
            yield _checked(line, {LINES_COLUMN: text}, text, LINES_COLUMN)


def _numbered_lines(file: IO[bytes]) -> Iterator[tuple[int, str | None]]:
    """(1-based number, the line without "\n" or "\r\n", or None where it is not UTF-8); decoded line by line, so
    that a bad byte costs only its own line."""
    for number, raw in enumerate(file, start=1):
        if number == 1:
            raw = raw.removeprefix(b"\xef\xbb\xbf")  # a UTF-8 byte order mark
        try:
            yield number, raw.removesuffix(b"\n").removesuffix(b"\r").decode("utf-8")
        except UnicodeDecodeError:
            yield number, None


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


# --- The command ----------------------------------------------------------------------------------


def predict(config: PredictConfig) -> dict:
    """Score a CSV / TSV / JSONL / plain-text file into a CSV / TSV / JSONL file, in constant memory; resumes.

    Returns the summary also written to OUT.summary.json: rows written in all, scored by this run and kept from an
    earlier one, bad rows, seconds and rows per second.
    Raises CheckpointError for a checkpoint that cannot be loaded, RuntimeError for a device that is not there
    (Classifier.load); ValueError for an input without a header or text column, result columns that clash with the
    input's, or an output to resume that has other columns; OSError.
    """
    data, out = Path(config.data), Path(config.out)
    in_fmt = file_format(config.data, config.input_format, INPUT_FORMATS, default="lines")
    out_fmt = file_format(config.out, config.output_format, OUTPUT_FORMATS)
    bad_path, summary_path = out.with_name(out.name + BAD_ROWS_SUFFIX), out.with_name(out.name + SUMMARY_SUFFIX)
    classifier = Classifier.load(config.checkpoint, config.scoring)
    added = [config.output_prefix + name for name in ("line", *result_columns(classifier.card.labels))]
    if not config.resume:
        out.unlink(missing_ok=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    point = resume_point(out, out_fmt, added[0])
    with open_rows(data, in_fmt, config.text_column) as (columns, rows):
        clash = sorted(set(columns or ()) & set(added))
        if clash:
            raise ValueError(f"{data}: the input has columns named like the results {clash}; pass --output-prefix, "
                             "e.g. --output-prefix predicted_")  # fmt: skip
        if point.rows:
            print(f"resuming: {point.rows} rows already in {out}; scoring the input after line {point.last_line}")
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
        "input": str(data),
        "output": str(out),
        "checkpoint": str(config.checkpoint),
        "rows_written": point.rows + run.scored,
        "rows_scored": run.scored,
        "rows_kept_from_earlier_run": point.rows,
        "bad_rows": run.bad,
        "bad_rows_file": str(bad_path),
        "seconds": round(seconds, 3),
        "rows_per_second": round(run.scored / seconds, 2) if seconds > 0 else None,
    }
    summary_path.write_text(json.dumps(summary, indent=2) + "\n")
    print(
        f"{run.scored} rows scored ({summary['rows_per_second']} rows/s), {point.rows} kept from an earlier run; "
        f"{run.bad} bad rows" + (f", listed in {bad_path}" if run.bad else "") + f"; results in {out}"
    )
    if run.output.dropped:
        print(f"note: fields missing from the CSV header (taken from the first object) were left out: "
              f"{sorted(run.output.dropped)}", file=sys.stderr)  # fmt: skip
    return summary


class _Run:
    """One pass over the remaining input: chunks scored and written, bad rows reported and recorded."""

    def __init__(self, classifier: Classifier, output, added, columns, bad_path, config: PredictConfig):
        self.classifier, self.output, self.added, self.columns, self.config = classifier, output, added, columns, config
        self.bad_file = open(bad_path, "w", encoding="utf-8")  # noqa: SIM115 (closed by close())
        self.scored = self.bad = 0
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
            predictions = self.classifier.classify([row.text for row in chunk])
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

    def _report(self, bad: BadRow, quiet: bool) -> None:
        self.bad += 1
        self.bad_file.write(json.dumps({"line": bad.line, "error": bad.error}) + "\n")
        self.bar.set_postfix(bad=self.bad, refresh=False)
        if quiet:
            return
        if self.bad <= MAX_PRINTED_BAD_ROWS:
            self.bar.write(f"{self.config.data}, line {bad.line}: {bad.error}; skipped", file=sys.stderr)
        elif self.bad == MAX_PRINTED_BAD_ROWS + 1:
            self.bar.write(f"more bad rows: see {self.bad_file.name}", file=sys.stderr)

    def close(self) -> None:
        self.bar.close()
        self.bad_file.close()
        self.output.close()
