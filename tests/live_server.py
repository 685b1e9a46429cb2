"""The app under a real uvicorn, started with `python -m app` as the Dockerfile does, on a free loopback port.

Shared by the benchmarks and the tests that need a live server (tests.helpers re-exports these)."""

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def live_server(
    checkpoint_dir: Path | None, log: Path, ready_timeout_s: float = 60, **settings
) -> Iterator[tuple[str, subprocess.Popen]]:
    """`python -m app` (uvicorn) on a free loopback port serving `checkpoint_dir` (None: the models that `settings`
    name, e.g. models_dir) with `settings` as SPAMGPT_* variables; yields its URL, once /health answers 200 (within
    ready_timeout_s, or the test fails), and the process; stops it with SIGINT. Output goes to `log`, not a pipe:
    thousands of requests would fill a pipe nobody reads and block the server."""
    env = {**os.environ, **{f"SPAMGPT_{k.upper()}": str(v) for k, v in {"device": "cpu", **settings}.items()}}
    if checkpoint_dir is not None:
        env["SPAMGPT_CHECKPOINT_DIR"] = str(checkpoint_dir)
    port = free_port()
    command = [sys.executable, "-m", "app", "--port", str(port)]
    with open(log, "w") as out:
        server = subprocess.Popen([*command, "--no-access-log"], cwd=ROOT, env=env, stdout=out, stderr=out)
    url = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(trust_env=False) as client:  # straight to loopback, whatever proxy the environment names
            deadline = time.monotonic() + ready_timeout_s
            while not _healthy(client, url):
                assert server.poll() is None, f"the server exited with {server.returncode}:\n{log.read_text()}"
                assert time.monotonic() < deadline, f"not healthy after {ready_timeout_s} s:\n{log.read_text()}"
                time.sleep(0.1)
        yield url, server
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def _healthy(client: httpx.Client, url: str) -> bool:
    try:
        return client.get(f"{url}/health").status_code == 200
    except httpx.TransportError:
        return False
