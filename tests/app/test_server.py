"""The app under a real uvicorn (`python -m app`), as the Dockerfile runs it: settings from the environment, refusal to
start on a broken checkpoint, and a graceful stop on SIGTERM."""

import hashlib
import os
import pickle
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch

from tests.helpers import (
    DELETE,
    PickleBomb,
    edit_card,
    edit_tensors,
    flip_header_byte,
    free_port,
    plant_pickle,
    truncate,
)

ROOT = Path(__file__).resolve().parents[2]
GRACE_S = 5  # --timeout-graceful-shutdown, shorter than the server's default (app.cli.GRACEFUL_SHUTDOWN_S, 20)
# After uvicorn's "Finished server process", the interpreter's own teardown: up to ~8 s seen on 2 cores shared by
# several test runs (load average 8); an orchestrator's grace period needs this margin too.
EXIT_SLACK_S = 10


def uvicorn(checkpoint_dir: Path, port: int = 0, *options: str, **settings: str) -> subprocess.Popen:
    env = {**os.environ, "SPAMGPT_CHECKPOINT_DIR": str(checkpoint_dir), "SPAMGPT_DEVICE": "cpu"}
    env.update({f"SPAMGPT_{name.upper()}": value for name, value in settings.items()})
    command = [sys.executable, "-m", "app", "--host", "127.0.0.1"]
    command += ["--port", str(port), *options]
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def client() -> httpx.Client:
    return httpx.Client(trust_env=False, timeout=30)  # straight to loopback, whatever proxy the environment names


def wait_ready(server: subprocess.Popen, url: str) -> None:
    deadline = time.monotonic() + 60
    with client() as http:
        while time.monotonic() < deadline:
            try:
                if http.get(f"{url}/health").status_code == 200:
                    return
            except httpx.TransportError:
                assert server.poll() is None, server.communicate()[1]
                time.sleep(0.1)
    raise AssertionError("the server was not ready within 60 s")


def stop(server: subprocess.Popen) -> str:
    """SIGINT, then the server's stderr. A server that does not stop is killed, and the test fails."""
    server.send_signal(signal.SIGINT)
    try:
        return server.communicate(timeout=30)[1]
    finally:
        if server.poll() is None:
            server.kill()
            server.communicate()


def test_the_server_starts_from_the_environment_and_serves(tiny_checkpoint):
    port = free_port()
    server = uvicorn(tiny_checkpoint, port)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(server, url)
        with client() as http:
            response = http.post(f"{url}/classify", json={"texts": ["free prize", "see you"]})
        assert response.status_code == 200, response.text
        assert [r["label"] in ("ham", "spam") for r in response.json()["results"]] == [True, True]
    finally:
        stderr = stop(server)
    assert server.returncode == 0, stderr
    assert "Application startup complete" in stderr


# --- Start-up refusals: one line on stderr, a status of its own, before the model loads ---------------------------


def refusal(port: int, **settings: str) -> tuple[int, str]:
    """`python -m app` on `port` with `settings` as SPAMGPT_* variables (on top of the environment's), run to its
    exit: the exit status and the one line it wrote to stderr, checked to be a refusal and no traceback."""
    env = {**os.environ, "SPAMGPT_DEVICE": "cpu"}
    env.update({f"SPAMGPT_{name.upper()}": value for name, value in settings.items()})
    command = [sys.executable, "-m", "app", "--host", "127.0.0.1", "--port", str(port)]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert "Traceback" not in done.stderr and "Waiting for application startup" not in done.stderr, done.stderr
    (line,) = done.stderr.splitlines()
    assert line.startswith("python -m app: error: "), line
    return done.returncode, line


@pytest.mark.parametrize(
    ("name", "value"),
    [
        pytest.param("prior", "1.5", id="prior-above-1"),
        pytest.param("prior", "0", id="prior-0"),
        pytest.param("prior", "-0.1", id="prior-negative"),
        pytest.param("max_batch_size", "abc", id="batch-size-not-a-number"),
        pytest.param("max_batch_size", "0", id="batch-size-0"),
        pytest.param("checkpoint_dir", "", id="empty-checkpoint-dir"),
    ],
)
def test_a_bad_variable_exits_2_naming_it_and_its_value(tiny_checkpoint, name, value):
    settings = {"checkpoint_dir": str(tiny_checkpoint), name: value}
    code, line = refusal(free_port(), **settings)
    assert code == 2, line
    assert f"SPAMGPT_{name.upper()}={value!r}: " in line


def test_a_missing_checkpoint_exits_3_saying_to_train_one_or_set_the_variable(tmp_path):
    code, line = refusal(free_port(), checkpoint_dir=str(tmp_path / "nothing"))
    assert code == 3, line
    assert f"SPAMGPT_CHECKPOINT_DIR={str(tmp_path / 'nothing')!r}: no checkpoint directory" in line
    assert f"spamgpt train --out {tmp_path / 'nothing'}" in line


