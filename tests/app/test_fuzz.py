"""Schema-driven fuzzing: schemathesis reads the live server's OpenAPI document and sends valid and invalid
requests in all its phases. Passing means no 500, only declared status codes, every body in its declared
shape, invalid input refused, valid input accepted, and the API key enforced where the schema says so."""

import json
import subprocess
import sys

import httpx

from tests.helpers import live_server

API_KEY = "s3cret"
# Small limits, so the generated boundary cases (8 and 9 texts, 300 and 301 characters) reach them.
LIMITS = {"max_texts_per_request": 8, "max_text_chars": 300}
# Per operation (operations without inputs stop sooner); a fixed seed makes each run the same. ~25 s here.
MAX_EXAMPLES, SEED = 500, 20261126


def test_schemathesis_finds_no_failure(tiny_checkpoint, tmp_path):
    config = tmp_path / "schemathesis.toml"
    # The key for the APIKeyHeader scheme: schemathesis then also checks that a missing or wrong key is a 401.
    # fail-on: a warning (e.g. no generated request was valid enough to reach the model) fails the run too.
    # /predict with truncate false refuses a text over max_tokens with 422, as TEI refuses one: a rule of token
    # counts that a JSON schema cannot state, so a schema-valid request may get that 422; anything else is checked.
    config.write_text(
        f'[warnings]\nfail-on = true\n\n[auth.openapi.APIKeyHeader]\napi_key = "{API_KEY}"\n\n'
        '[[operations]]\ninclude-path = "/predict"\n[operations.checks.positive_data_acceptance]\n'
        'expected-statuses = ["2xx", "3xx", "401", "403", "404", "409", "422", "429", "5xx"]\n\n'
        # /classify: a model name must be one served (404 otherwise), and texts or messages given, not both (422):
        # rules of this server's models and of two fields that the JSON schema does not state
        '[[operations]]\ninclude-path = "/classify"\n[operations.checks.positive_data_acceptance]\n'
        'expected-statuses = ["2xx", "3xx", "401", "403", "404", "409", "422", "429", "5xx"]\n'
    )
    report = tmp_path / "report.json"
    with live_server(tiny_checkpoint, tmp_path / "server.log", api_key=API_KEY, **LIMITS) as (url, _):
        command = [
            *(sys.executable, "-m", "schemathesis.cli", "--config-file", str(config), "run", f"{url}/openapi.json"),
            *("--phases", "examples,coverage,fuzzing,stateful", "--mode", "all", "--checks", "all"),
            *("--max-examples", str(MAX_EXAMPLES), "--seed", str(SEED), "--request-timeout", "10"),
            *("--generation-database", "none", "--continue-on-failure", "--no-color"),
            # /models/{name}/predict and /models/{name} are /predict's and /'s handlers and bodies with a model chosen;
            # the admin API and /feedback (off here) have their own tests: with them the run passed 600 s on 2 cores
            *("--exclude-path-regex", "^/(models/|admin/|feedback)"),
            *("--report", "json", "--report-json-path", str(report)),
        ]
        # six operations of up to MAX_EXAMPLES each; 300 s was not enough on a 2-core machine shared by other jobs
        run = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600)
        assert httpx.get(f"{url}/health", trust_env=False).status_code == 200  # still serving after all that
    result = json.loads(report.read_text())
    assert (run.returncode, result["failures"], result["errors"]) == (0, [], []), run.stdout[-5000:]
    # /classify, /predict, /, /health, /info, /metrics
    assert result["operations"]["tested"] == 6
    assert result["test_cases"]["generated"] >= MAX_EXAMPLES
    accepted = result["valid_rates"]["POST /classify"]
    assert sum(phase["accepted"] for phase in accepted.values()) > 0  # valid texts reached the model
