"""From a raw RFC 5322 message to the text the model reads: the one function (read_message) that training, file
scoring and every serving route call, so the model sees the same text everywhere.

The text is the chosen header fields, one `Name: value` line each, a blank line, then the readable body:

- parsed by the standard library's `email` feed parser, which never raises on malformed MIME but records defects on
  the parts; the count of them is returned. The MIME structure is read with policy.compat32's header handling,
  the header fields the model reads are decoded by policy.default's (RFC 2047 encoded words, folding): under
  policy.default the parser runs the full RFC 5322 grammar over every part's Content-Type field, several times
  per part, at about 30 us a character (measured: a 4 MiB message of 4,140 parts with 998-character Content-Type
  fields took 125 s to parse, 0.16 s with compat32's);
- inside a multipart/alternative, the text/plain alternative when there is one, else the text/html one (RFC 2046
  5.1.4: the alternatives say the same thing);
- every other text/plain or text/html leaf that is not an attachment is read, in order; text/html converted to
  text by Beautiful Soup (beautifulsoup4, MIT) with Python's own html.parser, which reads broken markup as
  browsers do and leaves out script, style and comments;
- transfer encodings (base64, quoted-printable) decoded; a body's bytes decoded by the declared charset, else,
  when that charset is unknown or the bytes are not valid in it, as UTF-8, else as Windows-1252, else as Latin-1
  (which decodes any byte); raw 8-bit bytes in a header field alike, from UTF-8 on; an encoded word in an unknown
  charset is read with replacement characters;
- attachments (a filename, `Content-Disposition: attachment`, or a type that is not text) named and never decoded.

What a message may cost is bounded: its first Extraction.max_bytes bytes are read; the body's text is cut at
Extraction.max_chars characters (each part's text too, text/html's after its conversion, of at most MARKUP_PER_CHAR
characters of markup a character; later parts are then not read); a header field's value at MAX_HEADER_CHARS, for the
parser too (the standard library's parameter parsing is quadratic in a field's length: a 1 MB Content-Type field took a
minute); the parts read at MAX_PARTS; and a message declaring more than MAX_MULTIPARTS multiparts, nested deeper than
the parser's recursion allows, or cut at max_bytes inside its header block, is read from its headers alone and counted
as a defect. Bytes that do not start with a header field are no message (is_message).
"""

import codecs
import re
from dataclasses import asdict, dataclass, field
from email import errors, policy
from email.message import Message
from email.parser import BytesParser
from email.policy import Compat32

import torch
from bs4 import BeautifulSoup

from training.runtime.record import from_flat

# The rules above. A checkpoint records the version it was trained with; serving refuses a version it does not
# implement (training.runtime.checkpoint reads it). Raise it whenever the text read from a message changes.
EXTRACTION_VERSION = 1
HTML_CONVERTER = "beautifulsoup4/html.parser"


@dataclass(frozen=True)
class Extraction:
    """How a message becomes text: what a checkpoint's card records (ModelCard.extraction) so that serving reads
    messages exactly as training did. In config.json: {"version": 1, "headers": [...], "html": ..., "max_chars": n}.

    Raises ValueError for a version this code does not implement, an HTML converter other than HTML_CONVERTER, a
    header name that is not one, or max_chars below 1.
    """

    version: int = EXTRACTION_VERSION  # of the module's rules
    # header fields read, in this order, each as a `Name: value` line above the body (absent fields are skipped).
    # Subject and From by measurement (benchmarks/mail_reading.py, docs/mail.md): the best ROC-AUC of none, Subject,
    # and Subject and From, on validation and evaluation rows of the SpamAssassin corpus
    headers: tuple[str, ...] = ("Subject", "From")
    html: str = HTML_CONVERTER  # how text/html is turned into text
    # bytes of the raw message parsed: the parser holds about 8 bytes per byte it reads (lines as strings), and the
    # text sits before the attachments; what lies past this is not read
    max_bytes: int = 1 << 20
    # characters of body text read: bounds what a huge body costs; far beyond what the model's windows read (a
    # GPT-2 token is about 4 characters of English), and below training's limit on a row (131,072 characters)
    max_chars: int = 100_000

    def __post_init__(self):
        if self.version != EXTRACTION_VERSION:
            raise ValueError(
                f"extraction version {self.version!r} is not implemented (this spamgpt reads messages by version "
                f"{EXTRACTION_VERSION})"
            )
        if self.html != HTML_CONVERTER:
            raise ValueError(f"html converter {self.html!r} is not implemented (this spamgpt has {HTML_CONVERTER!r})")
        if not all(isinstance(h, str) and re.fullmatch(r"[!-9;-~]+", h) for h in self.headers):
            raise ValueError(f"headers must be header field names (RFC 5322 2.2), got {self.headers!r}")
        for name in ("max_bytes", "max_chars"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)!r}")

    def to_json(self) -> dict:
        """The extraction in config.json's shape."""
        return {**asdict(self), "headers": list(self.headers)}

    @classmethod
    def from_json(cls, record: dict) -> "Extraction":
        """The extraction config.json records; TypeError naming a value of the wrong type, ValueError as the class
        says (a version this code does not implement first)."""
        record = dict(record)
        headers = record.get("headers", list(cls.headers))
        if not isinstance(headers, list) or not all(isinstance(h, str) for h in headers):
            raise TypeError(f"headers must be a list of strings, got {headers!r}")
        record["headers"] = tuple(headers)
        if "version" not in record:
            raise TypeError("version is missing")
        return from_flat(cls, record)


