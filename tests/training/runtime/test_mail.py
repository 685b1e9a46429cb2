"""Reading raw e-mail into the text the model reads (training.runtime.mail), the card's record of it, and long mail
read in windows. Every message is built here."""

import base64
import json
import tracemalloc

import pytest
import torch
from torch.testing import assert_close

from tests.helpers import tiny_card
from training.runtime.checkpoint import CONFIG_FILE, CheckpointError, load_checkpoint, save_checkpoint
from training.runtime.classifier import Classifier
from training.runtime.mail import (
    DEFAULT_EXTRACTION,
    EXTRACTION_VERSION,
    MAX_HEADER_CHARS,
    MAX_MULTIPARTS,
    Extraction,
    combine_windows,
    is_message,
    read_message,
    windows,
)
from training.runtime.model import GPTClassifier
from training.runtime.options import ClassifierOptions


def message(*headers: str, body: str = "", raw_body: bytes | None = None) -> bytes:
    """A message from header lines and a body, CRLF line ends."""
    head = "\r\n".join(headers).encode()
    return head + b"\r\n\r\n" + (raw_body if raw_body is not None else body.encode())


def multipart(subtype: str, boundary: str, *parts: bytes, headers: tuple[str, ...] = ()) -> bytes:
    body = b"".join(b"--" + boundary.encode() + b"\r\n" + part + b"\r\n" for part in parts)
    body += b"--" + boundary.encode() + b"--\r\n"
    return message(*headers, f'Content-Type: multipart/{subtype}; boundary="{boundary}"', raw_body=body)


def test_subject_and_plain_body_are_read():
    mail = read_message(message("Subject: Lunch?", "Message-ID: <1@example.org>", body="See you at noon.\r\n"))
    assert mail.text == "Subject: Lunch?\n\nSee you at noon."
    assert (mail.subject, mail.message_id, mail.defects, mail.attachments) == ("Lunch?", "<1@example.org>", 0, ())


def test_plain_alternative_is_preferred_to_html():
    raw = multipart(
        "alternative",
        "b1",
        b"Content-Type: text/html\r\n\r\n<p>the <b>html</b> one</p>",
        b"Content-Type: text/plain\r\n\r\nthe plain one",
        headers=("Subject: alt",),
    )
    assert read_message(raw).text == "Subject: alt\n\nthe plain one"


def test_html_is_converted_without_script_style_or_comments():
    html = "<html><head><style>p {color: red}</style><script>track()</script></head>"
    html += "<body><p>Cheap&nbsp;<b>meds</b></p><!-- hidden --></body></html>"
    text = read_message(message("Subject: s", "Content-Type: text/html", body=html)).text
    assert text == "Subject: s\n\nCheap\xa0meds"


@pytest.mark.parametrize(
    ("headers", "payload", "expected"),
    [
        pytest.param(
            ("Content-Type: text/plain; charset=utf-8", "Content-Transfer-Encoding: base64"),
            base64.b64encode("café ☕".encode()),
            "café ☕",
            id="base64-utf8",
        ),
        pytest.param(
            ("Content-Type: text/plain; charset=iso-8859-1", "Content-Transfer-Encoding: quoted-printable"),
            b"caf=E9 cr=E8me",
            "café crème",
            id="quoted-printable-latin1",
        ),
        pytest.param(
            ("Content-Type: text/plain; charset=x-no-such-charset",), "naïve".encode(), "naïve", id="unknown-charset"
        ),
        pytest.param(("Content-Type: text/plain; charset=us-ascii",), "naïve".encode(), "naïve", id="lying-charset"),
        pytest.param(("Content-Type: text/plain; charset=utf-8",), b"caf\xe9", "café", id="latin1-labelled-utf8"),
        pytest.param(("Content-Type: text/plain",), b"\x81\x8d\x8f", "\x81\x8d\x8f", id="bytes-only-latin1-reads"),
    ],
)
def test_transfer_encodings_and_charsets_are_decoded(headers, payload, expected):
    assert read_message(message(*headers, raw_body=payload)).text == expected


def test_attachments_are_named_never_read():
    secret = base64.b64encode(b"ATTACHED TEXT")
    raw = multipart(
        "mixed",
        "m",
        b"Content-Type: text/plain\r\n\r\nsee attached",
        b'Content-Type: text/plain\r\nContent-Disposition: attachment; filename="notes.txt"\r\n'
        b"Content-Transfer-Encoding: base64\r\n\r\n" + secret,
        b"Content-Type: application/pdf; name==?utf-8?q?r=C3=A9sum=C3=A9.pdf?=\r\n\r\n%PDF",
        b"Content-Type: image/png\r\n\r\n\x89PNG",
    )
    mail = read_message(raw)
    assert mail.text == "see attached" and "ATTACHED" not in mail.text
    assert mail.attachments == ("notes.txt", "résumé.pdf", "image/png")


