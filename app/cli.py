"""`spamgpt`: one command for the whole project. `serve` is `python -m app`; train (an alias of finetune), evaluate,
predict and export are `python -m training`'s commands, from the same parser (training.cli.build_parser).

`serve [uvicorn options]` runs uvicorn serving create_app and exits 0 after a drained SIGTERM shutdown. uvicorn
re-raises the SIGTERM it handled once it has shut down cleanly, so the process would report "killed by SIGTERM"
(143) even when every in-flight request finished. A handler installed before uvicorn's absorbs that re-raised
signal: a clean shutdown exits 0.

Before uvicorn imports the app, `serve` checks what would otherwise fail only after the model has loaded, or fail
with a traceback, and refuses it in one line on stderr that names the variable or option, its value and what would
work, with its own exit status:
  2  a SPAMGPT_* variable cannot be used (EXIT_USAGE; uvicorn's own usage errors, such as --port abc, exit 2 too),
     among them a model named twice, a SPAMGPT_DEFAULT_MODEL that names no model or is unset with several, and a
     SPAMGPT_DEVICE this machine does not have (the settings themselves do not depend on the machine, so that CI can
     check a manifest meant for a GPU node)
  3  no directory at SPAMGPT_CHECKPOINT_DIR or SPAMGPT_MODELS_DIR, or no checkpoint folder in SPAMGPT_MODELS_DIR
     (EXIT_CHECKPOINT); a checkpoint refused while loading exits 3 as well (uvicorn's startup failure), its log
     naming the file and what is wrong
  4  the --host and --port cannot be listened on: in use, not this machine's address, or privileged (EXIT_ADDRESS)

Stalled and slow clients are bounded by default: uvicorn's --limit-concurrency is SPAMGPT_MAX_CONNECTIONS, and --http
is app.edge.protocol's, whose requests must arrive whole within SPAMGPT_REQUEST_ARRIVAL_TIMEOUT_S. In-flight requests
get GRACEFUL_SHUTDOWN_S to finish once the server stops accepting. Any of these given on the command line wins.
"""

import argparse
import errno
import signal
import socket
import sys
from pathlib import Path
from typing import NoReturn

import uvicorn

from app.settings import Settings, SettingsError, settings_from_environment, variable
from training.runtime.device import DeviceUnavailable, require_available

# Seconds in-flight requests get to finish after the listening socket closes; then they are cancelled. Every
# orchestrator's grace period is sized from it: compose's stop_grace_period, Kubernetes'
# terminationGracePeriodSeconds (both checked by .ci/checks.py), beside SPAMGPT_DRAIN_DELAY_S before it.
GRACEFUL_SHUTDOWN_S = 20
EXIT_USAGE = 2
EXIT_CHECKPOINT = 3
EXIT_ADDRESS = 4
HELP_OPTIONS = frozenset({"--help", "--version"})  # uvicorn answers these without serving: nothing to check
SERVE_HELP = "Serve a checkpoint over HTTP, as python -m app does; the options are uvicorn's (spamgpt serve --help)."


def uvicorn_defaults(settings: Settings) -> list[str]:
    """The uvicorn options `serve` passes before the command line's own (click keeps the last value)."""
    return [
        "--limit-concurrency",
        str(settings.max_connections),
        "--http",
        "app.edge.protocol:ArrivalDeadlineProtocol",
        "--timeout-graceful-shutdown",
        str(GRACEFUL_SHUTDOWN_S),
    ]