DEFAULT_EXTRACTION = Extraction()


@dataclass(frozen=True)
class MailText:
    """What read_message made of one message."""

    text: str  # what the model reads: the header lines, a blank line, the readable body
    subject: str  # decoded; "" when absent
    message_id: str | None  # the Message-ID field as written, None when absent
    # malformations the parser recorded (RFC 5322 / MIME), plus one for each bound it met (module docstring): a
    # message cut at max_bytes, a body at max_chars, parts past MAX_PARTS, a nesting too deep to read past its
    # headers, a header value over MAX_HEADER_CHARS
    defects: int
    attachments: tuple[str, ...] = field(default_factory=tuple)  # filenames, or the content type of unnamed ones


def read_message(raw: bytes, extraction: Extraction = DEFAULT_EXTRACTION) -> MailText:
    """A raw message (RFC 5322 bytes, any line endings) -> the text the model reads, by the module's rules.

    Never raises on malformed input: a message is read as far as it goes, and the malformations are counted in
    `defects`; bytes that are no message (is_message: b"", a text without header fields) are read as no text and
    one defect. The text may show nothing (no readable part, empty subject):
    callers refuse that by training.runtime.text.has_visible_characters, as for any text.
    """
    if not is_message(raw):
        return MailText(text="", subject="", message_id=None, defects=1)
    parser, cut = BytesParser(policy=_RAW_HEADERS), len(raw) > extraction.max_bytes
    raw = raw[: extraction.max_bytes]
    # a cut inside the header block: no body is read (what the parser would take for one is a header's fragment)
    headers_cut = cut and not _HEADER_END.search(raw)
    too_deep = sum(1 for _ in _MULTIPART.finditer(raw)) > MAX_MULTIPARTS
    try:
        message = parser.parsebytes(raw, headersonly=too_deep or headers_cut)
    except RecursionError:  # the feed parser recurses once per multipart level
        message, too_deep = parser.parsebytes(raw, headersonly=True), True
    defects = cut + too_deep + len(message.defects)
    lines = []
    for name in extraction.headers:
        value, header_defects = _header(message, name)
        defects += header_defects
        if value:
            lines.append(f"{name}: {value}")
    skip_body = too_deep or headers_cut
    body, attachments, part_defects = ([], [], 0) if skip_body else _read_parts(message, extraction.max_chars)
    subject, _ = _header(message, "Subject")
    message_id, _ = _header(message, "Message-ID")
    return MailText(
        text="\n".join(lines) + "\n\n" + "\n\n".join(body) if lines else "\n\n".join(body),
        subject=subject,
        message_id=message_id or None,
        defects=defects + part_defects,
        attachments=tuple(attachments),
    )


NOT_A_MESSAGE = "not a message: it does not start with a header field"
# A message starts with a header field (RFC 5322 2.2: a name of printable ASCII but the colon, then a colon), after
# the "From " line an mbox or the SpamAssassin corpus may keep above it. Bytes that do not (a text, a picture, NUL
# bytes) are no mail: read as one, all of them would be a body.
_MESSAGE_START = re.compile(rb"(From [^\n]*\n)?[!-9;-~]+:")
_HEADER_END = re.compile(rb"\n\r?\n")


