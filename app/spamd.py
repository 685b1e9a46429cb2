"""SpamAssassin's spamd protocol beside HTTP, so that spamc, Exim's spamd_address, Haraka's spamassassin plugin and
Rspamd's spamassassin external service use spamgpt unchanged. Written from SpamAssassin's spamd/PROTOCOL (the
commands, headers and sysexits codes) and checked against what spamd.raw and libspamc.c write and read.

One request per connection, as spamd serves it: the client sends `COMMAND SPAMC/1.x`, header lines, a blank line
and the message (Content-length bytes; without the header, up to the client's end of file); the server answers
`SPAMD/1.x CODE NAME`, header lines, a blank line and a body, then closes. Bytes after the request (a second command,
10,000 pipelined PINGs) are read and dropped until the client closes (at most LINGER_S), so the answer reaches
the client before the close. Every failure is answered with its sysexits code (EX_*) on a `SPAMD/1.0` line, as spamd
answers them, never with a silent close:

  EX_PROTOCOL 76    unknown command, malformed line, bad Content-length or Compress, Content-length longer than the body
  EX_DATAERR 65     message over max_message_bytes (libspamc's own code for a message too big to send), a
                    broken zlib stream, a message with nothing readable
  EX_NOPERM 77      a client outside spamd_allowed_ips, or a TELL from outside spamd_tell_allowed_ips
  EX_UNAVAILABLE 69 TELL while spamd_allow_tell or feedback_enabled is off; the model not loaded; shutting down
  EX_TEMPFAIL 75    the model's queue full, or spamd_max_connections open (the MTA retries later)
  EX_TIMEOUT 79     the request not whole within request_arrival_timeout_s of the connection (HTTP's deadline), or
                    its message not started within request_timeout_s (HTTP's 504)
  EX_SOFTWARE 70    the model failed on the message (non-finite logits)
  EX_IOERR 74       the feedback store could not write a TELL

Messages go through the Service as HTTP texts do (app.service): read into text by training.runtime.mail, tokenized,
queued on the same micro-batcher with the same limits, deadlines and metrics; the protocol's own requests are counted
in spamgpt_spamd_requests by command and EX_ name.

The score a client sees: score = required + logit(P(spam)) - logit(threshold), with required = spamd_required_score
(5.0, SpamAssassin's default), P(spam) the served (calibrated) probability and the threshold the one in force
(docs/mailserver.md). Monotone in P(spam), equal to `required` exactly on the threshold, and shown (to one decimal)
at least `required` exactly when the model decides spam, as SpamAssassin shows its own.
"""

import asyncio
import contextlib
import ipaddress
import logging
import math
import re
import zlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from app.errors import APIError, DeadlineExceeded, InvalidInput, ModelError, NotReady, Overloaded
from training.runtime.feedback import FeedbackStoreError
from training.runtime.inference import positive_label

if TYPE_CHECKING:  # app.service imports this module for its lifespan
    from app.service import Service

log = logging.getLogger("spamgpt.spamd")

# sysexits.h codes, as spamd answers them
EX = {
    "EX_OK": 0,
    "EX_DATAERR": 65,
    "EX_UNAVAILABLE": 69,
    "EX_SOFTWARE": 70,
    "EX_IOERR": 74,
    "EX_TEMPFAIL": 75,
    "EX_PROTOCOL": 76,
    "EX_NOPERM": 77,
    "EX_TIMEOUT": 79,
}
SCANS = frozenset({"CHECK", "SYMBOLS", "REPORT", "REPORT_IFSPAM", "HEADERS", "PROCESS"})
COMMANDS = SCANS | {"PING", "SKIP", "TELL"}
REQUEST_LINE = re.compile(rb"([A-Z_]+) SPAMC/(\d+)\.(\d+)\r?\n")
MAX_LINE_BYTES = 8 * 1024  # a command or header line; spamc's own lines are under 8 KiB (its buffer)
MAX_HEADERS = 255  # header lines per request, as spamd allows
LINGER_S = 2.0  # after answering, how long bytes the client still sends are read and dropped before the close
SYMBOL = {True: "GPT_SPAM", False: "GPT_HAM"}  # the one rule "hit": the model's decision
EPSILON = 1e-7  # probabilities are clamped to [EPSILON, 1 - EPSILON] before their log-odds: float32 gives 0 and 1