class StartupError(Exception):
    """What keeps `serve` from starting, in one line (or one line per refused variable), and its exit status."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


def startup_checks(argv: list[str]) -> Settings:
    """The settings, once they, the device, the checkpoint directory and the address `argv` (uvicorn's options) asks
    for have been checked: in milliseconds, before uvicorn loads the model.

    Raises StartupError with EXIT_USAGE, EXIT_CHECKPOINT or EXIT_ADDRESS.
    """
    try:
        settings = settings_from_environment()
    except SettingsError as exc:
        raise StartupError(str(exc), EXIT_USAGE) from None
    try:
        require_available(settings.classifier_options().torch_device)
    except DeviceUnavailable as exc:
        raise StartupError(f"{variable('device')}={settings.device!r}: {exc}", EXIT_USAGE) from None
    if settings.models_dir is not None or settings.models is not None:
        check_model_set(settings)
    else:
        check_checkpoint_dir(settings.checkpoint_dir, given="checkpoint_dir" in settings.model_fields_set)
    check_address(argv)
    return settings


def check_checkpoint_dir(path: Path, given: bool) -> None:
    """Raises StartupError (EXIT_CHECKPOINT) when `path` is not a directory, saying how to make or name one; what
    is in the directory is Classifier.load's to check. `given`: whether the environment set the path."""
    if path.is_dir():
        return
    value = f"{variable('checkpoint_dir')}={str(path)!r}" + ("" if given else " (unset: the default)")
    where = "" if path.is_absolute() else f" under {Path.cwd()}"
    message = (
        f"{value}: no checkpoint directory{where}; train one first (spamgpt train --out {path}) "
        f"or set {variable('checkpoint_dir')} to a checkpoint directory"
    )
    raise StartupError(message, EXIT_CHECKPOINT)


def check_models_dir(path: Path) -> None:
    """Raises StartupError (EXIT_CHECKPOINT) when `path` is not a directory; what its folders hold is the loading's
    to check (app.models.ModelRegistry.start)."""
    if not path.is_dir():
        where = "" if path.is_absolute() else f" under {Path.cwd()}"
        message = f"{variable('models_dir')}={str(path)!r}: no such directory{where}; make it and put checkpoints in it"
        raise StartupError(message, EXIT_CHECKPOINT)


def check_model_set(settings: Settings) -> None:
    """Raises StartupError for a model set that cannot serve, found before any checkpoint loads: EXIT_CHECKPOINT
    for no directory at models_dir or, without models, no checkpoint folder in it; EXIT_USAGE for a name given twice
    or a default_model that names no model or is unset with several (Settings.model_sources)."""
    if settings.models_dir is not None:
        check_models_dir(settings.models_dir)
    try:
        sources = settings.model_sources()
    except ValueError as exc:
        raise StartupError(str(exc), EXIT_USAGE) from None
    if not sources:
        message = (
            f"{variable('models_dir')}={str(settings.models_dir)!r} holds no checkpoint subdirectories; "
            f"put each model's checkpoint in a folder of its own there, or list them in {variable('models')}"
        )
        raise StartupError(message, EXIT_CHECKPOINT)


def check_address(argv: list[str]) -> None:
    """Binds, then releases, the --host and --port that uvicorn would take from `argv` (or UVICORN_HOST and
    UVICORN_PORT), as uvicorn binds them (SO_REUSEADDR, IPv6 for a host with a colon). Nothing to check with --uds
    or --fd, port 0 (any free one) or options uvicorn will refuse itself.

    Raises StartupError (EXIT_ADDRESS) naming the host, port and what would work.
    """
    params = uvicorn.main.make_context("uvicorn", ["app.main:create_app", *argv], resilient_parsing=True).params
    host, port = params.get("host"), params.get("port")
    if params.get("uds") or params.get("fd") is not None or not host or not port:
        return
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                problem, fix = "address already in use", "stop what listens there, or pass a free --port"
            else:
                problem = f"cannot listen there ({exc.strerror or exc})"
                fix = "pass one of this machine's addresses as --host (127.0.0.1, 0.0.0.0) and a --port above 1023"
            raise StartupError(f"--host {host} --port {port}: {problem}; {fix}", EXIT_ADDRESS) from None


def serve(argv: list[str], prog: str) -> NoReturn:
    """uvicorn serving create_app with `argv` as its options, its usage line naming `prog`, after startup_checks
    (a failed one: its line on stderr after `prog: error:`, and its exit status); exits the process."""
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    defaults = []
    if not HELP_OPTIONS & set(argv):
        try:
            defaults = uvicorn_defaults(startup_checks(argv))
        except StartupError as exc:
            print("\n".join(f"{prog}: error: {line}" for line in str(exc).splitlines()), file=sys.stderr)
            sys.exit(exc.status)
    uvicorn.main(["app.main:create_app", "--factory", *defaults, *argv], prog_name=prog)


def build_parser() -> argparse.ArgumentParser:
    """`python -m training`'s parser under the name spamgpt, with `serve` listed beside its commands."""
    from training.cli import build_parser  # the training stack, which serve does not need to import

    description = "Fine-tune GPT-2 into a text classifier and serve it."
    return build_parser(prog="spamgpt", description=description, listed={"serve": SERVE_HELP})


def main(argv: list[str] | None = None) -> int:
    """`spamgpt COMMAND [options]`: serve hands its options to uvicorn; the others are training.cli.main's, with
    its exit status."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["serve"]:
        serve(argv[1:], prog="spamgpt serve")
    from training.cli import main as training_main

    return training_main(argv, build_parser())
