"""Several named models in one server (app.models): a models directory or list, a default, `model` / `models` on
/classify, /models/{name} for the TEI and Hugging Face routes, batches by prefix group, and the admin API that adds,
replaces and removes models while the server serves."""

import asyncio
import gc
import itertools
import logging
import threading
import time
import weakref
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from app.batcher import Batcher
from app.errors import CheckpointRefused, UnknownModel
from app.main import create_app
from app.metrics import Metrics
from app.service import Service
from app.settings import BatchLimits, Settings, SettingsError, settings_from_environment
from tests.helpers import DELETE, edit_card, edit_tensors, error_of, live_server, sibling, tiny_settings
from training.runtime.checkpoint import CheckpointError
from training.runtime.classifier import Classifier

TEXTS = ["WINNER!! Claim your free prize now", "ok", "see you at the station at 5? " * 9, "é😀 <|endoftext|>"]
KEY = {"X-API-Key": "secret"}


@pytest.fixture
def checkpoints(tmp_path, tiny_config, bpe_dir) -> Path:
    """A models directory: a and b share their embeddings and first block (b with three labels), c has another
    prefix; and beside it (outside the directory) b2, a retrained b on the same base, and bad, whose head overflows
    to inf on every text (it loads, and fails its warm-up)."""
    models = tmp_path / "models"
    sibling(models / "a", tiny_config, bpe_dir, base_seed=0, tail_seed=1)
    sibling(models / "b", tiny_config, bpe_dir, base_seed=0, tail_seed=2, labels=("x", "y", "z"))
    sibling(models / "c", tiny_config, bpe_dir, base_seed=5, tail_seed=3)
    sibling(tmp_path / "b2", tiny_config, bpe_dir, base_seed=0, tail_seed=7, labels=("x", "y", "z"))
    bad = sibling(tmp_path / "bad", tiny_config, bpe_dir, base_seed=0, tail_seed=2, labels=("x", "y", "z"))
    edit_tensors(lambda state: state["score.weight"].fill_(3e38))(bad)
    return models


def several(directory: Path, **overrides) -> Settings:
    settings = {"models_dir": directory, "default_model": "a", "device": "cpu", "api_key": "secret"}
    return Settings(**{**settings, **overrides})


@pytest.fixture
def client(checkpoints):
    with TestClient(create_app(several(checkpoints))) as client:
        yield client


def classify(client, **body) -> dict:
    response = client.post("/classify", json={"texts": TEXTS, **body}, headers=KEY)
    assert response.status_code == 200, response.text
    return response.json()


def test_a_model_that_overflows_on_a_text_is_named_in_the_error_of_a_several_models_request(checkpoints, tokenizer):
    """c overflows on one token only (it loads and warms up; its prefix record dropped, as its embeddings no longer
    match it): a request asking a and c about that text is refused with 500 naming the text and model c, at the top
    level as in its details; a alone still answers it."""
    (z,) = tokenizer.encode_ordinary("z")
    edit_tensors(lambda state: state["transformer.wte.weight"][z].fill_(3e38))(checkpoints / "c")
    edit_card(prefix=DELETE)(checkpoints / "c")
    with TestClient(create_app(several(checkpoints))) as client:
        both = client.post("/classify", json={"texts": ["ok", "a zebra"], "models": ["a", "c"]}, headers=KEY)
        alone = client.post("/classify", json={"texts": ["a zebra"], "models": ["a"]}, headers=KEY)
    error = error_of(both, 500)
    assert error["message"].startswith("texts.1 (model 'c'): the model gave non-finite logits")
    assert error["details"] == [
        {"field": "texts.1", "message": "model 'c': the model gave non-finite logits (NaN or inf): a fault of the "
         "model, not of the text"}
    ]  # fmt: skip
    assert alone.status_code == 200, alone.text


