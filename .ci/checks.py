"""CI checks that need Python: `compose` (docker-compose*.yml read statically, no Docker daemon needed),
`serve CHECKPOINT` (the image's server, `spamgpt serve`, over real HTTP, then SIGTERM), `run-sh CHECKPOINT`
(./run.sh trains the tiny preset on the packaged data and serves, over real HTTP, then SIGTERM) and `deploy` (every
kustomize overlay rendered and validated offline). Files are read from the repository this script sits in, so
`serve` also runs from elsewhere, against an installed spamgpt."""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from app.cli import GRACEFUL_SHUTDOWN_S, build_parser
from app.settings import Settings
from training.config import FinetuneConfig, from_flat

ROOT = Path(__file__).resolve().parents[1]


def check_train_command(command: list[str]) -> None:
    """`command` is `spamgpt train` with options the CLI accepts and that validate with their defaults."""
    assert command[:2] == ["spamgpt", "train"], command
    namespace = vars(build_parser().parse_args(command[1:]))
    del namespace["command"], namespace["subparser"]
    from_flat(FinetuneConfig, namespace)


def seconds(duration: str) -> float:
    """A compose duration such as '30s', '1m30s' or '500ms'."""
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, f"not a compose duration: {duration!r}"
    return sum(float(n) * units[u] for n, u in parts)


def with_defaults(value: str) -> str:
    """Compose interpolation as it comes out when the variable is not set: ${VAR:-default} -> default."""
    return re.sub(r"\$\{\w+:?-([^}]*)\}", r"\1", value)


def check_compose() -> None:
    import yaml  # a test dependency: `serve` also runs in a venv holding only the project's own requirements

    base = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    gpu = yaml.safe_load((ROOT / "docker-compose.gpu.yml").read_text())
    services = base["services"]
    for name, service in services.items():
        assert "restart" in service, f"service {name}: no restart policy"
        for dependency, spec in service.get("depends_on", {}).items():
            assert dependency in services, f"service {name} depends on {dependency!r}, which is not a service"
            assert "condition" in spec, f"service {name}: depends_on {dependency} has no condition"
    api, train = services["api"], services["train"]
    assert api["depends_on"]["train"]["condition"] == "service_completed_successfully", api["depends_on"]
    assert api["healthcheck"]["test"], "api: empty healthcheck"
    for port in api["ports"]:
        assert port.startswith("127.0.0.1:"), f"api: port {port!r} is not bound to 127.0.0.1"
    assert "command" not in api, "api: a command of its own instead of the image's CMD"
    grace = GRACEFUL_SHUTDOWN_S
    assert seconds(api["stop_grace_period"]) > grace, f"api: stop_grace_period must exceed the shutdown's {grace} s"
    check_train_command([with_defaults(arg) for arg in train["command"]])

    for name, service in gpu["services"].items():
        assert name in services, f"docker-compose.gpu.yml: service {name!r} is not in docker-compose.yml"
        devices = service["deploy"]["resources"]["reservations"]["devices"]
        assert any("gpu" in d["capabilities"] for d in devices), f"gpu override of {name}: no capabilities [gpu]"
    # The api's environment, with every variable unset, is settings the server accepts (with the override too).
    for environment in (api["environment"], {**api["environment"], **gpu["services"]["api"]["environment"]}):
        check_settings(environment)
    print("compose: ok (services, depends_on, healthcheck, port, restart, grace period, train options, gpu, env)")


def check_settings(environment: dict[str, str | None]) -> None:
    # A variable with no value is passed through from the shell, or left unset when the shell has none.
    resolved = {key: with_defaults(value) for key, value in environment.items() if value is not None}
    fields = {f"SPAMGPT_{name.upper()}" for name in Settings.model_fields}
    unknown = sorted(key for key in resolved if key.startswith("SPAMGPT_") and key not in fields)
    assert not unknown, f"compose api environment: not settings: {unknown}"
    saved = dict(os.environ)
    os.environ.update(resolved)
    try:
        Settings()
    finally:
        os.environ.clear()
        os.environ.update(saved)


