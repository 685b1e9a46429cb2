"""`spamgpt`: one command for the whole project. `serve` is `python -m app`; train (an alias of finetune), evaluate,
predict and export are `python -m training`'s commands, from the same parser (training.cli.build_parser).

`serve [uvicorn options]` runs uvicorn serving create_app and exits 0 after a drained SIGTERM shutdown. uvicorn
re-raises the SIGTERM it handled once it has shut down cleanly, so the process would report "killed by SIGTERM"
(143) even when every in-flight request finished. A handler installed before uvicorn's absorbs that re-raised
signal: a clean shutdown exits 0, a failed start still exits 3 (uvicorn's startup failure).

Stalled and slow clients are bounded by default: uvicorn's --limit-concurrency is SPAMGPT_MAX_CONNECTIONS, and --http
is app.edge.protocol's, whose requests must arrive whole within SPAMGPT_REQUEST_ARRIVAL_TIMEOUT_S. In-flight requests
get GRACEFUL_SHUTDOWN_S to finish once the server stops accepting. Any of these given on the command line wins.
"""

import argparse
import signal
import sys
from typing import NoReturn

import uvicorn

from app.settings import Settings

# Seconds in-flight requests get to finish after the listening socket closes; then they are cancelled. Every
# orchestrator's grace period is sized from it: compose's stop_grace_period, Kubernetes'
# terminationGracePeriodSeconds (both checked by .ci/checks.py), beside SPAMGPT_DRAIN_DELAY_S before it.
GRACEFUL_SHUTDOWN_S = 20
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


def serve(argv: list[str], prog: str) -> NoReturn:
    """uvicorn serving create_app with `argv` as its options, its usage line naming `prog`; exits the process."""
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    uvicorn.main(["app.main:create_app", "--factory", *uvicorn_defaults(Settings()), *argv], prog_name=prog)


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
