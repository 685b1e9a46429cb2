"""The app under a real `uvicorn --factory`: settings from the environment, refusal to start on a bad checkpoint."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]


def uvicorn(checkpoint_dir: Path, port: int = 0) -> subprocess.Popen:
    env = {**os.environ, "SPAMGPT_CHECKPOINT_DIR": str(checkpoint_dir), "SPAMGPT_DEVICE": "cpu"}
    command = [sys.executable, "-m", "uvicorn", "app.main:create_app", "--factory", "--port", str(port)]
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_broken_checkpoint_stops_the_server_with_the_loaders_message(tiny_checkpoint):
    (tiny_checkpoint / "model.safetensors").unlink()
    server = uvicorn(tiny_checkpoint)
    _, stderr = server.communicate(timeout=60)
    assert server.returncode != 0
    assert "CheckpointError" in stderr
    assert f"{tiny_checkpoint / 'model.safetensors'}: missing" in stderr


def test_the_server_starts_from_the_environment_and_serves(tiny_checkpoint):
    port = free_port()
    server = uvicorn(tiny_checkpoint, port)
    client = httpx.Client(trust_env=False)  # straight to localhost, whatever proxy the environment names
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if client.get(f"{url}/health").status_code == 200:
                    break
            except httpx.TransportError:
                assert server.poll() is None, server.communicate()[1]
                time.sleep(0.1)
        response = client.post(f"{url}/classify", json={"texts": ["free prize", "see you"]})
        assert response.status_code == 200, response.text
        assert [r["label"] in ("ham", "spam") for r in response.json()["results"]] == [True, True]
    finally:
        client.close()
        server.send_signal(signal.SIGINT)
        _, stderr = server.communicate(timeout=30)
    assert server.returncode == 0, stderr
    assert "Application startup complete" in stderr