# --- deploy/: Kubernetes manifests ---------------------------------------------------------------------------

KUBERNETES_VERSION = "1.32.0"  # the schemas kubernetes-validate checks against (bundled with it: offline)


def check_deploy() -> None:
    """Each overlay under deploy/overlays rendered by `kubectl kustomize`, each object validated against the
    Kubernetes schemas (kubernetes-validate --strict: unknown fields are errors too), then what schemas cannot
    check: non-root, read-only root filesystem, no privilege escalation and CPU and memory limits for every
    container; the API runs the image's CMD, its SPAMGPT_* variables are settings and SPAMGPT_TORCH_THREADS is its
    CPU limit; its grace period outlasts preStop, the server's drain delay and its graceful shutdown; the training
    Job's options are the CLI's."""
    import yaml  # a test dependency, like check_compose's

    overlays = sorted(p for p in (ROOT / "deploy" / "overlays").iterdir() if (p / "kustomization.yaml").is_file())
    assert overlays, "deploy/overlays: no overlay"
    for overlay in overlays:
        rendered = subprocess.run(["kubectl", "kustomize", str(overlay)], check=True, capture_output=True, text=True)
        with tempfile.NamedTemporaryFile("w", suffix=".yaml") as file:
            file.write(rendered.stdout)
            file.flush()
            argv = ["kubernetes-validate", "--strict", "--quiet", "-k", KUBERNETES_VERSION, file.name]
            subprocess.run(argv, check=True)
        objects = list(yaml.safe_load_all(rendered.stdout))
        for obj in objects:
            if obj["kind"] in ("Deployment", "Job"):
                check_pod(obj)
        kinds = ", ".join(sorted(obj["kind"] for obj in objects))
        print(f"deploy: {overlay}: {len(objects)} objects, valid for Kubernetes {KUBERNETES_VERSION} ({kinds})")