# --- Settings and startup ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("variables", "refusal"),
    [
        pytest.param({"MODELS": "a=/x,b=/y,a=/z"}, "SPAMGPT_MODELS='a=/x,b=/y,a=/z': model 'a' given", id="twice"),
        pytest.param({"MODELS": "a=/x,/y"}, "each entry must be name=path, got '/y'", id="no-name"),
        pytest.param({"MODELS": "a="}, "each entry must be name=path, got 'a='", id="no-path"),
        pytest.param({"MODELS": "a b=/x"}, "model name 'a b' must be 1 to 64 letters", id="bad-name"),
        pytest.param(
            {"MODELS_DIR": "models", "CHECKPOINT_DIR": "ckpt"},
            "SPAMGPT_CHECKPOINT_DIR name one model and cannot be combined with SPAMGPT_MODELS_DIR",
            id="dir-and-checkpoint",
        ),
        pytest.param(
            {"MODELS": "a=/x", "MODEL_NAME": "spam"},
            "SPAMGPT_MODEL_NAME name one model and cannot be combined with SPAMGPT_MODELS_DIR or SPAMGPT_MODELS",
            id="list-and-model-name",
        ),
    ],
)
def test_settings_that_cannot_name_the_models_are_refused_naming_the_variable(monkeypatch, variables, refusal):
    for name, value in variables.items():
        monkeypatch.setenv(f"SPAMGPT_{name}", value)
    with pytest.raises(SettingsError, match=refusal.replace("(", r"\(").replace(")", r"\)")):
        settings_from_environment()


def test_the_list_and_the_directory_serve_together_in_the_list_order_then_by_folder(checkpoints, tmp_path):
    settings = Settings(models_dir=checkpoints, models=f"z={tmp_path / 'b2'},y={tmp_path / 'b2'}", default_model="a")
    names = [name for name, _ in settings.model_sources()]
    assert names == ["z", "y", "a", "b", "c"]


def test_a_name_in_the_list_and_the_directory_is_refused_at_startup(checkpoints, tmp_path):
    settings = several(checkpoints, models=f"b={tmp_path / 'b2'}")
    with pytest.raises(ValueError, match="two models named 'b'"), TestClient(create_app(settings)):
        pass


def test_several_models_without_a_default_are_refused_at_startup_naming_them(checkpoints):
    app = create_app(several(checkpoints, default_model=None))
    with pytest.raises(
        ValueError, match=r"^SPAMGPT_DEFAULT_MODEL unset: 3 models \['a', 'b', 'c'\]; set it to the one"
    ):
        TestClient(app).__enter__()


def test_a_default_that_is_not_served_is_refused_at_startup(checkpoints):
    app = create_app(several(checkpoints, default_model="spam"))
    with pytest.raises(
        ValueError, match=r"^SPAMGPT_DEFAULT_MODEL='spam': no model of that name; the models are \['a', 'b', 'c'\]$"
    ):
        TestClient(app).__enter__()


def test_an_empty_models_dir_is_refused_at_startup_naming_the_variable(tmp_path):
    with pytest.raises(ValueError, match=r"^no models to serve: set SPAMGPT_MODELS_DIR or SPAMGPT_MODELS$"):
        TestClient(create_app(Settings(models_dir=tmp_path, device="cpu"))).__enter__()


def test_a_broken_checkpoint_beside_good_ones_is_named_and_the_good_ones_serve(checkpoints, caplog):
    (checkpoints / "broken").mkdir()
    (checkpoints / "bad name").mkdir()
    (checkpoints / ".incoming").mkdir()  # hidden: a checkpoint being copied in, not yet a model
    with caplog.at_level(logging.ERROR, "uvicorn.error"), TestClient(create_app(several(checkpoints))) as client:
        assert client.get("/health").json() == {"status": "ok", "detail": None, "model": "a"}
        refused = client.get("/info", headers=KEY).json()["refused"]
        assert sorted(refused) == ["bad name", "broken"]
        assert refused["broken"] == f"CheckpointError: {checkpoints / 'broken' / 'config.json'}: missing"
        assert "must be 1 to 64 letters" in refused["bad name"]
        error = error_of(client.post("/classify", json={"texts": ["hi"], "model": "broken"}, headers=KEY), 404)
        assert "refused at startup: CheckpointError" in error["message"]
    assert any("'broken'" in r.getMessage() and "missing" in r.getMessage() for r in caplog.records)


