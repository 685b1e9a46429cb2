"""The spamd-protocol listener (app.spamd) against a live server (`python -m app`), with the real clients: Debian's
`spamc` binary and the aiospamc package, and raw sockets for what no client sends. Each verdict is checked against
HTTP's answer for the same message's text; the tests that need spamc skip where it is not installed."""

import asyncio
import base64
import shutil
import socket
import subprocess
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import aiospamc
import httpx
import pytest
import torch
from aiospamc.responses import UnavailableException
from fastapi.testclient import TestClient

from app.main import create_app
from app.spamd import Verdict, marked_message, verdict
from tests.helpers import calibrated_checkpoint, edit_card, tiny_card, tiny_settings
from tests.live_server import free_port, live_server
from training.runtime.checkpoint import save_checkpoint
from training.runtime.feedback import FeedbackStore
from training.runtime.model import GPTClassifier

SPAMC = shutil.which("spamc")
needs_spamc = pytest.mark.skipif(SPAMC is None, reason="Debian's spamc is not installed (apt-get install spamc)")
ARRIVAL_TIMEOUT_S = 2  # the server's request_arrival_timeout_s: short, so the stalled-client cases end soon

MESSAGES = {
    "plain": b"From: a@example.com\r\nSubject: WINNER! Claim your free prize now\r\n\r\nText WIN to 80082 today.\r\n",
    "html": (
        b"From: b@example.com\r\nSubject: Lunch\r\nMIME-Version: 1.0\r\nContent-Type: text/html; charset=utf-8\r\n\r\n"
        b"<p>See you at <b>noon</b>, shall I bring the chairs?</p>\r\n"
    ),
    # a sender's own verdict, folded over two lines, is removed; X-Spam-Prev-* is kept
    "forged": (
        b"Subject: Invoice 22\nX-Spam-Flag: NO\nX-Spam-Status: No,\n score=-100\nX-Spam-Prev-Subject: old\n\n"
        b"Please find the invoice attached, caf\xc3\xa9 receipts too.\n"
    ),
}


def spamc(port: int, *options: str, message: bytes = b"") -> subprocess.CompletedProcess:
    """Debian's spamc against the listener; -x: errors are reported as they are, not replaced by the message."""
    command = [SPAMC, "-d", "127.0.0.1", "-p", str(port), "-x", "-t", "30", *options]
    return subprocess.run(command, input=message, capture_output=True, timeout=60)


def exchange(port: int, data: bytes, half_close: bool = True, source: str = "127.0.0.1") -> bytes:
    """Send `data` on one connection (from `source`), end our side when `half_close`, and read to the server's
    close."""
    with socket.create_connection(("127.0.0.1", port), timeout=30, source_address=(source, 0)) as sock:
        sock.sendall(data)
        if half_close:
            sock.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
        return answer