def test_a_port_in_use_exits_4_before_the_model_loads(tiny_checkpoint):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, line = refusal(port, checkpoint_dir=str(tiny_checkpoint))
    assert code == 4, line
    assert f"--host 127.0.0.1 --port {port}: address already in use" in line


# --- Broken checkpoints: the server refuses to start ----------------------------------------------------------


def plant_pickle_beside_missing_weights(ckpt: Path) -> None:
    # A loader that fell back to PyTorch's pickle format would run this; ours only ever reads model.safetensors
    (ckpt / "model.safetensors").unlink()
    (ckpt / "pytorch_model.bin").write_bytes(pickle.dumps({"score.weight": PickleBomb(ckpt.parent / "pickle-ran")}))


WEIGHTS, CONFIG, ENCODER = "model.safetensors", "config.json", "tokenizer/encoder.json"
EMPTY_OBJECT_SHA256 = hashlib.sha256(b"{}").hexdigest()


@pytest.mark.parametrize(
    ("breakage", "file", "message"),
    [
        pytest.param(truncate, WEIGHTS, "not a readable safetensors file", id="truncated"),
        pytest.param(flip_header_byte, WEIGHTS, "not a readable safetensors file", id="header-byte"),
        pytest.param(
            edit_tensors(lambda s: s.update({"score.weight": torch.zeros(3, 32)})),
            WEIGHTS,
            "tensor 'score.weight' has shape (3, 32), config needs (2, 32)",
            id="wrong-shape",
        ),
        pytest.param(
            edit_tensors(lambda s: s["transformer.h.0.attn.c_attn.weight"].__setitem__((0, 0), float("nan"))),
            WEIGHTS,
            "tensor 'transformer.h.0.attn.c_attn.weight' has non-finite values (NaN or inf)",
            id="nan",
        ),
        pytest.param(
            lambda c: (c / ENCODER).write_text("{}"),
            ENCODER,
            f"sha256 {EMPTY_OBJECT_SHA256} does not match expected",
            id="tokenizer-hash",
        ),
        pytest.param(edit_card(labels=DELETE), CONFIG, "missing field 'labels'", id="missing-config-field"),
        pytest.param(plant_pickle, WEIGHTS, "not a readable safetensors file", id="pickle-as-safetensors"),
        pytest.param(plant_pickle_beside_missing_weights, WEIGHTS, "missing", id="pickle-as-pytorch-model-bin"),
    ],
)
def test_a_broken_checkpoint_stops_the_server_before_it_answers(tiny_checkpoint, breakage, file, message):
    breakage(tiny_checkpoint)
    port = free_port()
    server = uvicorn(tiny_checkpoint, port)
    deadline = time.monotonic() + 60
    with client() as http:
        while server.poll() is None:  # until it exits, nothing answers on its port
            with pytest.raises(httpx.ConnectError):
                http.post(f"http://127.0.0.1:{port}/classify", json={"texts": ["hi"]})
            assert time.monotonic() < deadline, "the server neither served nor exited within 60 s"
            time.sleep(0.05)
    stderr = server.communicate()[1]
    assert server.returncode == 3, stderr  # uvicorn's STARTUP_FAILURE
    assert f"training.runtime.checkpoint.CheckpointError: {tiny_checkpoint / file}: {message}" in stderr
    assert "Application startup failed. Exiting." in stderr
    assert not (tiny_checkpoint.parent / "pickle-ran").exists()


# --- SIGTERM under load ---------------------------------------------------------------------------------------


def classify(url: str, text: str) -> httpx.Response:
    with client() as http:
        return http.post(f"{url}/classify", json={"texts": [text]})


def answered(url: str, text: str) -> tuple[httpx.Response, float]:
    """classify's response, and when it came (time.monotonic())."""
    response = classify(url, text)
    return response, time.monotonic()


def queue_depth(url: str) -> float:
    with client() as http:
        metrics = http.get(f"{url}/metrics").text
    return float(next(line.split()[1] for line in metrics.splitlines() if line.startswith("spamgpt_queue_depth ")))


def probe_until_refused(url: str, sent: float, limit_s: float) -> list[tuple[float, str, int | str]]:
    """Health and classify probes on fresh connections from the moment SIGTERM was sent, until the server
    stops accepting: (seconds since SIGTERM at the answer, route, status), then (seconds, "connect", "refused").
    A connection the kernel accepted into the backlog just before uvicorn closed its socket is reset, not
    answered: a refusal too."""
    seen = []
    deadline = time.monotonic() + limit_s
    with httpx.Client(trust_env=False, timeout=5, limits=httpx.Limits(max_keepalive_connections=0)) as http:
        while time.monotonic() < deadline:
            try:
                seen.append((time.monotonic() - sent, "/health", http.get(f"{url}/health").status_code))
                answer = http.post(f"{url}/classify", json={"texts": ["new"]}).status_code
                seen.append((time.monotonic() - sent, "/classify", answer))
            except (httpx.ConnectError, httpx.ReadError, httpx.RemoteProtocolError):
                return [*seen, (time.monotonic() - sent, "connect", "refused")]
    return seen


