"""POST /feedback and GET /feedback/stats: corrections stored once with their history, counted and scored by the
serving model; what bad input, a missing key, a disabled store and a damaged database get."""

import base64
import re
import sqlite3

import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from tests.helpers import error_of, tiny_settings
from training.runtime.feedback import FeedbackStore, FeedbackStoreError

MESSAGE = "Message-ID: <7@example.org>\r\nSubject: Your invoice\r\n\r\nPlease find it attached.\r\n"
KEY = "s3cret"


def feedback_settings(checkpoint, tmp_path, **overrides):
    path = tmp_path / "fb" / "feedback.db"
    return tiny_settings(checkpoint, feedback_enabled=True, feedback_path=path, **overrides)


@pytest.fixture
def settings(tiny_checkpoint, tmp_path):
    return feedback_settings(tiny_checkpoint, tmp_path)


@pytest.fixture
def client(settings):
    with TestClient(create_app(settings)) as client:
        yield client


def test_reports_are_stored_once_with_the_latest_label(client, settings):
    first = client.post("/feedback", json={"text": "WIN a prize now", "label": "spam"})
    assert first.status_code == 200, first.text
    assert first.json()["outcome"] == "new"
    again = client.post("/feedback", json={"text": "win a prize  now", "label": "spam"}).json()
    assert (again["outcome"], again["id"]) == ("same", first.json()["id"])
    replaced = client.post("/feedback", json={"text": "WIN a prize now", "label": "ham", "reason": "my bank"}).json()
    assert (replaced["outcome"], replaced["previous"], replaced["label"]) == ("replaced", "spam", "ham")
    with FeedbackStore(settings.feedback_path, ("ham", "spam")) as store:  # what is on disk, read by another reader
        [correction] = list(store.corrections())
        assert (correction.content, correction.label, correction.reason, correction.reports) == (
            "WIN a prize now",
            "ham",
            "my bank",
            3,
        )


@pytest.mark.parametrize(
    "field",
    [
        pytest.param({"message": MESSAGE}, id="message"),
        pytest.param({"message": {"base64": base64.b64encode(MESSAGE.encode("latin-1")).decode()}}, id="base64"),
    ],
)
def test_a_raw_message_is_stored_as_its_bytes(client, settings, field):
    response = client.post("/feedback", json={**field, "label": "ham"})
    assert response.status_code == 200, response.text
    with FeedbackStore(settings.feedback_path, ("ham", "spam")) as store:
        [correction] = list(store.corrections())
    assert (correction.kind, correction.content) == ("message", MESSAGE.encode())


def test_stats_count_by_label_and_score_with_the_serving_model(client, settings):
    texts = {"WIN a prize now": "spam", "See you at 5?": "ham", "Free entry, text WIN": "spam"}
    for text, label in texts.items():
        client.post("/feedback", json={"text": text, "label": label}).raise_for_status()
    client.post("/feedback", json={"message": MESSAGE, "label": "ham"}).raise_for_status()
    with FeedbackStore(settings.feedback_path, ("ham", "spam")) as store:  # as a TELL may store one: nothing to read
        store.record(b"Subject:\r\n\r\n", "spam", source="spamd")
    stats = client.get("/feedback/stats")
    assert stats.status_code == 200, stats.text
    served = client.post("/classify", json={"texts": list(texts)}).json()
    served_message = client.post("/classify", json={"messages": [MESSAGE]}).json()
    wrong = {"ham": 0, "spam": 0}
    for result, label in zip(served["results"] + served_message["results"], [*texts.values(), "ham"], strict=True):
        wrong[label] += result["label"] != label
    assert stats.json() == {
        "model": served["model"],
        "corrections": 5,
        "reports": 5,
        "by_label": {"ham": 2, "spam": 3},
        "by_kind": {"text": 3, "message": 2},
        "wrong": sum(wrong.values()),
        "wrong_by_label": wrong,
        "unreadable": 1,
    }