def test_encoded_words_and_raw_8bit_headers_are_decoded():
    assert read_message(message("Subject: =?utf-8?q?na=C3=AFve?= café", body="x")).subject == "naïve café"
    assert read_message(b"Subject: caf\xe9\r\n\r\nx").subject == "café"  # not UTF-8: Windows-1252
    unknown = read_message(message("Subject: =?x-unknown?q?caf=E9?= ok", body="x"))
    assert unknown.subject.startswith("caf") and unknown.subject.endswith("ok")


def test_headers_chosen_are_read_in_order():
    raw = message("From: Ann <ann@example.org>", "Subject: hi", "To: bob@example.org", body="body")
    extraction = Extraction(headers=("From", "Subject", "X-Missing"))
    assert read_message(raw, extraction).text == "From: Ann <ann@example.org>\nSubject: hi\n\nbody"
    assert read_message(raw, Extraction(headers=())).text == "body"


def test_body_text_is_cut_at_max_chars_and_counted():
    raw = message("Subject: long", body="word " * 1000)
    mail = read_message(raw, Extraction(max_chars=100))
    assert mail.text == "Subject: long\n\n" + ("word " * 20).strip() and mail.defects == 1


def test_extraction_json_round_trips_and_refuses_what_it_does_not_implement():
    extraction = Extraction(headers=("Subject", "From"), max_chars=5000)
    assert Extraction.from_json(json.loads(json.dumps(extraction.to_json()))) == extraction
    with pytest.raises(ValueError, match=f"extraction version 99 is not implemented.*version {EXTRACTION_VERSION}"):
        Extraction.from_json({**extraction.to_json(), "version": 99})
    with pytest.raises(ValueError, match="html converter 'lynx'"):
        Extraction(html="lynx")
    with pytest.raises(ValueError, match="header field names"):
        Extraction(headers=("Sub ject",))
    with pytest.raises(TypeError, match="headers"):
        Extraction.from_json({"version": 1, "headers": "Subject"})


# --- Bad input: read as far as it goes, never raises, bounded ----------------------------------------------------


def nested(depth: int) -> bytes:
    head = b"".join(b'Content-Type: multipart/mixed; boundary="b%d"\r\n\r\n--b%d\r\n' % (i, i) for i in range(depth))
    tail = b"".join(b"\r\n--b%d--\r\n" % i for i in reversed(range(depth)))
    return b"Subject: deep\r\n" + head + b"Content-Type: text/plain\r\n\r\ninnermost" + tail


BAD = {
    "empty": b"",
    "nul-filled": b"\0" * 4096,
    "not-a-message": b"just some words, no header at all",
    "binary": bytes(range(256)) * 16,
    "no-readable-part": multipart("mixed", "x", b"Content-Type: image/gif\r\n\r\nGIF89a"),
    "nested-10000": nested(10_000),
    "header-line-1mb": b"Subject: " + b"x" * (1 << 20) + b"\r\n\r\nbody",
    "address-header-1mb": b"From: " + b"a@b, " * 200_000 + b"\r\nSubject: s\r\n\r\nbody",
    "content-type-1mb": b"Content-Type: text/plain; " + b"a=b; " * 200_000 + b"\r\n\r\nbody",
    "unknown-charset-word": b"Subject: =?x-unknown?b?////?=\r\n\r\nbody",
    "bad-base64": b"Content-Transfer-Encoding: base64\r\n\r\n!!!not base64===\r\n",
    "unterminated-multipart": b'Content-Type: multipart/mixed; boundary="z"\r\n\r\n--z\r\n\r\nhalf',
    "boundary-missing": b"Content-Type: multipart/mixed\r\n\r\n--z\r\nx",
    "many-long-content-types": b'Content-Type: multipart/mixed; boundary="B"\r\n\r\n'
    + (b"--B\r\nContent-Type: text/plain; " + b"a=b; " * 195 + b"\r\n\r\nx\r\n") * 900
    + b"--B--\r\n",
}