def test_a_broken_default_fails_startup(checkpoints):
    (checkpoints / "a" / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"config\.json: missing"), TestClient(create_app(several(checkpoints))):
        pass


# --- Serving several -------------------------------------------------------------------------------------------------


def test_classify_answers_from_the_default_or_the_named_model(client):
    assert classify(client)["model"] == "a"
    answer = classify(client, model="b")
    assert answer["model"] == "b"
    assert all(set(r["probabilities"]) == {"x", "y", "z"} for r in answer["results"])


def test_models_answers_each_text_from_each_model_as_each_answers_alone(client):
    """Bit for bit: a and b share one prefix pass, c runs its own; each equals its own request's answer."""
    answer = classify(client, models=["b", "c", "a"])
    assert answer["models"] == ["b", "c", "a"]
    for name in ("a", "b", "c"):
        alone = classify(client, model=name)["results"]
        assert [result[name] for result in answer["results"]] == alone


@pytest.mark.parametrize(
    ("body", "field", "message"),
    [
        pytest.param({"model": "a", "models": ["b"]}, "models", "give model or models, not both", id="both"),
        pytest.param(
            {"models": ["a", "b", "a", "b"]},
            "models",
            "must not name a model twice, named twice: ['a', 'b']",
            id="twice",
        ),
        pytest.param({"models": []}, "models", "at least 1 item", id="empty"),
        pytest.param({"model": 3}, "model", "valid string", id="not-a-string"),
    ],
)
def test_bad_model_choices_are_422_naming_the_field(client, body, field, message):
    error = error_of(client.post("/classify", json={"texts": ["hi"], **body}, headers=KEY), 422)
    assert error["details"][0]["field"] == field
    assert message in error["details"][0]["message"]
    assert "got {" not in error["message"]  # the body is not echoed back


@pytest.mark.parametrize(
    ("path", "body"),
    [
        pytest.param("/classify", {"texts": ["hi"], "model": "nope"}, id="classify-model"),
        pytest.param("/classify", {"texts": ["hi"], "models": ["a", "nope"]}, id="classify-models"),
        pytest.param("/models/nope/predict", {"inputs": "hi"}, id="tei"),
        pytest.param("/models/nope", {"inputs": "hi"}, id="hugging-face"),
    ],
)
def test_an_unknown_model_is_404_listing_the_names(client, path, body):
    error = error_of(client.post(path, json=body, headers=KEY), 404)
    assert error == {
        "type": "unknown_model",
        "message": "no model named 'nope'; the models are ['a', 'b', 'c']",
        "details": [],
    }


def test_several_unknown_models_are_one_404_naming_each_and_why_one_was_refused(checkpoints):
    (checkpoints / "draft").mkdir()
    with TestClient(create_app(several(checkpoints))) as client:
        body = {"texts": ["hi"], "models": ["a", "nope", "draft"]}
        error = error_of(client.post("/classify", json=body, headers=KEY), 404)
    draft = f"CheckpointError: {checkpoints / 'draft' / 'config.json'}: missing"
    assert error["message"] == (
        f"no model named 'nope', 'draft' (its checkpoint was refused at startup: {draft}); "
        "the models are ['a', 'b', 'c']"
    )


def test_the_tei_and_hugging_face_routes_select_a_model_by_path_prefix(client):
    for_b = client.post("/models/b/predict", json={"inputs": TEXTS[0]}, headers=KEY).json()
    assert {s["label"] for s in for_b} == {"x", "y", "z"}
    assert client.post("/models/b", json={"inputs": TEXTS[0]}, headers=KEY).json() == [for_b]
    default = client.post("/predict", json={"inputs": TEXTS[0]}, headers=KEY).json()
    assert default == client.post("/models/a/predict", json={"inputs": TEXTS[0]}, headers=KEY).json()
    assert {s["label"] for s in default} == {"ham", "spam"}


