"""POST /classify with raw e-mail: `{"messages": [...]}` and a message/rfc822 body, their limits and the bad input
of docs/mail.md. Every message is built here."""

import base64
import json
import os
import re
import subprocess

import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from tests.helpers import ROOT, error_of, live_server, tiny_card, tiny_settings
from training.runtime.checkpoint import CONFIG_FILE, save_checkpoint
from training.runtime.classifier import Classifier
from training.runtime.mail import NOT_A_MESSAGE, Extraction
from training.runtime.model import GPTClassifier
from training.runtime.options import ClassifierOptions

HAM = b"Subject: Lunch?\r\nMessage-ID: <1@example.org>\r\n\r\nSee you at noon.\r\n"
LONG = b"Subject: news\r\n\r\n" + b" ".join(b"word%d" % i for i in range(300))
RFC822 = {"Content-Type": "message/rfc822"}


def nested(depth: int) -> bytes:
    head = b"".join(b'Content-Type: multipart/mixed; boundary="b%d"\r\n\r\n--b%d\r\n' % (i, i) for i in range(depth))
    return b"Subject: deep\r\n" + head + b"Content-Type: text/plain\r\n\r\ninnermost"


def with_attachment(size: int) -> bytes:
    attachment = base64.encodebytes(b"\0" * size)
    return (
        b'Subject: files\r\nContent-Type: multipart/mixed; boundary="a"\r\n\r\n--a\r\nContent-Type: text/plain\r\n\r\n'
        b"see attached\r\n--a\r\nContent-Type: application/octet-stream\r\n"
        b'Content-Disposition: attachment; filename="x"\r\nContent-Transfer-Encoding: base64\r\n\r\n'
        + attachment
        + b"\r\n--a--\r\n"
    )


@pytest.mark.parametrize("rule", ["first", "mean", "max"])
def test_messages_are_answered_as_the_classifier_reads_them(tiny_checkpoint, rule):
    body = {"messages": [HAM.decode(), {"base64": base64.b64encode(LONG).decode()}]}
    with TestClient(create_app(tiny_settings(tiny_checkpoint, mail_windows=rule))) as client:
        response = client.post("/classify", json=body)
    assert response.status_code == 200, response.text
    ham, long = response.json()["results"]
    classifier = Classifier.load(tiny_checkpoint, ClassifierOptions(device="cpu", mail_windows=rule))
    expected = [p for _, p in classifier.classify_messages([HAM, LONG])]
    for result, prediction in zip((ham, long), expected, strict=True):
        assert result["label"] == prediction.label and result["tokens"] == prediction.tokens
        assert result["probabilities"] == pytest.approx(prediction.probabilities, abs=1e-6)
    assert ham["mail"] == {"windows": 1, "defects": 0, "attachments": 0, "message_id": "<1@example.org>"}
    assert long["mail"]["windows"] == (1 if rule == "first" else 8) and long["truncated"]


def test_a_message_rfc822_body_is_one_message_answered_alike(client):
    as_body = client.post("/classify", content=HAM, headers={"Content-Type": "message/rfc822; charset=utf-8"})
    as_json = client.post("/classify", json={"messages": [HAM.decode()]})
    assert as_body.status_code == 200, as_body.text
    assert as_body.json() == as_json.json()


def test_texts_results_carry_no_mail_field(client):
    [result] = client.post("/classify", json={"texts": ["see you"]}).json()["results"]
    assert set(result) == {"label", "probabilities", "tokens", "truncated"}


@pytest.mark.parametrize(
    ("body", "field", "message"),
    [
        pytest.param({}, "body", "give either texts or messages", id="neither"),
        pytest.param({"texts": ["a"], "messages": ["b"]}, "body", "give either texts or messages", id="both"),
        pytest.param({"texts": [], "messages": ["b"]}, "body", "give either texts or messages", id="empty-texts"),
        pytest.param({"texts": None, "messages": ["b"]}, "body", "give either texts or messages", id="null-texts"),
        pytest.param({"texts": ["a"], "messages": None}, "body", "give either texts or messages", id="null-messages"),
        pytest.param({"messages": []}, "messages", "at least 1 item", id="empty-list"),
        pytest.param({"messages": [HAM.decode(), 3]}, "messages.1", 'a string or {"base64"', id="not-a-message"),
        pytest.param({"messages": [{"base64": "@@@"}]}, "messages.0", "base64 not valid", id="bad-base64"),
        pytest.param({"messages": [{"raw": "x"}]}, "messages.0.base64", "required", id="unknown-field"),
        pytest.param({"messages": [""]}, "messages.0", NOT_A_MESSAGE, id="zero-bytes"),
        pytest.param({"messages": ["\0" * 1000]}, "messages.0", NOT_A_MESSAGE, id="nul-filled"),
        pytest.param({"messages": ["just some words about lunch"]}, "messages.0", NOT_A_MESSAGE, id="no-header"),
        pytest.param(
            {
                "messages": [
                    HAM.decode(),
                    'Content-Type: multipart/mixed; boundary="x"\r\n\r\n--x\r\n'
                    "Content-Type: image/gif\r\n\r\nGIF89a\r\n--x--",
                ]
            },
            "messages.1",
            "nothing readable",
            id="no-readable-part",
        ),
        pytest.param({"messages": ["x" * 2001]}, "messages.0", "2001 bytes, at most 2000", id="too-large"),
        pytest.param({"messages": ["a"] * 4}, "messages", "4 messages, at most 3", id="too-many"),
    ],
)
def test_bad_messages_are_422_naming_the_field(tiny_checkpoint, body, field, message):
    settings = tiny_settings(tiny_checkpoint, max_texts_per_request=3, max_message_bytes=2000)
    with TestClient(create_app(settings)) as client:
        error = error_of(client.post("/classify", json=body), 422)
    assert error["details"][0]["field"] == field and message in error["details"][0]["message"], error
    assert "got {" not in error["message"]  # an object's own error never echoes the body back


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(nested(10_000), id="10000-nested-multiparts"),
        pytest.param(b"Subject: " + b"x" * (1 << 20) + b"\r\n\r\nbody", id="1mb-header-line"),
        pytest.param(b"Subject: =?x-unknown?q?caf=E9?=\r\n\r\nbody", id="unknown-charset-word"),
        pytest.param(b"Subject: x\r\nContent-Type: text/plain; charset=nonesuch\r\n\r\ncaf\xe9", id="unknown-charset"),
        pytest.param(with_attachment(2 << 20), id="2mb-attachment"),
    ],
)
def test_bad_but_readable_messages_are_classified_on_what_is_readable(client, raw):
    response = client.post("/classify", content=raw, headers=RFC822)
    assert response.status_code == 200, response.text
    assert response.json()["results"][0]["label"] in ("ham", "spam")