def check_pod(workload: dict) -> None:
    name = f"{workload['kind']} {workload['metadata']['name']}"
    pod = workload["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True, f"{name}: not runAsNonRoot"
    for container in pod.get("initContainers", []) + pod["containers"]:
        where = f"{name}, container {container['name']}"
        security = container["securityContext"]
        assert security["readOnlyRootFilesystem"] is True, f"{where}: root filesystem not read-only"
        assert security["allowPrivilegeEscalation"] is False, f"{where}: privilege escalation allowed"
        assert {"cpu", "memory"} <= set(container["resources"]["limits"]), f"{where}: no CPU or memory limit"
        if container["name"] == "api":
            check_api_container(name, pod, container)
        elif container["name"] == "train":
            check_train_command(container["command"])


def check_api_container(name: str, pod: dict, container: dict) -> None:
    assert "command" not in container, f"{name}: the api container has a command of its own, not the image's CMD"
    env = {var["name"]: var["value"] for var in container["env"]}
    check_settings(env)
    threads, cpu_limit = env.get("SPAMGPT_TORCH_THREADS"), container["resources"]["limits"]["cpu"]
    assert threads == str(cpu_limit), f"{name}: SPAMGPT_TORCH_THREADS {threads!r} is not the CPU limit {cpu_limit!r}"
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep", f"{name}: preStop is not a sleep: {pre_stop}"
    delay = float(env.get("SPAMGPT_DRAIN_DELAY_S", Settings.model_fields["drain_delay_s"].default))
    drain = float(pre_stop[1]) + delay + GRACEFUL_SHUTDOWN_S
    grace = pod["terminationGracePeriodSeconds"]
    assert grace > drain, (
        f"{name}: terminationGracePeriodSeconds {grace} is not above preStop + drain + shutdown {drain}"
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def request(url: str, body: dict | None = None) -> tuple[int, dict]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def wait_healthy(url: str, server: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert server.poll() is None, f"server exited with {server.returncode} before /health answered 200"
        try:
            if request(url + "/health")[0] == 200:
                return
        except OSError:  # not listening yet
            pass
        time.sleep(0.5)
    raise AssertionError(f"/health not 200 within {timeout_s} s")


def check_serve(checkpoint: str) -> None:
    """The installed `spamgpt serve`, the image's CMD, on loopback: ready, classifies, exits 0 on SIGTERM."""
    spamgpt = shutil.which("spamgpt")
    assert spamgpt, "no spamgpt command on PATH: install the project"
    port = free_port()
    argv = [spamgpt, "serve", "--host", "127.0.0.1", "--port", str(port)]
    serve_and_classify(argv, {"SPAMGPT_CHECKPOINT_DIR": checkpoint}, port, ready_s=120)
    print(f"serve: ok ({spamgpt} serve on 127.0.0.1:{port}: /health 200, /classify 200, clean exit on SIGTERM)")


def check_run_sh(checkpoint: str) -> None:
    """./run.sh as a user starts it, from random weights with every parameter trained (the tiny preset, one epoch,
    the packaged SMS data), then serving what it trained with the image's server command."""
    port = free_port()
    env = {
        "SPAMGPT_INIT": "random",
        "SPAMGPT_TRAINABLE": "all",
        "SPAMGPT_PRESET": "tiny",
        "SPAMGPT_EPOCHS": "1",
        "SPAMGPT_CHECKPOINT_DIR": checkpoint,
        "SPAMGPT_PORT": str(port),
    }
    serve_and_classify([str(ROOT / "run.sh"), "--max-tokens", "64"], env, port, ready_s=900)  # training included
    print(f"run.sh: ok (tiny preset trained on the packaged data into {checkpoint}, served on 127.0.0.1:{port})")


def serve_and_classify(argv: list[str], env: dict[str, str], port: int, ready_s: float) -> None:
    """Start `argv` (a server on 127.0.0.1:`port`, with `env` added to this environment), wait up to `ready_s` for
    /health 200, classify, stop it with SIGTERM; on failure print its output."""
    with tempfile.TemporaryFile("w+") as log:
        server = subprocess.Popen(argv, env=os.environ | env, stdout=log, stderr=log)
        try:
            wait_healthy(f"http://127.0.0.1:{port}", server, ready_s)
            classify_then_stop(f"http://127.0.0.1:{port}", server, GRACEFUL_SHUTDOWN_S, log)
        except BaseException:
            log.seek(0)
            print(log.read(), file=sys.stderr)  # the server's own account of what went wrong
            raise
        finally:
            if server.poll() is None:
                server.kill()


def classify_then_stop(url: str, server: subprocess.Popen, grace: float, log) -> None:
    texts = ["WINNER!! Claim your free prize now", "See you at 5?", "<|endoftext|>"]
    status, body = request(url + "/classify", {"texts": texts})
    assert status == 200, (status, body)
    assert len(body["results"]) == len(texts), body
    for result in body["results"]:
        assert abs(sum(result["probabilities"].values()) - 1) < 1e-4, result
        assert result["label"] in result["probabilities"], result
    server.send_signal(signal.SIGTERM)
    code = server.wait(timeout=grace)
    log.seek(0)
    assert code == 0 and "Application shutdown complete." in log.read(), f"exit {code} after SIGTERM"


if __name__ == "__main__":
    match sys.argv[1:]:
        case ["compose"]:
            check_compose()
        case ["serve", checkpoint]:
            check_serve(checkpoint)
        case ["run-sh", checkpoint]:
            check_run_sh(checkpoint)
        case ["deploy"]:
            check_deploy()
        case _:
            sys.exit(f"usage: {sys.argv[0]} compose | serve CHECKPOINT | run-sh CHECKPOINT | deploy")
