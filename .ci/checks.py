"""CI checks that need Python: `compose` (docker-compose*.yml read statically, no Docker daemon needed),
`serve CHECKPOINT` (the Dockerfile's own CMD over real HTTP, then SIGTERM), `run-sh CHECKPOINT` (./run.sh trains
the tiny preset on the packaged data and serves, over real HTTP, then SIGTERM) and `deploy` (every kustomize
overlay rendered and validated offline). Files are read from the repository this script sits in, so `serve` also
runs from elsewhere, against an installed spamgpt."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from app.settings import Settings
from training.cli import build_parser
from training.config import FinetuneConfig, from_flat

GRACE_OPTION = "--timeout-graceful-shutdown"
ROOT = Path(__file__).resolve().parents[1]


def dockerfile_cmd() -> list[str]:
    """The JSON array of the Dockerfile's (last) CMD line: the command the image serves with."""
    lines = re.findall(r"^CMD (\[.*\])$", (ROOT / "Dockerfile").read_text(), re.MULTILINE)
    assert lines, "Dockerfile: no CMD line in JSON form"
    return json.loads(lines[-1])


def option(argv: list[str], name: str) -> str:
    assert name in argv, f"{name} missing from {argv}"
    return argv[argv.index(name) + 1]


def with_option(argv: list[str], name: str, value: str) -> list[str]:
    argv = list(argv)
    argv[argv.index(name) + 1] = value
    return argv


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
    grace = float(option(dockerfile_cmd(), GRACE_OPTION))
    assert seconds(api["stop_grace_period"]) > grace, f"api: stop_grace_period must exceed {GRACE_OPTION} {grace}"

    # The train command's options are the CLI's own, and validate with their defaults.
    command = [with_defaults(arg) for arg in train["command"]]
    assert command[:4] == ["python", "-m", "training", "finetune"], command
    namespace = vars(build_parser().parse_args(command[3:]))
    del namespace["command"], namespace["subparser"]
    from_flat(FinetuneConfig, namespace)

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
    container; the API's SPAMGPT_* variables are settings and SPAMGPT_TORCH_THREADS is its CPU limit; its grace
    period outlasts preStop, the server's drain delay and its graceful shutdown; the training Job's options are
    the CLI's."""
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
        command = container.get("command", [])
        if command[:3] == ["python", "-m", "app"]:
            check_api_container(name, pod, container)
        elif command[:3] == ["python", "-m", "training"]:
            namespace = vars(build_parser().parse_args(command[3:]))
            del namespace["command"], namespace["subparser"]
            from_flat(FinetuneConfig, namespace)


def check_api_container(name: str, pod: dict, container: dict) -> None:
    env = {var["name"]: var["value"] for var in container["env"]}
    check_settings(env)
    threads, cpu_limit = env.get("SPAMGPT_TORCH_THREADS"), container["resources"]["limits"]["cpu"]
    assert threads == str(cpu_limit), f"{name}: SPAMGPT_TORCH_THREADS {threads!r} is not the CPU limit {cpu_limit!r}"
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep", f"{name}: preStop is not a sleep: {pre_stop}"
    delay = float(env.get("SPAMGPT_DRAIN_DELAY_S", Settings.model_fields["drain_delay_s"].default))
    drain = float(pre_stop[1]) + delay + float(option(container["command"], GRACE_OPTION))
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
    cmd = dockerfile_cmd()
    port = free_port()
    argv = with_option(with_option(cmd, "--host", "127.0.0.1"), "--port", str(port))
    serve_and_classify(argv, {"SPAMGPT_CHECKPOINT_DIR": checkpoint}, port, ready_s=120)
    print(f"serve: ok ({' '.join(cmd[:3])}... on 127.0.0.1:{port}: /health 200, /classify 200, clean exit on SIGTERM)")


def check_run_sh(checkpoint: str) -> None:
    """./run.sh as a user starts it, from random weights with every parameter trained (the tiny preset, one epoch,
    the packaged SMS data), then serving what it trained with the Dockerfile's CMD."""
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
            classify_then_stop(f"http://127.0.0.1:{port}", server, float(option(dockerfile_cmd(), GRACE_OPTION)), log)
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