def connectable_until(port: int) -> float:
    """Open and close bare connections to the port until one is refused; returns when (time.monotonic())."""
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=5).close()
        except ConnectionRefusedError:
            return time.monotonic()
        time.sleep(0.01)


def sigterm_under_load(checkpoint: Path, drain_delay_s: float, n_in_flight: int = 4, max_wait_s: float = 1):
    """A real server with `n_in_flight` requests queued when SIGTERM arrives: (their responses, seconds from
    SIGTERM to the first of them, seconds from SIGTERM to the port refusing bare connections, the probes of
    probe_until_refused, seconds from SIGTERM to exit, exit code, stderr)."""
    port = free_port()
    # Batches leave max_wait after their oldest text: requests stay in flight until then
    options = ("--timeout-graceful-shutdown", str(GRACE_S))
    max_wait_ms = str(int(max_wait_s * 1000))
    server = uvicorn(checkpoint, port, *options, max_wait_ms=max_wait_ms, drain_delay_s=str(drain_delay_s))
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(server, url)
        with ThreadPoolExecutor(n_in_flight + 1) as pool:
            in_flight = [pool.submit(answered, url, f"message {i}") for i in range(n_in_flight)]
            while queue_depth(url) < n_in_flight:
                time.sleep(0.01)
            sent = time.monotonic()
            server.send_signal(signal.SIGTERM)
            port_closed = pool.submit(connectable_until, port)
            probes = probe_until_refused(url, sent, drain_delay_s + GRACE_S)
            responses, times = zip(*(f.result() for f in in_flight), strict=True)
            closed = port_closed.result(timeout=drain_delay_s + GRACE_S) - sent
        stderr = server.communicate(timeout=drain_delay_s + GRACE_S + EXIT_SLACK_S)[1]
        return list(responses), min(times) - sent, closed, probes, time.monotonic() - sent, server.returncode, stderr
    finally:
        if server.poll() is None:
            server.kill()
            server.communicate()


def assert_clean_exit(code: int, stderr: str) -> None:
    # app.cli.serve absorbs the SIGTERM uvicorn re-raises after a clean shutdown: a drained stop exits 0
    assert code == 0, stderr
    assert "Application shutdown complete." in stderr and "Finished server process" in stderr
    assert "ERROR" not in stderr and "Traceback" not in stderr, stderr


def test_sigterm_without_a_drain_delay_finishes_in_flight_requests_refuses_new_ones_and_exits(tiny_checkpoint):
    # in flight for 3 s after they queued: the port closing at once comes before they are answered
    responses, first_answer, closed, probes, took, code, stderr = sigterm_under_load(tiny_checkpoint, 0, max_wait_s=3)
    assert [r.status_code for r in responses] == [200] * len(responses), [r.text for r in responses]
    assert probes[-1][2] == "refused" and {status for _, route, status in probes if route == "/health"} <= {503}
    assert closed < first_answer, (closed, first_answer)  # the port closes at once, then in-flight work finishes
    assert_clean_exit(code, stderr)
    assert took < GRACE_S + EXIT_SLACK_S
    print(f"SIGTERM -> exit {took:.2f} s with {len(responses)} requests in flight; probes {probes}")


def test_sigterm_with_a_drain_delay_keeps_serving_with_health_503_then_stops_accepting_and_exits_0(tiny_checkpoint):
    """Closing the port the moment SIGTERM arrives would let no client see /health 503."""
    delay_s = 2.0
    responses, _, _, probes, took, code, stderr = sigterm_under_load(tiny_checkpoint, drain_delay_s=delay_s)
    assert [r.status_code for r in responses] == [200] * len(responses), [r.text for r in responses]
    during = [(route, status) for t, route, status in probes if route != "connect"]
    assert {status for route, status in during if route == "/health"} == {503}, probes
    assert {status for route, status in during if route == "/classify"} == {200}, probes  # answered, even if sent
    # just before the port closed: in-flight work finishes
    assert probes[-1][2] == "refused" and delay_s <= probes[-1][0] < took, probes  # after the delay, before exit
    assert_clean_exit(code, stderr)
    assert took < delay_s + GRACE_S + EXIT_SLACK_S
    print(f"SIGTERM -> refused at {probes[-1][0]:.2f} s, exit at {took:.2f} s; probes {probes}")