@pytest.mark.parametrize(
    ("raw", "status", "message"),
    [
        pytest.param(b"", 422, f"body: {NOT_A_MESSAGE}", id="zero-bytes"),
        pytest.param(b"\0" * 4096, 422, f"body: {NOT_A_MESSAGE}", id="nul-filled"),
        pytest.param(b"just some words about lunch", 422, f"body: {NOT_A_MESSAGE}", id="no-header"),
        pytest.param(b"Subject: \r\n\r\n\t", 422, "body: nothing readable", id="nothing-visible"),
        pytest.param(with_attachment(30 << 20), 413, "the limit is 4194304 bytes", id="30mb-attachment"),
    ],
)
def test_bad_message_bodies_are_refused_naming_the_body(client, raw, status, message):
    error = error_of(client.post("/classify", content=raw, headers=RFC822), status)
    assert message in error["message"], error


def test_a_message_body_over_max_message_bytes_is_413(tiny_checkpoint):
    with TestClient(create_app(tiny_settings(tiny_checkpoint, max_message_bytes=100))) as client:
        error = error_of(client.post("/classify", content=LONG, headers=RFC822), 413)
    assert "at most 100 bytes" in error["message"]


def test_info_states_the_extraction_in_force(client, tmp_path, tiny_config, bpe_dir):
    mail = client.get("/info").json()["mail"]
    assert mail["extraction"]["headers"] == ["Subject", "From"] and mail["extraction_source"].startswith("default")
    assert (mail["windows"], mail["max_windows"]) == ("first", 8)
    extraction = Extraction(headers=("From", "Subject"))
    path = save_checkpoint(tmp_path / "c", GPTClassifier(tiny_config), bpe_dir, tiny_card(extraction=extraction))
    with TestClient(create_app(tiny_settings(path, mail_windows="max", mail_max_windows=2))) as other:
        mail = other.get("/info").json()["mail"]
    assert mail["extraction"]["headers"] == ["From", "Subject"] and mail["extraction_source"] == "checkpoint"
    assert (mail["windows"], mail["max_windows"]) == ("max", 2)


def test_a_checkpoint_whose_extraction_is_not_implemented_is_refused_at_startup(tiny_checkpoint):
    config = json.loads((tiny_checkpoint / CONFIG_FILE).read_text())
    (tiny_checkpoint / CONFIG_FILE).write_text(json.dumps({**config, "extraction": {"version": 2}}))
    with (
        pytest.raises(Exception, match="extraction version 2 is not implemented"),
        TestClient(create_app(tiny_settings(tiny_checkpoint))),
    ):
        pass


def test_openapi_declares_both_bodies_and_every_error(client):
    operation = client.get("/openapi.json").json()["paths"]["/classify"]["post"]
    assert set(operation["requestBody"]["content"]) == {"application/json", "message/rfc822"}
    assert {"200", "401", "408", "413", "422", "429", "500", "503", "504"} <= set(operation["responses"])
    schema = client.get("/openapi.json").json()["components"]["schemas"]["ClassifyRequest"]["properties"]
    assert (schema["messages"]["minItems"], schema["messages"]["maxItems"]) == (1, 256)


def test_the_curl_examples_of_docs_mail_work_against_a_live_server(tiny_checkpoint, tmp_path):
    """docs/mail.md's bash block, run as a user copies it, against `python -m app` on the tiny checkpoint."""
    page = (ROOT / "docs" / "mail.md").read_text(encoding="utf-8")
    [block] = [b for b in re.findall(r"```bash\n(.*?)```", page, re.S) if "curl" in b]
    with live_server(tiny_checkpoint, tmp_path / "server.log") as (url, _):
        script = block.replace("http://127.0.0.1:8000", url)
        env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}  # curl straight to loopback
        command = ["bash", "-euo", "pipefail", "-c", script]
        done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    by_body, by_json = [json.loads(line) for line in done.stdout.replace("}{", "}\n{").splitlines()]
    assert [r["mail"]["message_id"] for r in by_json["results"]] == ["<1@example.org>", None]
    assert by_body["results"][0] == by_json["results"][0]
