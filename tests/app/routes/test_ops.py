"""Operations: /info is the model card and the limits in force, /metrics counts requests and batches, and an
unknown route or method keeps the API's error shape."""

from tests.helpers import error_of


def test_info_is_the_model_card(client):
    info = client.get("/info").json()
    assert info["labels"] == ["ham", "spam"]
    assert info["base_model"] == "random init (tiny)"
    assert info["max_tokens"] == 48
    assert info["parameters"] == 36258
    assert (info["device"], info["dtype"], info["quantization"]) == ("cpu", "float32", None)
    assert info["limits"]["max_texts_per_request"] == 256
    assert info["threshold"] is None and info["metrics"] == {}


def test_metrics_count_requests_and_batches(client):
    client.post("/classify", json={"texts": ["a", "b", "c"]})
    client.post("/classify", json={"texts": []})
    text = client.get("/metrics").text
    assert 'spamgpt_requests_total{route="/classify",status="200"} 1.0' in text
    assert 'spamgpt_requests_total{route="/classify",status="422"} 1.0' in text
    assert "spamgpt_queue_wait_seconds_count 3.0" in text
    assert "spamgpt_tokenize_seconds_count 1.0" in text
    assert "spamgpt_inference_seconds_count" in text
    assert "spamgpt_batch_size_sum 3.0" in text
    assert "spamgpt_queue_depth 0.0" in text


def test_unknown_route_and_method_keep_the_error_shape(client):
    assert error_of(client.get("/nowhere"), 404)["type"] == "http_error"
    assert error_of(client.get("/classify"), 405)["type"] == "http_error"
