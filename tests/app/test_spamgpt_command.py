"""`spamgpt`: the console script pyproject declares; serve is `python -m app`, the other commands are
`python -m training`'s from the same parser."""

import tomllib
from pathlib import Path

import pytest
import torch

import app.cli
import training.cli
from app.settings import Settings
from training.config import FinetuneConfig, from_flat

ROOT = Path(__file__).resolve().parents[2]


def config(parser, argv: list[str]) -> FinetuneConfig:
    namespace = vars(parser.parse_args(argv))
    assert namespace.pop("command") == "finetune"
    del namespace["subparser"]
    return from_flat(FinetuneConfig, namespace)


def test_pyproject_declares_the_spamgpt_command():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"spamgpt": "app.cli:main"}


def test_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as exited:
        app.cli.main(["--help"])
    assert exited.value.code == 0
    listed = capsys.readouterr().out.split("\n")[0]
    for name in ("train", "evaluate", "predict", "export", "serve"):
        assert name in listed, listed


@pytest.mark.parametrize(
    ("parser", "name"),
    [
        pytest.param(app.cli.build_parser(), "train", id="spamgpt-train"),
        pytest.param(training.cli.build_parser(), "train", id="python-m-training-train"),
        pytest.param(app.cli.build_parser(), "finetune", id="spamgpt-finetune"),
    ],
)
def test_train_is_finetune(parser, name):
    options = ["--data", "my.csv", "--epochs", "2", "--trainable", "all", "--out", "checkpoints/mine"]
    assert config(parser, [name, *options]) == config(training.cli.build_parser(), ["finetune", *options])


def test_serve_hands_its_options_to_uvicorn_after_the_defaults(monkeypatch):
    calls = []

    def uvicorn_main(args, prog_name):
        calls.append((args, prog_name))
        raise SystemExit(0)

    monkeypatch.setattr(app.cli.uvicorn, "main", uvicorn_main)
    monkeypatch.setattr(app.cli.signal, "signal", lambda signum, handler: None)  # this process keeps its SIGTERM
    monkeypatch.setattr(app.cli, "startup_checks", lambda argv: Settings())  # no checkpoint here, port 9000 unbound
    with pytest.raises(SystemExit):
        app.cli.main(["serve", "--port", "9000", "--timeout-graceful-shutdown", "5"])
    ((args, prog),) = calls
    assert prog == "spamgpt serve" and args[:2] == ["app.main:create_app", "--factory"]
    defaults = args[2:-4]
    assert defaults[defaults.index("--timeout-graceful-shutdown") + 1] == str(app.cli.GRACEFUL_SHUTDOWN_S)
    assert "--limit-concurrency" in defaults and "--http" in defaults
    assert args[-4:] == ["--port", "9000", "--timeout-graceful-shutdown", "5"]  # click keeps the last value


def test_serve_refuses_a_bad_variable_in_one_line_before_uvicorn(monkeypatch, capsys):
    monkeypatch.setattr(app.cli.uvicorn, "main", lambda args, prog_name: pytest.fail("uvicorn ran"))
    monkeypatch.setattr(app.cli.signal, "signal", lambda signum, handler: None)
    monkeypatch.setenv("SPAMGPT_PRIOR", "1.5")
    with pytest.raises(SystemExit) as exited:
        app.cli.main(["serve"])
    assert exited.value.code == app.cli.EXIT_USAGE == 2
    expected = "SPAMGPT_PRIOR='1.5': should be less than 1 (use a number > 0 and < 1, or leave it unset)"
    assert capsys.readouterr().err == f"spamgpt serve: error: {expected}\n"


def test_serve_refuses_a_device_this_machine_lacks_in_one_line_before_uvicorn(monkeypatch, capsys):
    monkeypatch.setattr(app.cli.uvicorn, "main", lambda args, prog_name: pytest.fail("uvicorn ran"))
    monkeypatch.setattr(app.cli.signal, "signal", lambda signum, handler: None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("SPAMGPT_DEVICE", "cuda")
    with pytest.raises(SystemExit) as exited:
        app.cli.main(["serve"])
    assert exited.value.code == app.cli.EXIT_USAGE
    expected = "SPAMGPT_DEVICE='cuda': device 'cuda' requested but CUDA is not available"
    assert capsys.readouterr().err == f"spamgpt serve: error: {expected}\n"


def test_serve_help_needs_no_checkpoint(monkeypatch, tmp_path):
    calls = []

    def uvicorn_main(args, prog_name):
        calls.append(args)
        raise SystemExit(0)

    monkeypatch.setattr(app.cli.uvicorn, "main", uvicorn_main)
    monkeypatch.setattr(app.cli.signal, "signal", lambda signum, handler: None)
    monkeypatch.setenv("SPAMGPT_CHECKPOINT_DIR", str(tmp_path / "nothing"))
    with pytest.raises(SystemExit):
        app.cli.main(["serve", "--help"])
    assert calls == [["app.main:create_app", "--factory", "--help"]]


@pytest.mark.parametrize(
    ("variables", "status", "expected"),
    [
        ({"SPAMGPT_MODELS_DIR": "{dir}"}, 3, "SPAMGPT_MODELS_DIR='{dir}' holds no checkpoint subdirectories; "),
        (
            {"SPAMGPT_MODELS_DIR": "{dir}", "SPAMGPT_DEFAULT_MODEL": "spam"},
            3,
            "SPAMGPT_MODELS_DIR='{dir}' holds no checkpoint subdirectories; ",
        ),
        (
            {"SPAMGPT_MODELS_DIR": "{dir}", "SPAMGPT_MODELS": "a={dir}/x", "SPAMGPT_DEFAULT_MODEL": "a", "mkdir": "a"},
            2,
            "SPAMGPT_MODELS='a={dir}/x' and SPAMGPT_MODELS_DIR='{dir}': two models named 'a' ('{dir}/x' and "
            "'{dir}/a'); rename one",
        ),
        (
            {"SPAMGPT_MODELS": "a=x,b=y"},
            2,
            "SPAMGPT_DEFAULT_MODEL unset: 2 models ['a', 'b']; set it to the one requests naming none get",
        ),
        (
            {"SPAMGPT_MODELS": "a=x,b=y", "SPAMGPT_DEFAULT_MODEL": "spam"},
            2,
            "SPAMGPT_DEFAULT_MODEL='spam': no model of that name; the models are ['a', 'b']",
        ),
        ({"SPAMGPT_MODELS": "a=x,a=y"}, 2, "SPAMGPT_MODELS='a=x,a=y': model 'a' given twice"),
    ],
)
def test_serve_refuses_a_model_set_that_cannot_serve_in_one_line(
    monkeypatch, capsys, tmp_path, variables, status, expected
):
    monkeypatch.setattr(app.cli.uvicorn, "main", lambda args, prog_name: pytest.fail("uvicorn ran"))
    monkeypatch.setattr(app.cli.signal, "signal", lambda signum, handler: None)
    if "mkdir" in variables:
        (tmp_path / variables.pop("mkdir")).mkdir()
    for name, value in variables.items():
        monkeypatch.setenv(name, value.format(dir=tmp_path))
    with pytest.raises(SystemExit) as exited:
        app.cli.main(["serve"])
    err = capsys.readouterr().err
    assert exited.value.code == status
    assert err.startswith(f"spamgpt serve: error: {expected.format(dir=tmp_path)}") and err.count("\n") == 1
