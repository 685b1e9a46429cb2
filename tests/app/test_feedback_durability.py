"""Nothing acknowledged is lost: several clients stream POST /feedback to a real server while a fine-tune's reader
reads the same database, the server is killed with SIGKILL mid-stream, and after a restart every acknowledged
correction is there with its acknowledged label, and nothing is half-written."""

import signal
import sqlite3
import threading
import time

import httpx

from tests.helpers import live_server
from training.finetune.feedback import load_corrections
from training.runtime.feedback import FeedbackStore

CLIENTS = 4
LABELS = ("ham", "spam")


def stream(url: str, client_id: int, acknowledged: dict, stop: threading.Event) -> None:
    """Reports until the server goes away: new texts, and every third one reported again with the other label, so
    that replacements are in flight too. `acknowledged` gets each text's label as the server last confirmed it."""
    with httpx.Client(base_url=url, trust_env=False, timeout=10) as client:
        i = 0
        while not stop.is_set():
            text = f"client {client_id} message {i // 2}: claim your prize at example.org/{i // 2}"
            label = LABELS[(i // 2 + i % 2) % 2] if (i // 2) % 3 == 0 else LABELS[(i // 2) % 2]
            try:
                response = client.post("/feedback", json={"text": text, "label": label})
            except httpx.TransportError:
                return  # the server was killed: this report was never acknowledged
            assert response.status_code == 200, response.text
            acknowledged[text] = response.json()["label"]
            i += 1


def read_while_writing(path, counts: list, stop: threading.Event) -> None:
    """A fine-tune's reader (load_corrections), over and over, on the database the server is writing."""
    while not stop.is_set():
        counts.append(len(load_corrections(path).texts))
        time.sleep(0.05)


def test_sigkill_mid_stream_loses_no_acknowledged_correction(tiny_checkpoint, tmp_path):
    database = tmp_path / "feedback.db"
    settings = {"feedback_enabled": "true", "feedback_path": database}
    acknowledged = [{} for _ in range(CLIENTS)]
    stop, read_counts = threading.Event(), []
    with live_server(tiny_checkpoint, tmp_path / "server.log", **settings) as (url, server):
        clients = [threading.Thread(target=stream, args=(url, c, acknowledged[c], stop)) for c in range(CLIENTS)]
        reader = threading.Thread(target=read_while_writing, args=(database, read_counts, stop))
        for thread in clients:
            thread.start()
        deadline = time.monotonic() + 60
        while sum(map(len, acknowledged)) < 150 and time.monotonic() < deadline:
            if reader.ident is None and sum(map(len, acknowledged)) >= 10:  # the store holds corrections to read
                reader.start()
            time.sleep(0.05)
        server.send_signal(signal.SIGKILL)  # mid-stream: the clients are still sending
        server.wait()
        for thread in clients:
            thread.join(timeout=30)
        stop.set()
        reader.join(timeout=30)
    assert sum(map(len, acknowledged)) >= 150
    assert len(read_counts) > 1 and read_counts == sorted(read_counts)  # the reader saw the store only grow

    expected = {text: label for client in acknowledged for text, label in client.items()}
    db = sqlite3.connect(database)
    assert db.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    # no half-written report: every correction's report count is its history's length, and no history without one
    assert db.execute(
        "SELECT COUNT(*) FROM corrections c WHERE reports != (SELECT COUNT(*) FROM reports r WHERE r.key = c.key)"
    ).fetchone() == (0,)
    assert db.execute(
        "SELECT COUNT(*) FROM reports r WHERE NOT EXISTS (SELECT 1 FROM corrections c WHERE c.key = r.key)"
    ).fetchone() == (0,)
    db.close()
    with FeedbackStore(database, LABELS) as store:
        stored = {c.content: c.label for c in store.corrections()}
    missing = {text: label for text, label in expected.items() if stored.get(text) != label}
    assert missing == {}, f"{len(missing)} acknowledged corrections lost or with another label"

    # the restarted server opens the same database and counts what was stored
    with live_server(tiny_checkpoint, tmp_path / "restarted.log", **settings) as (url, _):
        stats = httpx.get(f"{url}/feedback/stats", trust_env=False, timeout=30).json()
    assert stats["corrections"] == len(stored) >= len(expected)