def test_info_keeps_the_default_at_the_top_and_lists_every_model_and_what_it_shares(client):
    info = client.get("/info", headers=KEY).json()
    assert info["model"] == "a" and info["labels"] == ["ham", "spam"] and "limits" in info
    models = {m["model"]: m for m in info["models"]}
    assert {k: v for k, v in info.items() if k not in ("limits", "models", "refused")} == models["a"]
    assert (models["a"]["sharing"], models["b"]["sharing"], models["c"]["sharing"]) == (["b"], ["a"], [])
    assert models["a"]["prefix"] == models["b"]["prefix"] != models["c"]["prefix"]
    assert models["b"]["labels"] == ["x", "y", "z"] and models["b"]["revision"] == 1


def test_one_checkpoint_dir_serves_as_before_with_its_one_model_listed(tiny_checkpoint):
    with TestClient(create_app(tiny_settings(tiny_checkpoint))) as client:
        info = client.get("/info").json()
        answer = client.post("/classify", json={"texts": ["hi"]}).json()
    assert answer["model"] == info["model"] and info["model"].startswith("spamgpt-random-init-tiny-")
    assert [m["model"] for m in info["models"]] == [info["model"]] and info["refused"] == {}


def test_metrics_and_the_request_log_carry_the_model(client, caplog):
    with caplog.at_level(logging.INFO, "spamgpt.access"):
        classify(client, models=["a", "b"])
        client.post("/models/c/predict", json={"inputs": "hi"}, headers=KEY)
    metrics = client.get("/metrics").text
    assert f'spamgpt_model_texts_total{{model="a"}} {len(TEXTS)}.0' in metrics
    assert 'spamgpt_model_texts_total{model="c"} 1.0' in metrics
    assert 'spamgpt_requests_total{route="/models/{name}/predict",status="200"} 1.0' in metrics
    assert [r.model for r in caplog.records if r.name == "spamgpt.access"] == ["a,b", "c"]


# --- The admin API ----------------------------------------------------------------------------------------------------


def test_the_admin_api_is_off_without_an_api_key(checkpoints):
    with TestClient(create_app(several(checkpoints, api_key=None))) as client:
        error = error_of(client.put("/admin/models/d", json={"checkpoint": str(checkpoints / "c")}), 403)
    assert error["message"] == "the admin API needs an API key: set SPAMGPT_API_KEY"


@pytest.mark.parametrize("headers", [{}, {"X-API-Key": "wrong"}, {"Authorization": "Basic c2VjcmV0"}])
def test_an_admin_call_without_the_key_is_401(client, checkpoints, headers):
    error_of(client.put("/admin/models/d", json={"checkpoint": str(checkpoints / "c")}, headers=headers), 401)
    error_of(client.delete("/admin/models/b", headers=headers), 401)
    error_of(client.get("/admin/models", headers=headers), 401)
    assert client.get("/admin/models", headers=KEY).json()["default"] == "a"


def test_add_replace_and_remove_while_serving(client, checkpoints, tmp_path):
    added = client.put("/admin/models/d", json={"checkpoint": str(checkpoints / "c")}, headers=KEY)
    assert added.status_code == 201 and added.json()["replaced"] is None
    assert classify(client, model="d")["results"] == classify(client, model="c")["results"]
    assert added.json()["model"]["sharing"] == ["c"]  # the same checkpoint twice: one prefix

    before = classify(client, model="b")["results"]
    replaced = client.put("/admin/models/b", json={"checkpoint": str(tmp_path / "b2")}, headers=KEY)
    assert replaced.status_code == 200, replaced.text
    assert replaced.json()["replaced"] == {"revision": 1, "checkpoint": str(checkpoints / "b")}
    assert replaced.json()["model"]["revision"] == 2 and replaced.json()["model"]["sharing"] == ["a"]
    assert classify(client, model="b")["results"] != before

    assert client.delete("/admin/models/d", headers=KEY).json() == {"removed": "d", "revision": 1}
    error_of(client.post("/classify", json={"texts": ["hi"], "model": "d"}, headers=KEY), 404)
    listed = client.get("/admin/models", headers=KEY).json()
    assert [(m["model"], m["revision"]) for m in listed["models"]] == [("a", 1), ("b", 2), ("c", 1)]
    assert client.get("/health").json()["status"] == "ok"


