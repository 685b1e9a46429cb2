"""deploy/: every SPAMGPT_* variable the manifests set is a server setting, and every path a probe or the scrape
annotation names is a route of the app. Read from the YAML files themselves (base, overlays' patches, components),
so no kubectl is needed; CI renders and schema-checks the overlays (.ci/checks.py deploy)."""

from pathlib import Path

import pytest
import yaml

from app.main import create_app
from app.settings import Settings

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
PROBES = ("startupProbe", "readinessProbe", "livenessProbe")


def documents() -> list[tuple[Path, object]]:
    """Every YAML document under deploy/, with the inline patches of kustomization files parsed as YAML too."""
    found = []
    for path in sorted(DEPLOY.rglob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            found.append((path, doc))
            for patch in (doc or {}).get("patches", []):
                if isinstance(patch.get("patch"), str):
                    found.extend((path, inline) for inline in yaml.safe_load_all(patch["patch"]))
    return found


def walk(node, key: str | None = None):
    """(key, value) of every mapping entry in a YAML tree, depth first."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield k, v
            yield from walk(v, k)
    elif isinstance(node, list):
        for item in node:
            yield from walk(item, key)


def spamgpt_variables(doc) -> set[str]:
    return {
        var["name"]
        for k, v in walk(doc)
        if k == "env"
        for var in v
        if isinstance(var, dict) and var["name"].startswith("SPAMGPT_")
    }


def http_paths(doc) -> set[str]:
    """Paths of the probes' httpGet and of the prometheus.io/path annotation."""
    paths = {v["httpGet"]["path"] for k, v in walk(doc) if k in PROBES and "httpGet" in v}
    return paths | {v for k, v in walk(doc) if k == "prometheus.io/path"}


def get_routes() -> set[str]:
    """The app's GET routes, from its OpenAPI document (the model loads in the lifespan: none is needed here)."""
    paths = create_app(Settings(checkpoint_dir="unused")).openapi()["paths"]
    return {path for path, operations in paths.items() if "get" in operations}


def test_the_manifests_set_only_settings_and_probe_only_routes():
    settings = {f"SPAMGPT_{name.upper()}" for name in Settings.model_fields}
    routes = get_routes()
    variables, paths = set(), set()
    for path, doc in documents():
        unknown = spamgpt_variables(doc) - settings
        assert not unknown, f"{path.relative_to(DEPLOY)}: {sorted(unknown)} are not server settings"
        missing = http_paths(doc) - routes
        assert not missing, f"{path.relative_to(DEPLOY)}: {sorted(missing)} are not GET routes"
        variables |= spamgpt_variables(doc)
        paths |= http_paths(doc)
    # what the manifests must hold for the checks above to mean anything
    assert {"SPAMGPT_CHECKPOINT_DIR", "SPAMGPT_TORCH_THREADS", "SPAMGPT_LOG_FORMAT", "SPAMGPT_DEVICE"} <= variables
    assert {"/health", "/metrics"} <= paths


@pytest.mark.parametrize(
    ("doc", "finds"),
    [
        pytest.param(
            {"spec": {"containers": [{"env": [{"name": "SPAMGPT_NOT_A_SETTING", "value": "1"}]}]}},
            ({"SPAMGPT_NOT_A_SETTING"}, set()),
            id="variable",
        ),
        pytest.param(
            {"containers": [{"livenessProbe": {"httpGet": {"path": "/healthz", "port": 8000}}}]},
            (set(), {"/healthz"}),
            id="probe",
        ),
        pytest.param({"annotations": {"prometheus.io/path": "/stats"}}, (set(), {"/stats"}), id="scrape-annotation"),
    ],
)
def test_the_walk_finds_variables_probes_and_scrape_paths(doc, finds):
    """The checks above would see a wrong name wherever the manifests put it."""
    assert (spamgpt_variables(doc), http_paths(doc)) == finds
    assert not finds[1] & get_routes()