class SpamdError(Exception):
    """A request answered with `code` (a key of EX) and `message` on a SPAMD/1.0 line, then closed."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code, self.message = code, message

    def line(self) -> bytes:
        message = " ".join(self.message.split())  # one line, whatever the cause's text holds
        return f"SPAMD/1.0 {EX[self.code]} {self.code} {message}\r\n".encode()


# The Service's errors as the protocol's codes (HTTP's 422, 429, 503, 504, 500)
SERVICE_ERRORS: dict[type[APIError], str] = {
    InvalidInput: "EX_DATAERR",
    Overloaded: "EX_TEMPFAIL",
    NotReady: "EX_UNAVAILABLE",
    DeadlineExceeded: "EX_TIMEOUT",
    ModelError: "EX_SOFTWARE",
}


@dataclass
class Request:
    """One request: its command, protocol version (major, minor), headers (lower-case names) and message bytes."""

    command: str
    version: tuple[int, int]
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""


@dataclass(frozen=True)
class Verdict:
    """A message's score as a spamd client reads it: spam when the model decided its spam label."""

    is_spam: bool
    score: float  # points on SpamAssassin's scale: required exactly on the threshold
    required: float
    probability: float  # the served P(spam)
    threshold: float  # the threshold in force on it

    def shown(self) -> tuple[str, str]:
        """Score and required as spamd writes them ("%2.1f"), the score kept on the side of required that the
        decision is on (SpamAssassin's get_tag_value_for_score, for ham; the same for spam)."""
        score, required = f"{self.score:2.1f}", f"{self.required:2.1f}"
        if self.is_spam and float(score) < float(required):
            score = required
        elif not self.is_spam and float(score) >= float(required):
            score = f"{float(required) - 0.1:2.1f}"
        return score, required

    def spam_header(self) -> str:
        """`Spam: True ; 7.3 / 5.0` (False for ham), for every scan as spamd writes it: libspamc reads the word
        "True" alone as spam, so a Yes would make spamc -r pass spam as ham."""
        score, required = self.shown()
        return f"Spam: {self.is_spam} ; {score} / {required}"


def spam_label(labels: tuple[str, ...]) -> str:
    """The label spamd clients call spam: a binary model's positive label (training.runtime.inference), else the
    label named "spam". Raises RuntimeError when there is none."""
    label = positive_label(labels) or ("spam" if "spam" in labels else None)
    if label is None:
        raise RuntimeError(f"the spamd listener needs a binary model or a label named 'spam'; the labels are {labels}")
    return label


def verdict(probability: float, threshold: float, is_spam: bool, required: float) -> Verdict:
    """The score of a message with served P(spam) `probability` against the threshold in force, in points:
    required + logit(probability) - logit(threshold), both clamped to [EPSILON, 1 - EPSILON] (at most about 16
    points either side of required). `is_spam` is the model's own decision, which the shown score follows."""
    p, t = (min(max(x, EPSILON), 1 - EPSILON) for x in (probability, threshold))
    score = required + math.log(p / (1 - p)) - math.log(t / (1 - t))
    return Verdict(is_spam, score, required, probability, threshold)


