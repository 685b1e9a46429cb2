"""X-Request-ID on every response, and SPAMGPT_LOG_FORMAT=json: one JSON object per log line, each request's line
carrying its id."""

import json
import re

import httpx
import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from tests.helpers import live_server, tiny_settings


@pytest.mark.parametrize(
    ("sent", "kept"),
    [
        pytest.param("req-42.a:b/c+d=e@f", True, id="usable"),
        pytest.param(None, False, id="absent"),
        pytest.param("x" * 129, False, id="too-long"),
        pytest.param("two words", False, id="space"),
        pytest.param('quote"d', False, id="quote"),
        pytest.param("", False, id="empty"),
    ],
)
def test_every_response_carries_a_request_id(tiny_checkpoint, sent, kept):
    headers = {} if sent is None else {"X-Request-ID": sent}
    with TestClient(create_app(tiny_settings(tiny_checkpoint))) as client:
        ok = client.post("/classify", json={"texts": ["hello"]}, headers=headers)
        refused = client.post("/classify", json={"texts": []}, headers=headers)  # errors carry it too
    for response in (ok, refused):
        given = response.headers["X-Request-ID"]
        if kept:
            assert given == sent
        else:
            assert re.fullmatch(r"[0-9a-f]{32}", given), given
    if not kept:
        assert ok.headers["X-Request-ID"] != refused.headers["X-Request-ID"]  # made up afresh for each request


def test_json_logs_are_one_object_a_line_and_requests_carry_their_id(tiny_checkpoint, tmp_path):
    log = tmp_path / "server.log"
    with live_server(tiny_checkpoint, log, log_format="json") as (url, _), httpx.Client(trust_env=False) as client:
        mine = client.post(f"{url}/classify", json={"texts": ["hi"]}, headers={"X-Request-ID": "abc-123"})
        theirs = client.get(f"{url}/info")
        missing = client.get(f"{url}/nowhere")
    lines = [line for line in log.read_text().splitlines() if line.strip()]
    records = [json.loads(line) for line in lines]  # every line, uvicorn's startup and shutdown lines too
    assert all({"time", "level", "name", "message"} <= set(r) for r in records), records
    requests = {r["request_id"]: r for r in records if "request_id" in r}
    assert requests["abc-123"] | {"duration_ms": 0} == {
        **requests["abc-123"], "method": "POST", "path": "/classify", "status": 200, "duration_ms": 0,
    }  # fmt: skip
    assert mine.headers["X-Request-ID"] == "abc-123"
    for response, path, status in ((theirs, "/info", 200), (missing, "/nowhere", 404)):
        logged = requests[response.headers["X-Request-ID"]]
        assert (logged["path"], logged["status"]) == (path, status)
    assert any(r["name"].startswith("uvicorn") for r in records)  # uvicorn's own lines are JSON too