@pytest.mark.parametrize(
    ("checkpoint", "reason"),
    [
        pytest.param("missing", "CheckpointError: {path}: checkpoint directory not found", id="not-there"),
        pytest.param("questions.csv", "CheckpointError: {path}: not a directory", id="a-file"),
        pytest.param("bad", "RuntimeError: warm-up forward on cpu (torch.float32) gave non-finite", id="warm-up"),
    ],
)
def test_a_checkpoint_that_fails_its_checks_or_warm_up_is_refused_and_the_old_one_serves(
    client, tmp_path, checkpoint, reason
):
    before = classify(client, model="b")["results"]
    (tmp_path / "questions.csv").write_text("text,label\n")
    path = str(tmp_path / checkpoint)
    error = error_of(client.put("/admin/models/b", json={"checkpoint": path}, headers=KEY), 422)
    assert error["type"] == "checkpoint_refused"
    assert error["message"].startswith(f"{path}: " + reason.format(path=path))
    assert classify(client, model="b")["results"] == before
    assert client.get("/admin/models", headers=KEY).json()["models"][1]["revision"] == 1
    assert 'spamgpt_model_changes_total{change="refused",model="b"} 1.0' in client.get("/metrics").text


@pytest.mark.parametrize(
    ("call", "status", "message"),
    [
        pytest.param(
            ("delete", "/admin/models/a"),
            409,
            "'a' is the default model (SPAMGPT_DEFAULT_MODEL) and cannot",
            id="remove-default",
        ),
        pytest.param(("delete", "/admin/models/nope"), 404, "no model named 'nope'", id="remove-unknown"),
        pytest.param(("put", "/admin/models/a b"), 422, "should match pattern", id="bad-name"),
        pytest.param(("put", "/admin/models/" + "x" * 65), 422, "should match pattern", id="long-name"),
    ],
)
def test_bad_admin_calls_get_a_clear_error(client, checkpoints, call, status, message):
    method, path = call
    body = {"json": {"checkpoint": str(checkpoints / "c")}} if method == "put" else {}
    error = error_of(client.request(method.upper(), path, headers=KEY, **body), status)
    assert message in error["message"]


# --- Swaps while requests wait ---------------------------------------------------------------------------------------


async def never_disconnects() -> dict:
    await asyncio.Event().wait()


def run_service(settings: Settings, test):
    """asyncio.run(test(service)) on a started Service; stops it afterwards."""

    async def main():
        service = Service(settings)
        await service.start()
        try:
            return await test(service)
        finally:
            await service.stop()

    return asyncio.run(main())


async def hold_model_thread(service: Service) -> threading.Event:
    """Occupy the model thread until the returned event is set: batches formed meanwhile wait for it."""
    running, release = threading.Event(), threading.Event()
    service.model_thread.submit(lambda: (running.set(), release.wait(30)))
    assert await asyncio.to_thread(running.wait, 10)
    return release


