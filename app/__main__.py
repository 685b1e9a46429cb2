"""`python -m app [uvicorn options]`: uvicorn serving create_app, exiting 0 after a drained SIGTERM shutdown.

uvicorn re-raises the SIGTERM it handled once it has shut down cleanly, so the process would report "killed by
SIGTERM" (143) even when every in-flight request finished. A handler installed before uvicorn's absorbs that
re-raised signal: a clean shutdown exits 0, a failed start still exits 3 (uvicorn's startup failure).
"""

import signal
import sys

import uvicorn


def main() -> None:
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    uvicorn.main(["app.main:create_app", "--factory", *sys.argv[1:]])


if __name__ == "__main__":
    main()
