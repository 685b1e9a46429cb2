"""End to end through a real mail filter: Debian's rspamd, configured in a temporary directory with its spamassassin
external service (the `external_services` module) pointed at spamgpt's spamd listener, and `rspamc` submitting
messages; the verdict symbol rspamd inserts is the model's decision. Skips where rspamd or rspamc is not installed.

rspamd starts from the system's configuration (/etc/rspamd) with its local directory, databases, logs and ports
moved into the test's directory; hyperscan is off, which spares its start the regular expression compilation (75 s
measured on this project's 2 busy cores). No network is used: the rules that query DNS find none and add nothing."""

import base64
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from tests.helpers import calibrated_checkpoint, edit_card, tiny_settings
from tests.live_server import free_port, live_server

RSPAMD, RSPAMC = shutil.which("rspamd"), shutil.which("rspamc")
pytestmark = pytest.mark.skipif(
    RSPAMD is None or RSPAMC is None, reason="Debian's rspamd is not installed (apt-get install rspamd)"
)
START_S = 240  # rspamd's start, generously: loading its configuration and maps takes tens of seconds on busy cores

MESSAGES = {
    "prize": b"From: a@example.com\r\nTo: b@example.com\r\nSubject: WINNER! Claim your prize\r\n\r\nText WIN now.\r\n",
    "lunch": b"From: c@example.com\r\nTo: d@example.com\r\nSubject: Lunch\r\n\r\nSee you at noon, bring chairs?\r\n",
}


def rspamd_config(directory: Path, spamd_port: int) -> tuple[list[str], int]:
    """rspamd's command line and its scanning port, its configuration under `directory`."""
    local = directory / "local.d"
    local.mkdir(parents=True)
    for name in ("db", "run", "log"):
        (directory / name).mkdir()
    port = free_port()
    (local / "worker-normal.inc").write_text(f'bind_socket = "127.0.0.1:{port}";\ncount = 1;\n')
    (local / "worker-controller.inc").write_text(f'bind_socket = "127.0.0.1:{free_port()}";\n')
    (local / "worker-proxy.inc").write_text(f'bind_socket = "127.0.0.1:{free_port()}";\n')
    (local / "logging.inc").write_text(f'type = "file";\nfilename = "{directory}/log/rspamd.log";\nlevel = "info";\n')
    (local / "options.inc").write_text("disable_hyperscan = true;\n")
    # docs/mailserver.md's configuration: one symbol per decision
    (local / "external_services.conf").write_text(
        f'spamgpt {{\n  type = "spamassassin";\n  servers = "127.0.0.1:{spamd_port}";\n  symbol = "SPAMGPT";\n'
        '  patterns {\n    GPT_SPAM = "^GPT_SPAM$";\n    GPT_HAM = "^GPT_HAM$";\n  }\n'
        "  timeout = 30;\n  retransmits = 0;\n  log_clean = true;\n}\n"
    )
    variables = [f"LOCAL_CONFDIR={directory}", f"DBDIR={directory}/db", f"RUNDIR={directory}/run"]
    variables.append(f"LOGDIR={directory}/log")
    command = [RSPAMD, "-f", "-i", "-c", "/etc/rspamd/rspamd.conf"]
    command += [part for v in variables for part in ("--var", v)]
    if os.geteuid() == 0:  # rspamd refuses to run as root unless told which user to be
        command += ["-u", "root", "-g", "root"]
    return command, port


def rspamc(port: int, message: bytes) -> str:
    """rspamc's report of the symbols rspamd found in `message`."""
    command = [RSPAMC, "-h", f"127.0.0.1:{port}", "-t", "60", "symbols"]
    result = subprocess.run(command, input=message, capture_output=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout.decode()


def wait_listening(process: subprocess.Popen, port: int, log: Path) -> None:
    deadline = time.monotonic() + START_S
    while time.monotonic() < deadline:
        assert process.poll() is None, f"rspamd exited with {process.returncode}:\n{log.read_text()[-4000:]}"
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"rspamd did not listen within {START_S} s:\n{log.read_text()[-4000:]}")


@pytest.fixture
def split_checkpoint(tmp_path, tiny_config, bpe_dir) -> tuple[Path, str, str]:
    """A tiny calibrated checkpoint whose threshold sits between the two messages' P(spam): one is spam, one ham."""
    checkpoint = calibrated_checkpoint(tmp_path / "ckpt", tiny_config, bpe_dir)
    messages = [{"base64": base64.b64encode(raw).decode()} for raw in MESSAGES.values()]
    with TestClient(create_app(tiny_settings(checkpoint))) as client:
        results = client.post("/classify", json={"messages": messages}).json()["results"]
    p = {name: r["probabilities"]["spam"] for name, r in zip(MESSAGES, results, strict=True)}
    assert p["prize"] != p["lunch"]
    spam, ham = ("prize", "lunch") if p["prize"] > p["lunch"] else ("lunch", "prize")
    edit_card(threshold={"label": "spam", "value": (p[spam] + p[ham]) / 2})(checkpoint)
    return checkpoint, spam, ham


def test_rspamd_inserts_the_models_verdict_symbol(split_checkpoint, tmp_path):
    checkpoint, spam, ham = split_checkpoint
    spamd_port = free_port()
    command, port = rspamd_config(tmp_path / "rspamd", spamd_port)
    log = tmp_path / "rspamd" / "log" / "rspamd.log"
    with live_server(checkpoint, tmp_path / "server.log", spamd_port=spamd_port):
        out = (tmp_path / "rspamd.out").open("w")
        rspamd = subprocess.Popen(command, stdout=out, stderr=out)
        try:
            wait_listening(rspamd, port, log)
            spam_symbols = rspamc(port, MESSAGES[spam])
            assert "Symbol: GPT_SPAM " in spam_symbols and "GPT_HAM" not in spam_symbols, spam_symbols
            # rspamd's spamassassin service inserts a symbol only for a score above 0: a ham verdict adds none
            ham_symbols = rspamc(port, MESSAGES[ham])
            assert "GPT_SPAM" not in ham_symbols and "SPAMGPT_FAIL" not in ham_symbols, ham_symbols
        finally:
            rspamd.terminate()
            rspamd.wait(timeout=60)
            out.close()