def is_message(raw: bytes) -> bool:
    """Whether `raw` starts as a message does, with a header field (after an mbox's "From " line). read_message
    reads anything else as no text (one defect), so every caller refuses it, naming it by NOT_A_MESSAGE."""
    return bool(_MESSAGE_START.match(raw))


class _RawHeaders(Compat32):
    """compat32, with each header field's value as the parser stored it (ASCII, undecodable bytes as surrogate
    escapes: BytesParser's reading; folds kept), cut after MAX_HEADER_CHARS + 1 characters (one more, so that a
    cut shows). _header decodes the fields the model reads."""

    def header_fetch_parse(self, name: str, value: str) -> str:
        return value[: MAX_HEADER_CHARS + 1]


_RAW_HEADERS = _RawHeaders()
# multipart containers a message may declare (counted over its lines, a bound above the true count) before it is read
# from its headers alone: the feed parser checks every line against each enclosing boundary, so its time grows with
# the square of the nesting (measured: 300 levels 2.2 s, 2,000 levels 9.5 s); real mail nests a few
MAX_MULTIPARTS = 100
_MULTIPART = re.compile(rb"^content-type:\s*multipart/", re.IGNORECASE | re.MULTILINE)
MAX_HEADER_CHARS = 4096  # of a header field's value read: policy.default's parser costs ~30 us a character
# parts of a message read (multiparts included); the rest is left unread and counted as one defect. Reading a
# part's MIME fields costs up to ~1 ms (998-character Content-Type fields); real mail has a few dozen parts
MAX_PARTS = 256
# characters of markup converted per character of text still to read: Beautiful Soup's tree costs about 100 bytes and
# 10 us a character of markup (1 MiB of HTML: 103 MiB, 10 s under load), and markup outweighs its text a few times
# (20,000 nested <div> around a sentence: 220,000 characters)
MARKUP_PER_CHAR = 4
# what the stdlib's header parsers raise on some malformed values instead of recording a defect
_PARSE_ERRORS = (errors.HeaderParseError, ValueError, IndexError, LookupError, AttributeError, TypeError)


def _header(message: Message, name: str) -> tuple[str, int]:
    """A header field's value (its first occurrence; "" when absent), decoded and unfolded, and the defects found
    reading it."""
    raw = message.get(name)
    if raw is None:
        return "", 0
    unfolded = re.sub(r"\r?\n(?=[ \t])", "", raw[:MAX_HEADER_CHARS])
    try:
        value = policy.default.header_factory(name, _decode(unfolded.encode("ascii", "surrogateescape"), None))
    except _PARSE_ERRORS:
        return _scrub(" ".join(unfolded.split())), 1  # a value policy.default's parser cannot read: as written
    return _scrub(" ".join(str(value).split())), len(value.defects) + int(len(raw) > MAX_HEADER_CHARS)


def _read_parts(message: Message, max_chars: int) -> tuple[list[str], list[str], int]:
    """The readable bodies (max_chars characters in all), the attachments' names and the parts' defects, in
    document order (iteratively: the depth of a message that parsed is bounded by the parser's recursion, but a
    walk needs no stack)."""
    body, attachments, defects, left = [], [], 0, max_chars
    stack = [message]
    for _ in range(MAX_PARTS):
        if not stack:
            break
        part = stack.pop()
        if part.is_multipart():
            children = part.get_payload()
            if part.get_content_subtype() == "alternative":
                children = [_preferred_alternative(children)] if children else []
            stack.extend(reversed(children))
        elif _is_attachment(part):
            attachments.append(_attachment_name(part))
        elif part.get_content_type() in ("text/plain", "text/html") and left > 0:
            text, cut = _decoded_text(part), 0
            if part.get_content_type() == "text/html":
                markup = MARKUP_PER_CHAR * left
                text, cut = _html_to_text(text[:markup]), int(len(text) > markup)
            text, cut = text[:left], cut or len(text) > left
            text = _scrub(text).strip()
            left -= len(text)
            defects += cut
            if text:
                body.append(text)
        defects += len(part.defects)  # after decoding: the decoder records what it could not decode (bad base64)
    return body, attachments, defects + int(bool(stack))


