"""`spamgpt`: the console script pyproject declares; serve is `python -m app`, the other commands are
`python -m training`'s from the same parser."""

import tomllib
from pathlib import Path

import pytest

import app.cli
import training.cli
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
    with pytest.raises(SystemExit):
        app.cli.main(["serve", "--port", "9000", "--timeout-graceful-shutdown", "5"])
    ((args, prog),) = calls
    assert prog == "spamgpt serve" and args[:2] == ["app.main:create_app", "--factory"]
    defaults = args[2:-4]
    assert defaults[defaults.index("--timeout-graceful-shutdown") + 1] == str(app.cli.GRACEFUL_SHUTDOWN_S)
    assert "--limit-concurrency" in defaults and "--http" in defaults
    assert args[-4:] == ["--port", "9000", "--timeout-graceful-shutdown", "5"]  # click keeps the last value
