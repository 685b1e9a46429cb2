"""From a raw RFC 5322 message to the text the model reads: the one function (read_message) that training, file
scoring and every serving route call, so the model sees the same text everywhere.

The text is the chosen header fields, one `Name: value` line each, a blank line, then the readable body:

- parsed by the standard library's `email` package (policy.default), which never raises on malformed MIME but
  records defects on the parts; the count of them is returned;
- inside a multipart/alternative, the text/plain alternative when there is one, else the text/html one (RFC 2046
  5.1.4: the alternatives say the same thing);
- every other text/plain or text/html leaf that is not an attachment is read, in order; text/html converted to
  text by Beautiful Soup (beautifulsoup4, MIT) with Python's own html.parser, which reads broken markup as
  browsers do and leaves out script, style and comments;
- transfer encodings (base64, quoted-printable) decoded; the body's bytes decoded by the declared charset, else,
  when that charset is unknown or the bytes are not valid in it, as UTF-8, else as Windows-1252, else as Latin-1
  (which decodes any byte);
- attachments (a filename, `Content-Disposition: attachment`, or a type that is not text) named and never decoded.

What a message may cost is bounded: each readable part's decoded text is cut at Extraction.max_chars characters
before any HTML conversion, and a message nested deeper than the parser's recursion allows (the `email` feed parser
recurses once per multipart level) is read from its headers alone and counted as a defect.
"""

import binascii
import codecs
import re
from dataclasses import asdict, dataclass, field
from email import errors, policy
from email.message import EmailMessage
from email.parser import BytesParser

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
    # header fields read, in this order, each as a `Name: value` line above the body (absent fields are skipped)
    headers: tuple[str, ...] = ("Subject",)
    html: str = HTML_CONVERTER  # how text/html is turned into text
    # characters read from each part's decoded text: bounds what a huge body costs; far beyond what the model's
    # windows read (a GPT-2 token is about 4 characters of English)
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
        if self.max_chars < 1:
            raise ValueError(f"max_chars must be at least 1, got {self.max_chars!r}")

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
    defects: int  # malformations the parser recorded (RFC 5322 / MIME), plus one for each part cut or left unread
    attachments: tuple[str, ...] = field(default_factory=tuple)  # filenames, or the content type of unnamed ones


def read_message(raw: bytes, extraction: Extraction = DEFAULT_EXTRACTION) -> MailText:
    """A raw message (RFC 5322 bytes, any line endings) -> the text the model reads, by the module's rules.

    Never raises on malformed input: anything (b"", a text that is no message) is read as far as it goes, and
    the malformations are counted in `defects`. The text may show nothing (no readable part, empty subject):
    callers refuse that by training.runtime.text.has_visible_characters, as for any text.
    """
    parser = BytesParser(policy=policy.default)
    try:
        message = parser.parsebytes(raw)
        too_deep = 0
    except RecursionError:  # the feed parser recurses once per multipart level
        message = parser.parsebytes(raw, headersonly=True)
        too_deep = 1
    defects = too_deep + len(message.defects)
    lines = []
    for name in extraction.headers:
        value, header_defects = _header(message, name)
        defects += header_defects
        if value:
            lines.append(f"{name}: {value}")
    body, attachments, part_defects = ([], [], 0) if too_deep else _read_parts(message, extraction.max_chars)
    subject, _ = _header(message, "Subject")
    message_id, _ = _header(message, "Message-ID")
    return MailText(
        text="\n".join(lines) + "\n\n" + "\n\n".join(body) if lines else "\n\n".join(body),
        subject=subject,
        message_id=message_id or None,
        defects=defects + part_defects,
        attachments=tuple(attachments),
    )


def _header(message: EmailMessage, name: str) -> tuple[str, int]:
    """A header field's decoded value ("" when absent) and the defects found parsing it."""
    try:
        value = message.get(name)
    except (errors.HeaderParseError, ValueError, IndexError, LookupError, AttributeError, TypeError):
        return "", 1  # a value policy.default's parser cannot read at all
    if value is None:
        return "", 0
    text = " ".join(str(value).split())
    return _scrub(text), len(getattr(value, "defects", ()))


def _read_parts(message: EmailMessage, max_chars: int) -> tuple[list[str], list[str], int]:
    """The readable bodies, the attachments' names and the parts' defects, in document order (iteratively: the
    depth of a message that parsed is bounded by the parser's recursion, but a walk needs no stack)."""
    body, attachments, defects = [], [], 0
    stack = [message]
    while stack:
        part = stack.pop()
        defects += len(part.defects)
        if part.is_multipart():
            children = part.get_payload()
            if not isinstance(children, list):  # multipart whose body did not parse into parts
                continue
            if part.get_content_subtype() == "alternative":
                children = [_preferred_alternative(children)] if children else []
            stack.extend(reversed(children))
        elif _is_attachment(part):
            attachments.append(_attachment_name(part))
        elif part.get_content_type() in ("text/plain", "text/html"):
            text, cut = _decoded_text(part, max_chars)
            if part.get_content_type() == "text/html":
                text = _html_to_text(text)
            text = _scrub(text).strip()
            defects += cut
            if text:
                body.append(text)
    return body, attachments, defects


def _preferred_alternative(children: list) -> EmailMessage:
    """text/plain when an alternative is one, else text/html, else the last (RFC 2046: the richest is last)."""
    for wanted in ("text/plain", "text/html"):
        for child in children:
            if child.get_content_type() == wanted and not _is_attachment(child):
                return child
    return children[-1]


def _is_attachment(part: EmailMessage) -> bool:
    """A part the reader does not read: a filename, an attachment disposition, or a type that is not text."""
    try:
        named = part.get_filename() is not None
    except (errors.HeaderParseError, ValueError, IndexError, LookupError, AttributeError, TypeError):
        named = True  # a disposition so malformed its filename cannot be read: not safe to read as body
    return named or part.get_content_disposition() == "attachment" or part.get_content_maintype() != "text"


def _attachment_name(part: EmailMessage) -> str:
    try:
        name = part.get_filename()
    except (errors.HeaderParseError, ValueError, IndexError, LookupError, AttributeError, TypeError):
        name = None
    return _scrub(" ".join(name.split())) if name else part.get_content_type()


def _decoded_text(part: EmailMessage, max_chars: int) -> tuple[str, int]:
    """A text part's content, transfer encoding and charset decoded, cut at max_chars; and 1 when it was cut."""
    try:
        payload = part.get_payload(decode=True) or b""
    except (binascii.Error, ValueError):
        payload = b""
    # a character is at most 4 bytes in any charset read here, so this cut never shortens the text itself
    payload = payload[: 4 * max_chars + 4]
    text = _decode(payload, part.get_content_charset())
    return text[:max_chars], int(len(text) > max_chars)


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
    """Lone surrogates (the parser's stand-ins for undecodable header bytes) as U+FFFD, runs of blank lines as one."""
    text = re.sub("[\ud800-\udfff]", "\ufffd", text)
    return re.sub(r"\n\s*\n\s*", "\n\n", text)