def _preferred_alternative(children: list[Message]) -> Message:
    """text/plain when an alternative is one, else text/html, else the last (RFC 2046: the richest is last)."""
    for wanted in ("text/plain", "text/html"):
        for child in children:
            if child.get_content_type() == wanted and not _is_attachment(child):
                return child
    return children[-1]


def _is_attachment(part: Message) -> bool:
    """A part the reader does not read: a filename, an attachment disposition, or a type that is not text."""
    return (
        _filename(part) is not None
        or part.get_content_disposition() == "attachment"
        or part.get_content_maintype() != "text"
    )


def _filename(part: Message) -> str | None:
    """The part's filename (Content-Disposition's, else Content-Type's name; RFC 2231 and encoded words decoded)."""
    name = part.get_filename()
    if name is None:
        return None
    decoded = policy.default.header_factory("subject", _decode(name.encode("utf-8", "surrogateescape"), None))
    return _scrub(" ".join(str(decoded).split())) or "unnamed"


def _attachment_name(part: Message) -> str:
    return _filename(part) or part.get_content_type()


def _decoded_text(part: Message) -> str:
    """A text part's content, transfer encoding and charset decoded (bounded by the bytes read, max_bytes)."""
    return _decode(part.get_payload(decode=True) or b"", part.get_content_charset())


def _decode(payload: bytes, charset: str | None) -> str:
    """The declared charset when Python knows it and the bytes are valid in it, else UTF-8, else Windows-1252,
    else Latin-1, which reads every byte."""
    for name in (charset, "utf-8", "cp1252"):
        if not name:
            continue
        try:
            codecs.lookup(name)
            return payload.decode(name)
        except (LookupError, UnicodeDecodeError, ValueError):
            continue
    return payload.decode("latin-1")


def _html_to_text(html: str) -> str:
    """text/html as the text a browser shows: Beautiful Soup's strings without script, style or comments."""
    return BeautifulSoup(html, "html.parser").get_text()


def _scrub(text: str) -> str:
    """Lone surrogates as U+FFFD; runs of blank lines as one."""
    text = re.sub("[\ud800-\udfff]", "\ufffd", text)
    return re.sub(r"\n\s*\n\s*", "\n\n", text)


# --- Long mail: windows ------------------------------------------------------------------------------------------

# How a message longer than max_tokens is read: "first": its first max_tokens tokens, as training reads every row;
# "mean": the mean of its windows' logits; "max": the window that gives the positive label (spam) the highest
# probability (for more than two labels, the window whose top label is most probable), as a reader who stops at
# the first spammy passage.
WINDOW_RULES = ("first", "mean", "max")


def windows(ids: list[int], max_tokens: int, max_windows: int) -> tuple[list[list[int]], bool]:
    """A text's token ids cut into consecutive windows of max_tokens (the last shorter), at most max_windows of
    them, and whether tokens were left unread. An empty text is one window of no tokens (the caller's tokenizer
    gives it its end-of-text token)."""
    rows = [ids[start : start + max_tokens] for start in range(0, max(len(ids), 1), max_tokens)]
    return rows[:max_windows], len(rows) > max_windows


def combine_windows(logits: torch.Tensor, counts: list[int], rule: str, positive: int | None) -> torch.Tensor:
    """(sum(counts), n_labels) window logits, each message's windows consecutive in message order ->
    (len(counts), n_labels) message logits by `rule` (WINDOW_RULES); `positive`: the positive label's column
    (training.runtime.inference.positive_label), None beyond two labels. The logits must be finite."""
    assert logits.shape[0] == sum(counts), (logits.shape, sum(counts))
    out = []
    for window_logits in torch.split(logits, counts):
        if rule == "first":
            out.append(window_logits[0])
        elif rule == "mean":
            out.append(window_logits.mean(dim=0))
        else:
            log_probs = torch.log_softmax(window_logits, dim=1)
            score = log_probs[:, positive] if positive is not None else log_probs.max(dim=1).values
            out.append(window_logits[score.argmax()])
    return torch.stack(out) if out else logits.new_empty(0, logits.shape[1])