@pytest.mark.parametrize("raw", BAD.values(), ids=BAD.keys())
def test_bad_input_is_read_as_far_as_it_goes(raw):
    mail = read_message(raw)
    assert isinstance(mail.text, str) and len(mail.text) <= DEFAULT_EXTRACTION.max_chars + 2 * MAX_HEADER_CHARS


def test_what_bad_input_reads_as():
    assert read_message(BAD["empty"]).text == ""
    assert (read_message(BAD["not-a-message"]).text, read_message(BAD["not-a-message"]).defects) == ("", 1)
    assert not is_message(BAD["not-a-message"]) and is_message(b"From a@b Thu Aug 22 2002\nSubject: x\n\nbody")
    assert read_message(BAD["no-readable-part"]).attachments == ("image/gif",)
    deep = read_message(BAD["nested-10000"])
    assert (deep.text, deep.defects) == ("Subject: deep\n\n", 1)  # read from its headers alone
    assert read_message(nested(MAX_MULTIPARTS)).text == "Subject: deep\n\ninnermost"
    assert read_message(nested(MAX_MULTIPARTS + 1)).text == "Subject: deep\n\n"  # one more: its headers alone
    assert read_message(BAD["header-line-1mb"]).subject == "x" * MAX_HEADER_CHARS
    assert read_message(BAD["many-long-content-types"]).defects == 1  # parts past MAX_PARTS left unread


def test_deeply_nested_html_is_read_whole():
    for depth in (3_000, 20_000):  # 20,000 levels: 220 KB of markup, past max_chars before its conversion
        html = "<div>" * depth + "BUY VIAGRA NOW cheap pills click here" + "</div>" * depth
        mail = read_message(message("Subject: pills", "Content-Type: text/html", body=html))
        assert (mail.text, mail.defects) == ("Subject: pills\n\nBUY VIAGRA NOW cheap pills click here", 0)


def test_html_text_is_cut_at_max_chars_after_its_conversion():
    mail = read_message(message("Content-Type: text/html", body="<p>word</p>" * 50), Extraction(max_chars=12))
    assert (mail.text, mail.defects) == ("wordwordword", 1)


def test_a_body_that_is_not_the_base64_it_declares_counts_a_defect():
    raw = message("Subject: x", "Content-Transfer-Encoding: base64", body="this is not base64 at all!")
    assert read_message(raw).defects == 1
    good = message("Subject: x", "Content-Transfer-Encoding: base64", body=base64.b64encode(b"hello").decode())
    assert (read_message(good).text, read_message(good).defects) == ("Subject: x\n\nhello", 0)


def test_a_cut_inside_the_header_block_reads_no_body_and_counts_the_cut():
    headers = "\r\n".join(f"X-H{i}: {'a' * 100}" for i in range(20_000))
    mail = read_message(message("Subject: s", headers, body="the body"))
    assert (mail.text, mail.defects) == ("Subject: s\n\n", 1)


def test_a_30mb_attachment_is_never_decoded_and_memory_stays_bounded():
    attachment = base64.encodebytes(b"\0" * (30 << 20))
    raw = multipart(
        "mixed",
        "a",
        b"Content-Type: text/plain\r\n\r\nsee attached",
        b'Content-Type: application/octet-stream\r\nContent-Disposition: attachment; filename="big.bin"\r\n'
        b"Content-Transfer-Encoding: base64\r\n\r\n" + attachment,
    )
    tracemalloc.start()
    try:
        mail = read_message(raw)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert (mail.text, mail.attachments) == ("see attached", ("big.bin",))
    assert mail.defects >= 1  # cut at max_bytes (and so its multipart unclosed)
    assert peak < 16 * DEFAULT_EXTRACTION.max_bytes  # what parsing max_bytes holds, never the 30 MB decoded


# --- Windows -------------------------------------------------------------------------------------------------------


def test_windows_cut_consecutive_runs_and_say_what_is_left():
    assert windows(list(range(10)), 4, 8) == ([[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]], False)
    assert windows(list(range(10)), 4, 2) == ([[0, 1, 2, 3], [4, 5, 6, 7]], True)
    assert windows([], 4, 8) == ([[]], False)
    assert windows(list(range(8)), 4, 2) == ([[0, 1, 2, 3], [4, 5, 6, 7]], False)


