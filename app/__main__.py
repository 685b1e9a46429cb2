"""`python -m app [uvicorn options]`: uvicorn serving create_app, exiting 0 after a drained SIGTERM shutdown.

uvicorn re-raises the SIGTERM it handled once it has shut down cleanly, so the process would report "killed by
SIGTERM" (143) even when every in-flight request finished. A handler installed before uvicorn's absorbs that
re-raised signal: a clean shutdown exits 0, a failed start still exits 3 (uvicorn's startup failure).

Stalled and slow clients are bounded by default (issue 10 item 2): uvicorn's --limit-concurrency is
SPAMGPT_MAX_CONNECTIONS, and --http is app.edge.protocol's, whose requests must arrive whole within
SPAMGPT_REQUEST_ARRIVAL_TIMEOUT_S. Either option given on the command line wins.
"""

import signal
import sys

import uvicorn

from app.settings import Settings


def uvicorn_defaults(settings: Settings) -> list[str]:
    """The uvicorn options `python -m app` passes before the command line's own (click keeps the last value)."""
    return ["--limit-concurrency", str(settings.max_connections), "--http", "app.edge.protocol:ArrivalDeadlineProtocol"]


def main() -> None:
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    uvicorn.main(["app.main:create_app", "--factory", *uvicorn_defaults(Settings()), *sys.argv[1:]])


if __name__ == "__main__":
    main()