async def until(condition, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "not within the timeout"
        await asyncio.sleep(0.01)


def labels_of(answer: dict) -> list[dict]:
    return [r["probabilities"] for r in answer["results"]]


def test_a_replacement_lets_waiting_requests_finish_on_the_old_version_and_later_ones_get_the_new(
    checkpoints, tmp_path
):
    async def test(service: Service):
        expected_old = labels_of(await service.classify(TEXTS, never_disconnects, model="b"))
        old = service.models.get("b")
        old_classifier = weakref.ref(old.classifier)
        release = await hold_model_thread(service)
        waiting = [asyncio.create_task(service.classify(TEXTS, never_disconnects, model="b")) for _ in range(3)]
        await until(lambda: old.in_use == 3)
        put = asyncio.create_task(service.models.put("b", tmp_path / "b2"))
        await until(lambda: service.models.get("b") is not old)
        assert service.health().status == "ok" and not put.done()  # the old version is still held
        later = asyncio.create_task(service.classify(TEXTS, never_disconnects, model="b"))
        release.set()
        answers = await asyncio.gather(*waiting, later)
        new, previous = await put
        gc.collect()
        return expected_old, answers, new.revision, previous is old, old_classifier() is None

    expected_old, answers, revision, replaced_old, freed = run_service(several(checkpoints), test)
    assert [labels_of(a) for a in answers[:3]] == [expected_old] * 3
    assert labels_of(answers[3]) != expected_old and revision == 2 and replaced_old
    assert freed, "the old version's classifier is still referenced after the replacement returned"


def test_a_removed_model_finishes_its_waiting_requests_then_is_404_and_its_memory_goes(checkpoints):
    async def test(service: Service):
        expected = labels_of(await service.classify(TEXTS, never_disconnects, model="c"))
        old = service.models.get("c")
        old_classifier = weakref.ref(old.classifier)
        release = await hold_model_thread(service)
        waiting = asyncio.create_task(service.classify(TEXTS, never_disconnects, model="c"))
        await until(lambda: old.in_use == 1)
        removal = asyncio.create_task(service.models.remove("c"))
        await until(lambda: "c" not in service.models.models)
        with pytest.raises(UnknownModel, match=r"no model named 'c'; the models are \['a', 'b'\]"):
            await service.classify(TEXTS, never_disconnects, model="c")
        assert not removal.done() and service.health().status == "ok"
        release.set()
        answer = await waiting
        await removal
        gc.collect()
        return expected, answer, old_classifier() is None

    expected, answer, freed = run_service(several(checkpoints), test)
    assert labels_of(answer) == expected and freed


def test_replacements_of_one_model_run_one_at_a_time_in_the_order_asked(checkpoints, tmp_path, monkeypatch):
    spans: list[tuple[str, float, float]] = []
    load = Classifier.load

    def timed_load(cls, path, options):
        start = time.monotonic()
        time.sleep(0.2)  # a load long enough that overlapping ones would overlap
        try:
            return load(path, options)
        finally:
            spans.append((Path(path).name, start, time.monotonic()))

    async def test(service: Service):
        monkeypatch.setattr(Classifier, "load", classmethod(timed_load))
        first = asyncio.create_task(service.models.put("b", tmp_path / "b2"))
        second = asyncio.create_task(service.models.put("b", tmp_path / "bad"))
        third = asyncio.create_task(service.models.put("b", checkpoints / "c"))
        results = await asyncio.gather(first, second, third, return_exceptions=True)
        return results, service.models.get("b")

    (first, second, third), serving = run_service(several(checkpoints), test)
    assert [name for name, _, _ in spans] == ["b2", "bad", "c"]
    assert all(end <= start for (_, _, end), (_, start, _) in itertools.pairwise(spans))
    assert (first[0].revision, first[1].revision) == (2, 1)
    assert isinstance(second, CheckpointRefused) and "non-finite logits" in second.message
    assert third[1] is first[0] and third[0] is serving and serving.revision == 3
    assert serving.classifier.card.labels == ("ham", "spam")


def test_no_model_changes_while_draining_and_the_list_still_answers(client, checkpoints):
    client.app.state.service.drain()
    added = client.put("/admin/models/extra", json={"checkpoint": str(checkpoints / "c")}, headers=KEY)
    removed = client.delete("/admin/models/c", headers=KEY)
    for answer in (added, removed):
        error = error_of(answer, 503)
        assert (error["type"], error["message"]) == (
            "not_ready",
            "the server is shutting down: no model changes while it drains",
        )
    assert sorted(m["model"] for m in client.get("/admin/models", headers=KEY).json()["models"]) == ["a", "b", "c"]


def test_the_default_model_keeps_its_labels_while_the_feedback_store_reads_them(checkpoints, tmp_path):
    # the feedback store was opened with the default model's labels, as the spamd listener takes its spam label
    async def test(service: Service):
        with pytest.raises(CheckpointRefused) as refused:
            await service.models.put("a", tmp_path / "b2")  # labels x, y, z
        other_name, _ = await service.models.put("c", tmp_path / "b2")  # not the default: free to change
        same_labels, _ = await service.models.put("a", checkpoints / "c")
        return refused.value.message, other_name.classifier.card.labels, same_labels.revision

    settings = several(checkpoints, feedback_enabled=True, feedback_path=tmp_path / "feedback.db")
    message, other_labels, revision = run_service(settings, test)
    assert message.endswith(
        "ValueError: the labels of 'a', the default model, are ['ham', 'spam'] and are used by the feedback store: "
        "a replacement keeps them (restart the server to change them); this checkpoint's are ['x', 'y', 'z']"
    )
    assert other_labels == ("x", "y", "z") and revision == 2

    async def unread(service: Service):  # nothing reads the default model's labels: they may change
        new, _ = await service.models.put("a", tmp_path / "b2")
        return new.classifier.card.labels

    assert run_service(several(checkpoints), unread) == ("x", "y", "z")


def test_a_change_while_serving_loads_on_a_thread_that_ends_with_it(checkpoints, tmp_path):
    # a thread that had run torch and lived on would keep a second OpenMP pool beside the model thread's, and slow
    # every later batch (app.models.loading_thread)
    loaders = []
    load = Classifier.load

    def recorded_load(cls, path, options):
        loaders.append(threading.current_thread())
        return load(path, options)

    async def test(service: Service):
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(Classifier, "load", classmethod(recorded_load))
            first, _ = await service.models.put("b", tmp_path / "b2")
            await service.models.put("extra", checkpoints / "c")
        answer = await service.classify(TEXTS, never_disconnects, model="b")
        return first.revision, answer

    revision, answer = run_service(several(checkpoints), test)
    assert revision == 2 and len(answer["results"]) == len(TEXTS)
    assert len(loaders) == 2 and loaders[0] is not loaders[1]
    assert all(thread is not threading.main_thread() for thread in loaders)
    for thread in loaders:
        thread.join(timeout=10)
    assert not any(thread.is_alive() for thread in loaders), "a loading thread outlived its change"


def test_batches_take_the_heads_group_from_several_requests_and_leave_the_others_in_place():
    batches = []

    def run(rows, needs):
        batches.append(list(zip(needs, [row[0] for row in rows], strict=True)))
        return [0] * len(rows)

    async def main():
        limits = BatchLimits(True, 64, 10_000, 50.0, 100, 10.0)
        batcher = Batcher(run, Metrics(), limits, executor=None, group=lambda need: need[0])
        batcher.start()
        requests = [([[1], [2]], ["p1", "p1"]), ([[3]], ["q1"]), ([[4]], ["p2"]), ([[5], [6]], ["q2", "q2"])]
        await asyncio.gather(*(batcher.submit(rows, needs) for rows, needs in requests))
        await batcher.stop()

    asyncio.run(main())
    assert batches == [[("p1", 1), ("p1", 2), ("p2", 4)], [("q1", 3), ("q2", 5), ("q2", 6)]]


# --- A live server ---------------------------------------------------------------------------------------------------


def test_a_live_server_names_a_broken_checkpoint_at_startup_and_serves_the_rest(checkpoints, tmp_path):
    (checkpoints / "broken").mkdir()
    log = tmp_path / "server.log"
    with (
        live_server(None, log, 180, models_dir=checkpoints, default_model="a") as (url, _),
        httpx.Client(trust_env=False) as http,
    ):
        answer = http.post(f"{url}/models/b/predict", json={"inputs": "hi"})
    assert answer.status_code == 200 and {s["label"] for s in answer.json()} == {"x", "y", "z"}
    assert f"model 'broken' ({checkpoints / 'broken'}) refused: CheckpointError" in log.read_text()