@pytest.mark.parametrize(
    ("body", "field", "message"),
    [
        pytest.param(
            {"text": "hi", "label": "eggs"},
            "label",
            "not one of the model's labels ['ham', 'spam']",
            id="unknown-label",
        ),
        pytest.param({"text": "", "label": "spam"}, "text", "must not be empty", id="empty-text"),
        pytest.param({"text": " \u200b", "label": "spam"}, "text", "no visible characters", id="invisible-text"),
        pytest.param({"text": "x" * 41, "label": "spam"}, "text", "41 characters, at most 40", id="oversized-text"),
        pytest.param({"message": "", "label": "spam"}, "message", "no visible", id="empty-message"),
        pytest.param({"message": "Subject: \r\n\r\n \r\n", "label": "spam"}, "message", "no visible", id="unreadable"),
        pytest.param(
            {"message": {"base64": "not base64!"}, "label": "spam"}, "message", "base64 not valid", id="base64"
        ),
        pytest.param({"message": "x" * 101, "label": "spam"}, "message", "101 bytes, at most 100", id="oversized"),
        pytest.param({"label": "spam"}, "body", "exactly one of text, message", id="no-content"),
        pytest.param({"text": "a", "message": MESSAGE, "label": "spam"}, "body", "(got text, message)", id="two"),
        pytest.param({"text": "hi"}, "label", "Field required", id="no-label"),
        pytest.param({"text": "hi", "label": "spam", "reason": "r" * 1001}, "reason", "at most 1000", id="long-reason"),
        pytest.param({"text": "hi", "label": "spam", "texts": ["hi"]}, "texts", "Extra inputs", id="unknown-field"),
    ],
)
def test_bad_reports_are_refused_naming_the_field(tiny_checkpoint, tmp_path, body, field, message):
    limits = {"max_text_chars": 40, "max_message_bytes": 100}
    with TestClient(create_app(feedback_settings(tiny_checkpoint, tmp_path, **limits))) as client:
        error = error_of(client.post("/feedback", json=body), 422)
        assert [d["field"] for d in error["details"]] == [field]
        assert message in error["details"][0]["message"]
        assert client.get("/feedback/stats").json()["reports"] == 0


@pytest.mark.parametrize(
    "request_args",
    [("post", "/feedback", {"json": {"text": "a", "label": "spam"}}), ("get", "/feedback/stats", {})],
    ids=["post", "stats"],
)
def test_without_the_key_nothing_is_told_or_shown(tiny_checkpoint, tmp_path, request_args):
    method, path, kwargs = request_args
    with TestClient(create_app(feedback_settings(tiny_checkpoint, tmp_path, api_key=KEY))) as client:
        assert error_of(client.request(method.upper(), path, **kwargs), 401)["type"] == "unauthorized"
        authorized = client.request(method.upper(), path, headers={"X-API-Key": KEY}, **kwargs)
        assert authorized.status_code == 200, authorized.text


@pytest.mark.parametrize("path", ["/feedback", "/feedback/stats"])
def test_disabled_feedback_is_refused_clearly_and_writes_nothing(tiny_checkpoint, tmp_path, path):
    settings = tiny_settings(tiny_checkpoint, feedback_path=tmp_path / "feedback.db")
    with TestClient(create_app(settings)) as client:
        response = client.request("POST" if path == "/feedback" else "GET", path, json={"text": "a", "label": "spam"})
        error = error_of(response, 403)
        assert (error["type"], "SPAMGPT_FEEDBACK_ENABLED=true" in error["message"]) == ("feedback_disabled", True)
    assert not (tmp_path / "feedback.db").exists()


def test_a_damaged_database_stops_the_start_naming_the_file(settings):
    settings.feedback_path.parent.mkdir(parents=True)
    settings.feedback_path.write_bytes(b"this is not an SQLite database " * 200)
    with (
        pytest.raises(FeedbackStoreError, match=re.escape(str(settings.feedback_path))),
        TestClient(create_app(settings)),
    ):
        pass


def test_a_write_the_database_refuses_is_a_503_and_the_server_goes_on(client, settings):
    client.post("/feedback", json={"text": "first", "label": "spam"}).raise_for_status()
    db = sqlite3.connect(settings.feedback_path)
    db.execute("ALTER TABLE reports RENAME TO reports_gone")  # as a disk that refuses the history's write
    db.commit()
    error = error_of(client.post("/feedback", json={"text": "second", "label": "spam"}), 503)
    assert (error["type"], str(settings.feedback_path) in error["message"]) == ("feedback_not_stored", True)
    db.execute("ALTER TABLE reports_gone RENAME TO reports")
    db.commit()
    db.close()
    assert client.get("/feedback/stats").json()["corrections"] == 1  # the refused report left nothing behind
    assert client.post("/feedback", json={"text": "second", "label": "spam"}).json()["outcome"] == "new"


def test_the_openapi_document_declares_every_answer(client):
    paths = client.get("/openapi.json").json()["paths"]
    assert set(paths["/feedback"]["post"]["responses"]) == {"200", "401", "403", "408", "413", "422", "429", "503"}
    assert {"401", "403", "422", "429", "503", "504"} <= set(paths["/feedback/stats"]["get"]["responses"])