class SpamdServer:
    """The listener: asyncio's server on spamd_host:spamd_port, one task per connection, within `service`'s
    settings. start() binds (OSError when it cannot); stop() closes the port and waits for the connections' tasks
    (each bounded by its deadlines)."""

    def __init__(self, service: "Service"):
        self.service, self.settings = service, service.settings
        self.metrics = service.metrics
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task] = set()

    async def start(self) -> None:
        """Raises RuntimeError for a model with no spam label, OSError when the address cannot be listened on."""
        s = self.settings
        self.spam_label = spam_label(self.service.classifier.card.labels)
        self.service.models.label_readers.append("the spamd listener")
        self._server = await asyncio.start_server(self._connection, s.spamd_host, s.spamd_port, limit=MAX_LINE_BYTES)
        log.info("spamd protocol on %s:%d", s.spamd_host, s.spamd_port)
        if s.spamd_allow_tell and self.service.feedback is None:
            log.warning("SPAMGPT_SPAMD_ALLOW_TELL is on but SPAMGPT_FEEDBACK_ENABLED is off: every TELL is refused")

    async def stop(self) -> None:
        """Stop accepting, let open connections finish (their deadlines bound them), then close."""
        if self._server is None:
            return
        self._server.close()
        if self._connections:
            await asyncio.wait(self._connections)
        await self._server.wait_closed()

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self._connections.add(task)
        deadline = asyncio.get_running_loop().time() + self.settings.request_arrival_timeout_s
        command = "-"
        try:
            try:
                self._admit(writer)
                async with asyncio.timeout_at(deadline):
                    request = await self._read(reader, writer)
                command = request.command
                answer, code = await self._answer(request), "EX_OK"
            except TimeoutError:
                limit = self.settings.request_arrival_timeout_s
                error = SpamdError("EX_TIMEOUT", f"Timeout: the request did not arrive whole within {limit} s")
                answer, code = error.line(), error.code
            except SpamdError as error:
                answer, code = error.line(), error.code
            except (ConnectionError, asyncio.CancelledError):
                raise
            except Exception as exc:  # a fault of ours: answered, logged, and the listener keeps serving
                log.exception("spamd %s failed", command)
                answer, code = SpamdError("EX_SOFTWARE", f"internal error ({type(exc).__name__})").line(), "EX_SOFTWARE"
            self.metrics.spamd_requests.labels(command=command, status=code).inc()
            await self._send_and_close(reader, writer, answer)
        except (ConnectionError, TimeoutError):
            writer.transport.abort()  # the client left, or did not read its answer in time
        finally:
            self._connections.discard(task)

    def _admit(self, writer: asyncio.StreamWriter) -> None:
        """Raises SpamdError when the client may not connect, or too many connections are open."""
        if not _allowed(writer, self.settings.spamd_allowed_ips):
            raise SpamdError("EX_NOPERM", f"client {_peer(writer)} is not in SPAMGPT_SPAMD_ALLOWED_IPS")
        if len(self._connections) > self.settings.spamd_max_connections:
            limit = self.settings.spamd_max_connections
            raise SpamdError("EX_TEMPFAIL", f"Service busy: {limit} connections open, retry later")

    async def _read(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> Request:
        """The request line, headers and message. Raises SpamdError (EX_PROTOCOL, EX_DATAERR, EX_NOPERM,
        EX_UNAVAILABLE), IncompleteReadError's kin as SpamdError; TimeoutError is the caller's deadline."""
        line = await _line(reader)
        match = REQUEST_LINE.fullmatch(line)
        if match is None or match[1].decode() not in COMMANDS:
            shown = line.rstrip(b"\r\n").decode("latin-1")[:100]
            raise SpamdError("EX_PROTOCOL", f"Bad header line: (unknown command or no SPAMC/version) {shown!r}")
        request = Request(match[1].decode(), (int(match[2]), int(match[3])))
        # spamd reads headers after a scan's line from protocol 1.1 on, after PING and SKIP from 1.5, always after TELL
        if request.version >= ((1, 5) if request.command in ("PING", "SKIP") else (1, 1)) or request.command == "TELL":
            request.headers = await _headers(reader)
        if request.command in ("PING", "SKIP"):
            return request
        if request.command == "TELL":
            self._check_tell(request, writer)
        request.body = await self._body(reader, request.headers)
        return request

    def _check_tell(self, request: Request, writer: asyncio.StreamWriter) -> None:
        """Raises SpamdError unless this TELL may be taken: enabled, with a feedback store, from an allowed client,
        and well formed."""
        s = self.settings
        if not s.spamd_allow_tell:
            raise SpamdError("EX_UNAVAILABLE", "Service Unavailable: TELL is not enabled (SPAMGPT_SPAMD_ALLOW_TELL)")
        if not _allowed(writer, s.spamd_tell_allowed_ips):
            raise SpamdError("EX_NOPERM", f"client {_peer(writer)} is not in SPAMGPT_SPAMD_TELL_ALLOWED_IPS")
        if self.service.feedback is None:  # refused before the message is read
            raise SpamdError("EX_UNAVAILABLE", "Service Unavailable: no feedback store (SPAMGPT_FEEDBACK_ENABLED)")
        actions = {name: _actions(request.headers.get(name, "")) for name in ("set", "remove")}
        if "local" in actions["set"] and "local" in actions["remove"]:
            raise SpamdError("EX_PROTOCOL", "Bad header line: (Set and Remove local in the same TELL)")
        message_class = request.headers.get("message-class", "").strip().lower()
        if actions["set"] and message_class not in ("spam", "ham"):
            given = request.headers.get("message-class")
            raise SpamdError(
                "EX_PROTOCOL", f"Bad header line: (TELL Set needs Message-class spam or ham, got {given!r})"
            )

    async def _body(self, reader: asyncio.StreamReader, headers: dict[str, str]) -> bytes:
        """The message: Content-length bytes, or all bytes to the client's end of file without the header;
        inflated when Compress is zlib. Raises SpamdError for a bad header, a body shorter than its
        Content-length, a broken zlib stream, or a message over max_message_bytes."""
        limit = self.settings.max_message_bytes
        length = headers.get("content-length")
        if length is not None and not re.fullmatch(r"\s*\d+\s*", length):
            raise SpamdError("EX_PROTOCOL", f"Bad header line: (Content-length is not a number: {length!r})")
        compress = headers.get("compress")
        if compress is not None and compress.strip().lower() != "zlib":
            raise SpamdError("EX_PROTOCOL", f"Bad header line: (compression type not supported: {compress!r})")
        if compress is not None and length is None:
            raise SpamdError("EX_PROTOCOL", "Bad header line: (Compress requires Content-length)")
        if length is None:
            body = await reader.read(limit + 1)
            while len(body) <= limit and (more := await reader.read(limit + 1 - len(body))):
                body += more
        else:
            expected = int(length)
            if expected > limit:  # zlib stream or not: nothing bigger is ever read
                raise _too_big(f"{expected} bytes", limit)
            try:
                body = await reader.readexactly(expected)
            except asyncio.IncompleteReadError as short:
                raise SpamdError(
                    "EX_PROTOCOL",
                    f"Bad header line: (Content-length mismatch: expected {expected} bytes, got {len(short.partial)})",
                ) from None
        if compress is not None:
            body = _inflate(body, limit)
        if len(body) > limit:  # read or inflated to limit + 1 bytes only: the true size is unknown
            raise _too_big(f"more than {limit} bytes", limit)
        return body

    async def _answer(self, request: Request) -> bytes:
        """The whole answer to a request read whole. Raises SpamdError for what the Service refuses."""
        if request.command == "PING":
            return b"SPAMD/1.5 0 PONG\r\n"
        if request.command == "SKIP":
            return b""
        if request.command == "TELL":
            return await self._tell(request)
        return answer_scan(request, await self._verdict(request.body))

    async def _verdict(self, raw: bytes) -> Verdict:
        """The model's verdict on one raw message, through the Service's path for messages (read, cut into
        windows, batched; Service.classify_messages). Raises SpamdError."""
        service = self.service
        try:
            service.require_ready()
            result = (await service.classify_messages([raw], _stays, field="body"))["results"][0]
        except APIError as error:
            code = next(code for kind, code in SERVICE_ERRORS.items() if isinstance(error, kind))
            raise SpamdError(code, error.message) from None
        card, spam = service.classifier.card, self.spam_label
        threshold = 0.5 if card.threshold is None else card.threshold.value
        required = self.settings.spamd_required_score
        return verdict(result["probabilities"][spam], threshold, result["label"] == spam, required)

    async def _tell(self, request: Request) -> bytes:
        """TELL: `Set: local` records the message as its Message-class in the feedback store (app.feedback) and
        answers `DidSet: local` once the record is durable, or no DidSet when the store already held the message with
        that label (spamd's answer when its learning changed nothing: spamc prints "Message was already
        un/learned"). Nothing else is done: `remote` (reporting to shared
        networks such as Razor) has no meaning here, and the store keeps every report, so `Remove: local` (forget)
        is answered without DidRemove, which tells the client nothing was removed (PROTOCOL: "It is up to the
        caller to determine if the proper action happened"). Raises SpamdError."""
        feedback = self.service.feedback
        did_set = ""
        if "local" in _actions(request.headers.get("set", "")):
            label = self._label_of(request.headers["message-class"].strip().lower())
            try:
                recorded = await feedback.record(request.body, label, source="spamd")
            except FeedbackStoreError as error:
                raise SpamdError("EX_IOERR", str(error)) from None
            except ValueError as error:  # UnknownLabel, an empty message
                raise SpamdError("EX_DATAERR", str(error)) from None
            did_set = "" if recorded.outcome == "same" else "DidSet: local\r\n"
        return f"SPAMD/1.1 0 EX_OK\r\n{did_set}\r\n".encode()

    def _label_of(self, message_class: str) -> str:
        """The model's label for a TELL's Message-class: spam is the spam label; ham the other label of a binary
        model, else the label named "ham". Raises SpamdError when the model has none."""
        if message_class == "spam":
            return self.spam_label
        labels = self.service.classifier.card.labels
        others = [label for label in labels if label != self.spam_label]
        if len(others) == 1:
            return others[0]
        if "ham" in others:
            return "ham"
        raise SpamdError("EX_DATAERR", f"Message-class ham names none of the model's labels {list(labels)}")

    async def _send_and_close(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, answer: bytes) -> None:
        """Write the answer (the client has request_arrival_timeout_s to take it, as to send its request), end our
        side, drop what the client still sends until it closes, for at most LINGER_S, then close: a close with
        unread bytes would reset the connection and could destroy the answer before the client reads it. Raises
        TimeoutError or ConnectionError for the caller to abort the connection."""
        writer.write(answer)
        async with asyncio.timeout(self.settings.request_arrival_timeout_s):
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(LINGER_S):
                while await reader.read(64 * 1024):
                    pass
        writer.close()


def answer_scan(request: Request, result: Verdict) -> bytes:
    """A scan's answer as spamd writes it, by command and protocol version (spamd.raw's check())."""
    command, version = request.command, request.version
    spam = result.spam_header()
    if command == "CHECK":
        return f"SPAMD/1.1 0 EX_OK\r\n{spam}\r\n\r\n".encode()
    if command in ("PROCESS", "HEADERS"):
        body = marked_message(request.body, result, headers_only=command == "HEADERS")
        if version >= (1, 3):
            return f"SPAMD/1.1 0 EX_OK\r\nContent-length: {len(body)}\r\n{spam}\r\n\r\n".encode() + body
        if version >= (1, 2):
            return f"SPAMD/1.1 0 EX_OK\r\nContent-length: {len(body)}\r\n\r\n".encode() + body
        return b"SPAMD/1.0 0 EX_OK\r\n" + body
    if command == "SYMBOLS":
        body = SYMBOL[result.is_spam] + ("" if version >= (1, 3) else "\r\n")
    elif command == "REPORT" or result.is_spam:
        body = report(result)
    else:  # REPORT_IFSPAM of ham
        body = ""
    if version >= (1, 3):
        return f"SPAMD/1.1 0 EX_OK\r\nContent-length: {len(body.encode())}\r\n{spam}\r\n\r\n{body}".encode()
    return f"SPAMD/1.1 0 EX_OK\r\n{spam}\r\n\r\n{body}".encode()


def report(result: Verdict) -> str:
    """REPORT's text: SpamAssassin's content analysis table, with the one rule the model is."""
    score, required = result.shown()
    rule = SYMBOL[result.is_spam]
    description = f"spamgpt: P(spam) {result.probability:.4f}, threshold {result.threshold:.4f}"
    return (
        f"Content analysis details:   ({score} points, {required} required)\r\n\r\n"
        " pts rule name              description\r\n"
        "---- ---------------------- --------------------------------------------------\r\n"
        f"{score:>4} {rule:<22} {description}\r\n"
    )


X_SPAM = re.compile(rb"X-Spam-(?!Prev-)", re.IGNORECASE)


def marked_message(raw: bytes, result: Verdict, headers_only: bool = False) -> bytes:
    """The message with SpamAssassin's headers, as it writes them with report_safe 0: the message's own
    X-Spam-* fields removed (a sender cannot forge a verdict; X-Spam-Prev-* kept), then X-Spam-Flag (spam only),
    X-Spam-Score, X-Spam-Level and X-Spam-Status appended to the header, in the message's line endings.
    With `headers_only`, the header and the blank line after it (HEADERS)."""
    split = re.search(rb"\r?\n\r?\n", raw)
    head, separator, body = (
        (raw[: split.start()], raw[split.start() : split.end()], raw[split.end() :])
        if split
        else (
            raw,
            b"\n\n" if b"\n" in raw and b"\r\n" not in raw else b"\r\n\r\n",
            b"",
        )
    )
    newline = b"\r\n" if separator.startswith(b"\r\n") else b"\n"
    kept, dropping = [], False
    for line in head.splitlines(keepends=True):
        dropping = bool(X_SPAM.match(line)) or (dropping and line[:1] in (b" ", b"\t"))
        if not dropping:
            kept.append(line)
    score, required = result.shown()
    fields = ["X-Spam-Flag: YES"] if result.is_spam else []
    fields += [
        f"X-Spam-Score: {score}",
        f"X-Spam-Level: {'*' * max(0, int(float(score)))}",
        f"X-Spam-Status: {'Yes' if result.is_spam else 'No'}, score={score} required={required} "
        f"tests={SYMBOL[result.is_spam]} autolearn=no version=spamgpt",
    ]
    if kept and not kept[-1].endswith(b"\n"):
        kept[-1] += newline
    head = b"".join(kept) + newline.join(f.encode() for f in fields)
    return head + separator + (b"" if headers_only else body)


async def _line(reader: asyncio.StreamReader) -> bytes:
    """One line with its end. Raises SpamdError for a line over MAX_LINE_BYTES or an end of file within it."""
    try:
        return await reader.readuntil(b"\n")
    except asyncio.LimitOverrunError:
        raise SpamdError("EX_PROTOCOL", f"Bad header line: (a line over {MAX_LINE_BYTES} bytes)") from None
    except asyncio.IncompleteReadError:
        raise SpamdError("EX_PROTOCOL", "Bad header line: (closed before the end of the headers)") from None


async def _headers(reader: asyncio.StreamReader) -> dict[str, str]:
    """Header lines to the blank line, names lower-cased (spamd matches them as written by its clients; a
    different case is no different header). Raises SpamdError for a malformed line or too many."""
    headers = {}
    for _ in range(MAX_HEADERS):
        line = (await _line(reader)).rstrip(b"\r\n").decode("latin-1")
        if not line:
            return headers
        name, colon, value = line.partition(":")
        if not colon or not name.strip():
            raise SpamdError("EX_PROTOCOL", f"Bad header line: (header not in 'Name: value' format: {line[:100]!r})")
        headers[name.strip().lower()] = value.strip()
    raise SpamdError("EX_PROTOCOL", f"Bad header line: (more than {MAX_HEADERS} headers)")


def _actions(value: str) -> set[str]:
    """TELL's Set or Remove value, "local, remote", as a set of the words spamd knows."""
    return {word for word in ("local", "remote") if word in value.lower()}


def _inflate(data: bytes, limit: int) -> bytes:
    """A whole zlib stream, inflated to at most `limit` + 1 bytes (a bomb stops there). Raises SpamdError."""
    inflater = zlib.decompressobj()
    try:
        body = inflater.decompress(data, limit + 1)
    except zlib.error as error:
        raise SpamdError("EX_DATAERR", f"zlib: {error}") from None
    if len(body) <= limit and not inflater.eof:
        raise SpamdError("EX_DATAERR", "zlib: the stream ends before its end marker")
    return body


def _too_big(size: str, limit: int) -> SpamdError:
    """EX_DATAERR for a message of `size` ("70000 bytes" when told, "more than LIMIT bytes" when not)."""
    return SpamdError("EX_DATAERR", f"Message too big: {size}, at most {limit} (SPAMGPT_MAX_MESSAGE_BYTES)")


def _peer(writer: asyncio.StreamWriter) -> str:
    peer = writer.get_extra_info("peername")
    return str(peer[0]) if isinstance(peer, tuple) else "(unix socket)"


def _allowed(writer: asyncio.StreamWriter, networks: list) -> bool:
    peer = writer.get_extra_info("peername")
    if not isinstance(peer, tuple):
        return False
    address = ipaddress.ip_address(peer[0])
    if getattr(address, "ipv4_mapped", None) is not None:  # ::ffff:10.0.0.1 on a dual-stack socket
        address = address.ipv4_mapped
    return any(address.version == net.version and address in net for net in networks)


async def _stays() -> dict:
    """An ASGI receive channel whose client never leaves: spamd clients end their side once the message is sent
    (spamc shuts it down), so an end of file says nothing about them leaving; they are bounded by the deadlines."""
    await asyncio.Event().wait()
    return {"type": "http.disconnect"}