def test_combine_windows_by_rule():
    logits = torch.tensor([[0.0, 1.0], [0.0, -3.0], [2.0, 0.0], [1.0, 0.0], [0.0, 5.0]])
    counts = [2, 3]
    assert_close(combine_windows(logits, counts, "first", 1), torch.tensor([[0.0, 1.0], [2.0, 0.0]]))
    assert_close(combine_windows(logits, counts, "mean", 1), torch.tensor([[0.0, -1.0], [1.0, 5 / 3]]))
    assert_close(combine_windows(logits, counts, "max", 1), torch.tensor([[0.0, 1.0], [0.0, 5.0]]))
    assert_close(combine_windows(logits, counts, "max", 0), torch.tensor([[0.0, -3.0], [2.0, 0.0]]))
    assert_close(combine_windows(logits, counts, "max", None), torch.tensor([[0.0, -3.0], [0.0, 5.0]]))


def load(checkpoint, **options) -> Classifier:
    return Classifier.load(checkpoint, ClassifierOptions(**{"device": "cpu", **options}))


LONG = message("Subject: long", body=" ".join(f"word{i}" for i in range(400)))


@pytest.mark.parametrize("rule", ["first", "mean", "max"])
def test_classify_messages_reads_windows_and_combines_them(tiny_checkpoint, rule):
    classifier = load(tiny_checkpoint, mail_windows=rule, mail_max_windows=3)
    short = message("Subject: hi", body="see you")
    [(mail, long), (_, alone)] = classifier.classify_messages([LONG, short])
    max_tokens = classifier.card.max_tokens
    ids = classifier.checkpoint.tokenizer.encode_ordinary(mail.text)
    expected_windows = 1 if rule == "first" else 3
    assert long.tokens == min(len(ids), expected_windows * max_tokens) and long.truncated
    rows = [ids[i * max_tokens : (i + 1) * max_tokens] for i in range(expected_windows)]
    expected = combine_windows(classifier.predict_logits(rows), [expected_windows], rule, 1)
    assert_close(torch.tensor([list(long.probabilities.values())]), torch.softmax(expected, dim=1))
    text_prediction = classifier.classify([classifier.read_messages([short])[0].mail.text])[0]
    assert alone == text_prediction  # a message within max_tokens scores as its text does


def test_classify_messages_refuses_a_message_with_nothing_readable(tiny_checkpoint):
    classifier = load(tiny_checkpoint)
    with pytest.raises(ValueError, match=r"messages \[1, 2\]: has no visible characters"):
        classifier.classify_messages([LONG, b"", BAD["no-readable-part"]])


# --- The card's record -------------------------------------------------------------------------------------------


def test_the_card_records_the_extraction_and_the_classifier_applies_it(tmp_path, tiny_config, bpe_dir):
    extraction = Extraction(headers=("From", "Subject"))
    path = save_checkpoint(tmp_path / "c", GPTClassifier(tiny_config), bpe_dir, tiny_card(extraction=extraction))
    assert json.loads((path / CONFIG_FILE).read_text())["extraction"]["headers"] == ["From", "Subject"]
    classifier = load(path)
    assert classifier.extraction == extraction
    [mail] = classifier.read_messages([message("Subject: s", "From: f@example.org", body="b")])
    assert mail.mail.text == "From: f@example.org\nSubject: s\n\nb"


def test_a_text_checkpoint_reads_mail_by_the_default_extraction(tiny_checkpoint):
    config = json.loads((tiny_checkpoint / CONFIG_FILE).read_text())
    del config["extraction"]  # as a checkpoint written before the field was
    (tiny_checkpoint / CONFIG_FILE).write_text(json.dumps(config))
    assert load_checkpoint(tiny_checkpoint).card.extraction is None
    assert load(tiny_checkpoint).extraction == DEFAULT_EXTRACTION


@pytest.mark.parametrize(
    ("record", "message_"),
    [
        pytest.param({"version": 99}, "extraction version 99 is not implemented", id="newer-version"),
        pytest.param({"version": 1, "html": "lynx"}, "html converter 'lynx'", id="other-converter"),
        pytest.param({"version": 1, "max_chars": "9"}, "max_chars must be int", id="wrong-type"),
        pytest.param(["Subject"], "must be an object or null", id="not-an-object"),
    ],
)
def test_a_card_whose_extraction_this_code_does_not_implement_is_refused(tiny_checkpoint, record, message_):
    config = json.loads((tiny_checkpoint / CONFIG_FILE).read_text())
    (tiny_checkpoint / CONFIG_FILE).write_text(json.dumps({**config, "extraction": record}))
    with pytest.raises(CheckpointError, match=f"config.json: 'extraction'.*{message_}"):
        load_checkpoint(tiny_checkpoint)