def request(command: str, body: bytes, **headers: str) -> bytes:
    lines = [f"{command} SPAMC/1.5", *(f"{name.replace('_', '-')}: {v}" for name, v in headers.items())]
    lines.append(f"Content-length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_config, bpe_dir):
    """A live server with the listener, TELL on for 127.0.0.1 only, and the feedback store: (url, spamd port,
    feedback database)."""
    directory = tmp_path_factory.mktemp("spamd")
    torch.manual_seed(0)
    checkpoint = save_checkpoint(directory / "ckpt", GPTClassifier(tiny_config), bpe_dir, tiny_card())
    port, database = free_port(), directory / "feedback.db"
    settings = {
        "spamd_port": port,
        "spamd_allow_tell": "true",
        "spamd_tell_allowed_ips": "127.0.0.1",
        "feedback_enabled": "true",
        "feedback_path": database,
        "request_arrival_timeout_s": ARRIVAL_TIMEOUT_S,
        "max_message_bytes": 64 * 1024,
    }
    with live_server(checkpoint, directory / "server.log", **settings) as (url, _):
        yield url, port, database


@pytest.fixture(scope="module")
def expected(server) -> dict[str, Verdict]:
    """Each message's verdict from HTTP /classify given the same message, and the threshold in force."""
    url = server[0]
    with httpx.Client(trust_env=False, timeout=30) as http:
        messages = [{"base64": base64.b64encode(raw).decode()} for raw in MESSAGES.values()]
        results = http.post(f"{url}/classify", json={"messages": messages}).json()["results"]
        threshold = http.get(f"{url}/info").json()["threshold"]
    t = 0.5 if threshold is None else threshold["value"]
    return {
        name: verdict(r["probabilities"]["spam"], t, r["label"] == "spam", 5.0)
        for name, r in zip(MESSAGES, results, strict=True)
    }


def spam_line(result: Verdict) -> str:
    return result.spam_header()


# --- the score mapping and the marked message, without a server


def test_a_probability_on_the_threshold_scores_required_exactly_and_the_map_is_monotone():
    assert verdict(0.3, 0.3, True, 5.0).shown() == ("5.0", "5.0")
    assert verdict(0.3, 0.3, True, 7.5).score == 7.5
    scores = [verdict(p / 100, 0.3, p >= 30, 5.0).score for p in range(0, 101)]
    assert scores == sorted(scores) and len(set(scores[1:-1])) == 99
    assert all(abs(s - 5.0) < 17 for s in scores)  # finite at P 0 and 1


@pytest.mark.parametrize(
    ("probability", "is_spam", "shown"),
    [
        pytest.param(0.2999, False, "4.9", id="ham-just-below-rounds-below-required"),
        pytest.param(0.3001, True, "5.0", id="spam-just-above"),
        pytest.param(1e-9, False, "-10.3", id="certain-ham"),
        pytest.param(1.0, True, "22.0", id="certain-spam"),
    ],
)
def test_the_shown_score_is_on_the_side_of_required_that_the_decision_is(probability, is_spam, shown):
    score, required = verdict(probability, 0.3, is_spam, 5.0).shown()
    assert (score, required) == (shown, "5.0")
    assert (float(score) >= float(required)) == is_spam


def test_the_marked_message_drops_a_senders_verdict_and_keeps_line_endings():
    ham = verdict(0.1, 0.5, False, 5.0)
    marked = marked_message(MESSAGES["forged"], ham)
    head, body = marked.split(b"\n\n", 1)
    assert b"\r\n" not in marked and body == MESSAGES["forged"].split(b"\n\n", 1)[1]
    assert head.split(b"\n") == [
        b"Subject: Invoice 22",
        b"X-Spam-Prev-Subject: old",
        b"X-Spam-Score: 2.8",
        b"X-Spam-Level: **",
        b"X-Spam-Status: No, score=2.8 required=5.0 tests=GPT_HAM autolearn=no version=spamgpt",
    ]
    spam = marked_message(b"Subject: x\r\n\r\nbody", verdict(0.9, 0.5, True, 5.0), headers_only=True)
    assert spam.startswith(b"Subject: x\r\nX-Spam-Flag: YES\r\nX-Spam-Score: 7.2\r\n") and spam.endswith(b"\r\n\r\n")
    assert marked_message(b"no header break", ham).startswith(b"no header break\r\nX-Spam-Score")


# --- spamc


@needs_spamc
@pytest.mark.parametrize("name", MESSAGES)
def test_spamc_every_command(server, expected, name):
    port, raw, result = server[1], MESSAGES[name], expected[name]
    score, required = result.shown()
    check = spamc(port, "-c", message=raw)
    assert (check.stdout.decode(), check.returncode) == (f"{score}/{required}\n", int(result.is_spam))
    symbols = spamc(port, "-y", message=raw)
    assert symbols.stdout.decode() == ("GPT_SPAM" if result.is_spam else "GPT_HAM"), symbols.stderr
    report = spamc(port, "-R", message=raw).stdout.decode()
    assert report.startswith(f"{score}/{required}\n") and f"({score} points, {required} required)" in report
    if_spam = spamc(port, "-r", message=raw).stdout.decode()
    assert ("Content analysis details" in if_spam) == result.is_spam
    processed = spamc(port, message=raw)
    assert processed.returncode == 0 and processed.stdout == marked_message(raw, result)
    headers = spamc(port, "--headers", message=raw)  # spamc appends the body it holds to HEADERS' answer
    assert headers.returncode == 0 and headers.stdout == marked_message(raw, result)


@needs_spamc
def test_spamc_ping(server):
    ping = spamc(server[1], "-K")
    assert (ping.stdout, ping.returncode) == (b"SPAMD/1.5 0\n", 0)


@needs_spamc
def test_spamc_learn_records_the_message_in_the_feedback_store(server):
    raw = b"Subject: learn me\r\n\r\nA message the user says is spam.\r\n"
    learned = spamc(server[1], "-L", "spam", message=raw)
    assert (learned.returncode, learned.stdout) == (0, b"Message successfully un/learned\n"), learned.stderr
    again = spamc(server[1], "-L", "spam", message=raw)  # nothing changed: no DidSet, as spamd answers
    assert (again.returncode, again.stdout) == (0, b"Message was already un/learned\n"), again.stderr
    relabelled = spamc(server[1], "-L", "ham", message=raw)
    assert (relabelled.returncode, relabelled.stdout) == (0, b"Message successfully un/learned\n"), relabelled.stderr
    with FeedbackStore(server[2], ("ham", "spam")) as store:
        assert [c.label for c in store.corrections() if c.content == raw] == ["ham"]  # the latest report's


# --- aiospamc


def test_aiospamc_every_command(server, expected):
    port = server[1]

    async def run():
        ping = await aiospamc.ping(host="127.0.0.1", port=port)
        assert ping.message == "PONG"
        for name, raw in MESSAGES.items():
            result, is_spam = expected[name], expected[name].is_spam
            score, required = (float(x) for x in result.shown())
            for call in (aiospamc.check, aiospamc.symbols, aiospamc.report, aiospamc.process, aiospamc.headers):
                response = await call(raw, host="127.0.0.1", port=port)
                spam = response.headers["Spam"]
                assert (spam.value, spam.score, spam.threshold) == (is_spam, score, required), call.__name__
            compressed = await aiospamc.check(raw, host="127.0.0.1", port=port, compress=True)
            assert compressed.headers["Spam"].score == score
            symbols = await aiospamc.symbols(raw, host="127.0.0.1", port=port)
            assert symbols.body == (b"GPT_SPAM" if is_spam else b"GPT_HAM")
            processed = await aiospamc.process(raw, host="127.0.0.1", port=port)
            assert processed.body == marked_message(raw, result)
            if_spam = await aiospamc.report_if_spam(raw, host="127.0.0.1", port=port)
            assert (if_spam.body != b"") == is_spam
        told = await aiospamc.tell(MESSAGES["html"], "ham", set_action="local", host="127.0.0.1", port=port)
        action = told.headers["DidSet"].action
        assert (action.local, action.remote) == (True, False)

    asyncio.run(run())
    with FeedbackStore(server[2], ("ham", "spam")) as store:
        assert [c.label for c in store.corrections() if c.content == MESSAGES["html"]] == ["ham"]


def test_concurrent_clients_get_the_answers_they_get_alone(server, expected):
    port = server[1]
    names = list(MESSAGES) * 8

    async def run():
        calls = [aiospamc.check(MESSAGES[n], host="127.0.0.1", port=port) for n in names]
        return [r.headers["Spam"] for r in await asyncio.gather(*calls)]

    with ThreadPoolExecutor(4) as pool:
        lines = list(pool.map(lambda n: exchange(port, request("CHECK", MESSAGES[n])), names))
        answers = asyncio.run(run())
    for name, line, spam in zip(names, lines, answers, strict=True):
        assert line == f"SPAMD/1.1 0 EX_OK\r\n{spam_line(expected[name])}\r\n\r\n".encode()
        assert (spam.value, spam.score) == (expected[name].is_spam, float(expected[name].shown()[0]))


def test_one_request_per_connection_as_spamd_serves_them(server, expected):
    """PROTOCOL: after each side is done writing it shuts down its side: a second request on the connection
    (spamc never sends one) is read and dropped, never answered as a stray line."""
    first = request("CHECK", MESSAGES["plain"])
    answer = exchange(server[1], first + request("CHECK", MESSAGES["html"]))
    assert answer == f"SPAMD/1.1 0 EX_OK\r\n{spam_line(expected['plain'])}\r\n\r\n".encode()


@pytest.mark.parametrize(
    ("version", "answer"),
    [
        pytest.param("1.5", "SPAMD/1.1 0 EX_OK\r\nContent-length: {n}\r\n{spam}\r\n\r\n{body}", id="1.5"),
        pytest.param("1.3", "SPAMD/1.1 0 EX_OK\r\nContent-length: {n}\r\n{spam}\r\n\r\n{body}", id="1.3"),
        pytest.param("1.2", "SPAMD/1.1 0 EX_OK\r\n{spam}\r\n\r\n{body}\r\n", id="1.2"),
    ],
)
def test_symbols_as_each_protocol_version_writes_them(server, expected, version, answer):
    raw, result = MESSAGES["plain"], expected["plain"]
    sent = f"SYMBOLS SPAMC/{version}\r\nContent-length: {len(raw)}\r\n\r\n".encode() + raw
    body = "GPT_SPAM" if result.is_spam else "GPT_HAM"
    shown = answer.format(n=len(body), spam=spam_line(result), body=body)
    assert exchange(server[1], sent).decode() == shown


def test_metrics_count_spamd_requests_by_command_and_answer(server):
    exchange(server[1], b"PING SPAMC/1.5\r\n\r\n")
    exchange(server[1], b"NOPE SPAMC/1.5\r\n\r\n")
    with httpx.Client(trust_env=False) as http:
        metrics = http.get(f"{server[0]}/metrics").text
    assert 'spamgpt_spamd_requests_total{command="PING",status="EX_OK"}' in metrics
    assert 'spamgpt_spamd_requests_total{command="-",status="EX_PROTOCOL"}' in metrics
    assert "spamgpt_queue_wait_seconds_count" in metrics  # messages went through the batcher


# --- bad input: each answered with the protocol's code, or at the deadline; the server keeps serving

TOO_BIG = b"SPAMD/1.0 65 EX_DATAERR Message too big: %s, at most 65536 (SPAMGPT_MAX_MESSAGE_BYTES)\r\n"
UNKNOWN = b"SPAMD/1.0 76 EX_PROTOCOL Bad header line: (unknown command or no SPAMC/version) "
BIG = b"Subject: big\r\n\r\n" + b"x" * (64 * 1024)


@pytest.mark.parametrize(
    ("sent", "half_close", "answer"),
    [
        pytest.param(
            b"CHECK SPAMC/1.5\r\nContent-length: 10\r\n", False, b"SPAMD/1.0 79 EX_TIMEOUT ", id="header-then-nothing"
        ),
        pytest.param(b"", False, b"SPAMD/1.0 79 EX_TIMEOUT ", id="connect-then-nothing"),
        pytest.param(
            b"CHECK SPAMC/1.5\r\nContent-length: 50\r\n\r\nSubject: short",
            True,
            b"SPAMD/1.0 76 EX_PROTOCOL Bad header line: (Content-length mismatch: expected 50 bytes, got 14)\r\n",
            id="content-length-larger-then-end",
        ),
        pytest.param(
            b"CHECK SPAMC/1.5\r\nContent-length: 50\r\n\r\nSubject: short",
            False,
            b"SPAMD/1.0 79 EX_TIMEOUT ",
            id="content-length-larger-then-wait",
        ),
        pytest.param(
            b"CHECK SPAMC/1.5\r\nContent-length: 70000\r\n\r\n",
            False,
            TOO_BIG % b"70000 bytes",
            id="content-length-over-the-limit",
        ),
        pytest.param(
            b"CHECK SPAMC/1.2\r\n\r\n" + BIG,
            True,
            TOO_BIG % b"more than 65536 bytes",
            id="no-content-length-over-the-limit",
        ),
        pytest.param(
            request("CHECK", zlib.compress(BIG), Compress="zlib"),
            True,
            TOO_BIG % b"more than 65536 bytes",
            id="zlib-inflates-over-the-limit",
        ),
        pytest.param(
            request("CHECK", b"not zlib at all", Compress="zlib"),
            True,
            b"SPAMD/1.0 65 EX_DATAERR zlib: Error -3 while decompressing data: incorrect header check\r\n",
            id="broken-zlib",
        ),
        pytest.param(
            request("CHECK", b"x", Compress="gzip"),
            True,
            b"SPAMD/1.0 76 EX_PROTOCOL Bad header line: (compression type not supported: 'gzip')\r\n",
            id="gzip",
        ),
        pytest.param(
            b"CHECK SPAMC/1.5\r\nContent-length: lots\r\n\r\n",
            True,
            b"SPAMD/1.0 76 EX_PROTOCOL Bad header line: (Content-length is not a number: 'lots')\r\n",
            id="content-length-not-a-number",
        ),
        pytest.param(
            b"FROBNICATE SPAMC/1.5\r\n\r\n",
            True,
            UNKNOWN + b"'FROBNICATE SPAMC/1.5'\r\n",
            id="unknown-command",
        ),
        pytest.param(
            b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
            True,
            UNKNOWN + b"'GET / HTTP/1.1'\r\n",
            id="http-request",
        ),
        pytest.param(
            b"CHECK SPAMC/1.5\r\nno colon here\r\n\r\n",
            True,
            b"SPAMD/1.0 76 EX_PROTOCOL Bad header line: (header not in 'Name: value' format: 'no colon here')\r\n",
            id="malformed-header",
        ),
        pytest.param(
            b"CHECK SPAMC/1.5\r\n" + b"X-A: b\r\n" * 300,
            True,
            b"SPAMD/1.0 76 EX_PROTOCOL Bad header line: (more than 255 headers)\r\n",
            id="too-many-headers",
        ),
        pytest.param(
            b"CHECK SPAMC/1.5\r\nX-Long: " + b"a" * 20_000,
            False,
            b"SPAMD/1.0 76 EX_PROTOCOL Bad header line: (a line over 8192 bytes)\r\n",
            id="endless-line",
        ),
        pytest.param(
            request("CHECK", b"\x00\x01\x02\x03"),
            True,
            b"SPAMD/1.0 65 EX_DATAERR body: not a message: it does not start with a header field",
            id="binary-not-a-message",
        ),
        pytest.param(
            request("TELL", b"Subject: x\r\n\r\nbody", Set="local"),
            True,
            b"SPAMD/1.0 76 EX_PROTOCOL Bad header line: (TELL Set needs Message-class spam or ham, got None)\r\n",
            id="tell-without-message-class",
        ),
        pytest.param(
            request("TELL", b"Subject: x\r\n\r\nbody", Message_class="eggs", Set="local"),
            True,
            b"SPAMD/1.0 76 EX_PROTOCOL Bad header line: (TELL Set needs Message-class spam or ham, got 'eggs')\r\n",
            id="tell-unknown-message-class",
        ),
        pytest.param(
            request("TELL", b"Subject: x\r\n\r\nbody", Message_class="spam", Set="local", Remove="local"),
            True,
            b"SPAMD/1.0 76 EX_PROTOCOL Bad header line: (Set and Remove local in the same TELL)\r\n",
            id="tell-set-and-remove",
        ),
        pytest.param(
            request("TELL", b"", Message_class="spam", Set="local"),
            True,
            b"SPAMD/1.0 65 EX_DATAERR content is empty\r\n",
            id="tell-empty-message",
        ),
    ],
)
def test_bad_input_gets_the_protocols_error_and_others_are_served(server, expected, sent, half_close, answer):
    port = server[1]
    with ThreadPoolExecutor(1) as pool:
        bad = pool.submit(exchange, port, sent, half_close)
        good = exchange(port, request("CHECK", MESSAGES["plain"]))  # served while the bad one waits out its deadline
        assert good == f"SPAMD/1.1 0 EX_OK\r\n{spam_line(expected['plain'])}\r\n\r\n".encode()
        assert bad.result().startswith(answer)
    assert exchange(port, b"PING SPAMC/1.5\r\n\r\n") == b"SPAMD/1.5 0 PONG\r\n"


def test_content_length_smaller_than_the_body_scores_the_first_bytes(server):
    raw = MESSAGES["plain"]
    cut = len(raw) - 10
    whole = exchange(server[1], request("CHECK", raw[:cut]))
    assert exchange(server[1], f"CHECK SPAMC/1.5\r\nContent-length: {cut}\r\n\r\n".encode() + raw) == whole


def test_binary_body_with_readable_bytes_gets_a_verdict(server):
    # bytes without a header field are no message (the binary-not-a-message case); under a header, a verdict
    answer = exchange(server[1], request("CHECK", b"Subject: x\r\n\r\n" + bytes(range(256)) * 4))
    assert answer.startswith(b"SPAMD/1.1 0 EX_OK\r\nSpam: ")


def test_ten_thousand_pipelined_pings_get_one_pong_and_a_close(server):
    assert exchange(server[1], b"PING SPAMC/1.5\r\n\r\n" * 10_000) == b"SPAMD/1.5 0 PONG\r\n"
    assert exchange(server[1], b"PING SPAMC/1.5\r\n\r\n" * 10_000, half_close=False) == b"SPAMD/1.5 0 PONG\r\n"


def test_tell_from_a_client_outside_the_allowed_set_is_refused(server):
    """127.0.0.2 is loopback (in spamd_allowed_ips) but outside spamd_tell_allowed_ips (127.0.0.1)."""
    sent = request("TELL", b"Subject: x\r\n\r\nbody", Message_class="spam", Set="local")
    answer = exchange(server[1], sent, source="127.0.0.2")
    assert answer == b"SPAMD/1.0 77 EX_NOPERM client 127.0.0.2 is not in SPAMGPT_SPAMD_TELL_ALLOWED_IPS\r\n"
    assert exchange(server[1], request("CHECK", MESSAGES["plain"]), source="127.0.0.2").startswith(b"SPAMD/1.1 0")


# --- a message on the threshold, and a server with TELL off


@pytest.fixture(scope="module", params=["on", "below"])
def boundary(request, tmp_path_factory, tiny_config, bpe_dir) -> tuple[Path, bool]:
    """A calibrated checkpoint whose threshold is the served P(spam) of the plain message ("on": spam) or
    the next float32 above it ("below": ham), and whether the message is spam."""
    checkpoint = calibrated_checkpoint(tmp_path_factory.mktemp("ckpt"), tiny_config, bpe_dir)
    message = {"base64": base64.b64encode(MESSAGES["plain"]).decode()}
    with TestClient(create_app(tiny_settings(checkpoint))) as client:
        p = client.post("/classify", json={"messages": [message]}).json()["results"][0]["probabilities"]["spam"]
    value = p if request.param == "on" else torch.nextafter(torch.tensor(p), torch.tensor(1.0)).item()
    edit_card(threshold={"label": "spam", "value": value})(checkpoint)
    return checkpoint, request.param == "on"


def test_a_message_on_the_threshold(boundary, tmp_path):
    checkpoint, is_spam = boundary
    port = free_port()
    # TELL on without a feedback store, for the ham case: refused at its header, with a warning at the start
    tell_on = {} if is_spam else {"spamd_allow_tell": "true"}
    with live_server(checkpoint, tmp_path / "server.log", spamd_port=port, **tell_on):
        answer = exchange(port, request("CHECK", MESSAGES["plain"]))
        assert answer == (
            b"SPAMD/1.1 0 EX_OK\r\nSpam: True ; 5.0 / 5.0\r\n\r\n"
            if is_spam
            else b"SPAMD/1.1 0 EX_OK\r\nSpam: False ; 4.9 / 5.0\r\n\r\n"
        )
        if SPAMC is not None:
            check = spamc(port, "-c", message=MESSAGES["plain"])
            assert (check.stdout, check.returncode) == ((b"5.0/5.0\n", 1) if is_spam else (b"4.9/5.0\n", 0))
            # REPORT_IFSPAM: the report on spam only, and (with -E) exit code 1 on spam
            if_spam = spamc(port, "-r", "-E", message=MESSAGES["plain"])
            assert (if_spam.returncode, if_spam.stdout.startswith(b"5.0/5.0\n")) == (int(is_spam), is_spam)
            assert (b"Content analysis details:   (5.0 points, 5.0 required)" in if_spam.stdout) == is_spam
        if is_spam:  # TELL is off by default: refused with spamd's own answer
            with pytest.raises(UnavailableException, match="TELL is not enabled"):
                asyncio.run(aiospamc.tell(MESSAGES["plain"], "spam", set_action="local", host="127.0.0.1", port=port))
        else:  # the message is never sent: a TELL waiting for it would end at the arrival deadline instead
            header = b"TELL SPAMC/1.5\r\nMessage-class: spam\r\nSet: local\r\nContent-length: 100\r\n\r\n"
            refused = exchange(port, header, half_close=False)
            assert (
                refused
                == b"SPAMD/1.0 69 EX_UNAVAILABLE Service Unavailable: no feedback store (SPAMGPT_FEEDBACK_ENABLED)\r\n"
            )
    warning = "SPAMGPT_SPAMD_ALLOW_TELL is on but SPAMGPT_FEEDBACK_ENABLED is off: every TELL is refused"
    assert ((tmp_path / "server.log").read_text().count(warning)) == (0 if is_spam else 1)


def test_a_client_outside_the_allowed_ips_and_one_over_the_connection_limit_are_answered(tiny_checkpoint, tmp_path):
    port = free_port()
    settings = {"spamd_port": port, "spamd_allowed_ips": "127.0.0.1", "spamd_max_connections": 1}
    with live_server(tiny_checkpoint, tmp_path / "server.log", **settings):
        assert exchange(port, b"PING SPAMC/1.5\r\n\r\n") == b"SPAMD/1.5 0 PONG\r\n"
        refused = exchange(port, b"PING SPAMC/1.5\r\n\r\n", source="127.0.0.2")
        assert refused == b"SPAMD/1.0 77 EX_NOPERM client 127.0.0.2 is not in SPAMGPT_SPAMD_ALLOWED_IPS\r\n"
        with socket.create_connection(("127.0.0.1", port)) as held:  # the one connection allowed, held open
            held.sendall(b"CHECK SPAMC/1.5\r\n")
            time.sleep(1)  # for the server to accept it first
            busy = exchange(port, b"PING SPAMC/1.5\r\n\r\n")
        assert busy == b"SPAMD/1.0 75 EX_TEMPFAIL Service busy: 1 connections open, retry later\r\n"


def test_a_replacement_of_the_default_model_with_other_labels_is_refused_and_spamd_serves_on(
    tiny_config, bpe_dir, tmp_path
):
    # the listener took its spam label from the default model at startup: a model without it would fail every CHECK
    torch.manual_seed(0)
    checkpoint = save_checkpoint(tmp_path / "spam", GPTClassifier(tiny_config), bpe_dir, tiny_card())
    three = replace(tiny_config, n_labels=3)
    languages = save_checkpoint(tmp_path / "lang", GPTClassifier(three), bpe_dir, tiny_card(labels=("de", "en", "fr")))
    port = free_port()
    settings = {"models": f"spam={checkpoint}", "api_key": "secret", "spamd_port": port}
    with (
        live_server(None, tmp_path / "server.log", **settings) as (url, _),
        httpx.Client(base_url=url, headers={"X-API-Key": "secret"}, trust_env=False, timeout=30) as http,
    ):
        refused = http.put("/admin/models/spam", json={"checkpoint": str(languages)})
        answer = exchange(port, request("CHECK", MESSAGES["plain"]))
        assert http.get("/admin/models").json()["models"][0]["revision"] == 1
    assert refused.status_code == 422
    assert refused.json()["error"]["type"] == "checkpoint_refused"
    assert "are ['ham', 'spam'] and are used by the spamd listener" in refused.json()["error"]["message"]
    assert answer.startswith(b"SPAMD/1.1 0 EX_OK\r\nSpam: ")
