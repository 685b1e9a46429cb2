"""The API pages in a real browser with no network: Debian's chromium, headless, resolving no host but the loopback
address, opens /docs and /redoc on a live server, runs their scripts and dumps the DOM they render. Skipped where
chromium is not installed (CI installs it)."""

import re
import shutil
import subprocess

import httpx
import pytest

from tests.helpers import live_server, tiny_card
from training.runtime.checkpoint import save_checkpoint
from training.runtime.model import GPTClassifier

CHROMIUM = shutil.which("chromium")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)")


def rendered_dom(url: str, profile) -> str:
    """The DOM of `url` once its scripts ran, in headless chromium that can reach 127.0.0.1 only: every other host
    name resolves to nothing, as on a machine with no network."""
    argv = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",  # root in a container has no user namespace sandbox
        "--disable-gpu",
        "--disable-dev-shm-usage",
        f"--user-data-dir={profile}",
        "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
        "--virtual-time-budget=20000",  # milliseconds of page time for the scripts to load and render
        "--dump-dom",
        url,
    ]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


@pytest.fixture(scope="module")
def server(tiny_config, bpe_dir, tmp_path_factory):
    """One live server for the module: chromium takes seconds a page already."""
    directory = tmp_path_factory.mktemp("docs")
    checkpoint = save_checkpoint(directory / "ckpt", GPTClassifier(tiny_config), bpe_dir, tiny_card())
    with live_server(checkpoint, directory / "server.log") as (url, _):
        yield url


def test_docs_assets_are_served_by_the_app(server):
    """Every script, style sheet and icon the pages name is a path on this server, and it answers 200."""
    with httpx.Client(base_url=server, trust_env=False) as client:
        for page in ("/docs", "/redoc"):
            html = client.get(page).text
            assets = re.findall(r"""(?:src|href)=["']([^"']+)["']""", html)
            assert assets and all(a.startswith("/") and not a.startswith("//") for a in assets), (page, assets)
            for asset in assets:
                assert client.get(asset).status_code == 200, asset


def openapi(url: str) -> dict:
    with httpx.Client(trust_env=False) as client:
        return client.get(f"{url}/openapi.json").json()


def test_swagger_ui_renders_every_operation_and_schema_with_no_network(server, tmp_path):
    dom = rendered_dom(f"{server}/docs", tmp_path / "profile")
    document = openapi(server)
    operation = r'class="opblock opblock-(\w+)[^"]*".*?class="opblock-summary-path" data-path="([^"]*)"'
    operations = re.findall(operation, dom)
    assert sorted(operations) == sorted((m, p) for p, ms in document["paths"].items() for m in ms), dom[-2000:]
    schemas = re.findall(r'class="json-schema-2020-12__title">([^<]+)<', dom)
    assert sorted(schemas) == sorted(document["components"]["schemas"])


def test_redoc_renders_every_operation_and_request_field_with_no_network(server, tmp_path):
    dom = rendered_dom(f"{server}/redoc", tmp_path / "profile")
    document = openapi(server)
    operations = re.findall(r'http-verb (\w+)">\w+</span><span class="[^"]*">([^<]*)</span>', dom)
    assert sorted(operations) == sorted((m, p) for p, ms in document["paths"].items() for m in ms), dom[-2000:]
    request_fields = {
        name
        for schema in ("ClassifyRequest", "PredictRequest", "InferenceRequest")
        for name in document["components"]["schemas"][schema]["properties"]
    }
    assert request_fields <= set(re.findall(r'class="property-name">([^<]+)<', dom))
