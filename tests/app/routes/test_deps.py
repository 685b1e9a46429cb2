"""The routes' dependencies: the API key guards /classify and /info, never /health or /metrics."""

import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from tests.helpers import error_of, tiny_settings


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        pytest.param({}, 401, id="missing"),
        pytest.param({"Authorization": "Bearer wrong"}, 401, id="wrong-bearer"),
        pytest.param({"X-API-Key": "wrong"}, 401, id="wrong-header"),
        pytest.param({"Authorization": "Basic s3cret"}, 401, id="wrong-scheme"),
        pytest.param({"Authorization": "Basic s3cret", "X-API-Key": "s3cret"}, 401, id="wrong-scheme-beside-a-key"),
        pytest.param({"Authorization": "Bearer s3cret"}, 200, id="bearer"),
        pytest.param({"X-API-Key": "s3cret"}, 200, id="x-api-key"),
    ],
)
def test_api_key_guards_classify_and_info(tiny_checkpoint, headers, status):
    with TestClient(create_app(tiny_settings(tiny_checkpoint, api_key="s3cret"))) as client:
        classify = client.post("/classify", json={"texts": ["hi"]}, headers=headers)
        info = client.get("/info", headers=headers)
        # open without a key: load balancers and scrapers hold no secret
        assert client.get("/health").status_code == 200
        assert client.get("/metrics").status_code == 200
    assert (classify.status_code, info.status_code) == (status, status)
    if status == 401:
        assert error_of(classify, 401)["type"] == "unauthorized"
        assert classify.headers["WWW-Authenticate"] == "Bearer"


@pytest.mark.parametrize(
    ("api_key", "declared"), [pytest.param(None, False, id="open"), pytest.param("s3cret", True, id="with-a-key")]
)
def test_scoring_routes_declare_and_check_the_api_key_only_where_one_is_configured(tiny_checkpoint, api_key, declared):
    with TestClient(create_app(tiny_settings(tiny_checkpoint, api_key=api_key))) as client:
        operations = {path: client.app.openapi()["paths"][path]["post"] for path in ("/classify", "/predict", "/")}
        statuses = {
            "/classify": client.post("/classify", json={"texts": ["hi"]}).status_code,
            "/predict": client.post("/predict", json={"inputs": "hi"}).status_code,
            "/": client.post("/", json={"inputs": "hi"}).status_code,
        }
    assert {path: "security" in operation for path, operation in operations.items()} == dict.fromkeys(
        operations, declared
    )
    assert statuses == dict.fromkeys(statuses, 401 if declared else 200)
