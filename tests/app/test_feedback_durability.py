"""Nothing acknowledged is lost: several clients stream POST /feedback and spamd TELLs to a real server while a
fine-tune's reader reads the same database, the server is killed with SIGKILL mid-stream, and after a restart every
acknowledged correction is there with its acknowledged label, and nothing is half-written."""

import signal
import socket
import sqlite3
import threading
import time

import httpx

from tests.helpers import free_port, live_server
from training.finetune.feedback import load_corrections
from training.runtime.feedback import FeedbackStore, content_key

CLIENTS = 3  # of each kind: HTTP and spamd
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


def tell(port: int, client_id: int, acknowledged: dict, stop: threading.Event) -> None:
    """spamc -L's TELLs until the server goes away, one connection each as spamc makes them; `acknowledged` gets
    each message's key with the label of its last `DidSet: local` answer."""
    i = 0
    while not stop.is_set():
        label = LABELS[i % 2]
        message = f"Message-ID: <{client_id}.{i}@example.org>\r\nSubject: offer {i}\r\n\r\nbody {i}\r\n".encode()
        head = f"TELL SPAMC/1.5\r\nMessage-class: {label}\r\nSet: local\r\nContent-length: {len(message)}\r\n\r\n"
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
                sock.sendall(head.encode() + message)
                answer = b""
                while chunk := sock.recv(65536):
                    answer += chunk
        except OSError:
            return  # the server was killed: this TELL was never acknowledged
        if not answer:
            return  # killed between reading the TELL and answering it
        assert answer.startswith(b"SPAMD/1.1 0 EX_OK") and b"DidSet: local" in answer, answer
        acknowledged[content_key(message)] = label
        i += 1


def read_while_writing(path, counts: list, stop: threading.Event) -> None:
    """A fine-tune's reader (load_corrections), over and over, on the database the server is writing."""
    while not stop.is_set():
        counts.append(len(load_corrections(path).texts))
        time.sleep(0.05)


def test_sigkill_mid_stream_loses_no_acknowledged_correction(tiny_checkpoint, tmp_path):
    database, port = tmp_path / "feedback.db", free_port()
    settings = {"feedback_enabled": "true", "feedback_path": database, "spamd_port": port, "spamd_allow_tell": "true"}
    acknowledged, told = [{} for _ in range(CLIENTS)], [{} for _ in range(CLIENTS)]
    stop, read_counts = threading.Event(), []
    with live_server(tiny_checkpoint, tmp_path / "server.log", **settings) as (url, server):
        clients = [threading.Thread(target=stream, args=(url, c, acknowledged[c], stop)) for c in range(CLIENTS)]
        clients += [threading.Thread(target=tell, args=(port, c, told[c], stop)) for c in range(CLIENTS)]
        reader = threading.Thread(target=read_while_writing, args=(database, read_counts, stop))
        for thread in clients:
            thread.start()
        deadline = time.monotonic() + 60
        while (sum(map(len, acknowledged)) < 100 or sum(map(len, told)) < 20) and time.monotonic() < deadline:
            if reader.ident is None and sum(map(len, acknowledged)) >= 10:  # the store holds corrections to read
                reader.start()
            time.sleep(0.05)
        server.send_signal(signal.SIGKILL)  # mid-stream: the clients are still sending
        server.wait()
        for thread in clients:
            thread.join(timeout=30)
        stop.set()
        reader.join(timeout=30)
    assert sum(map(len, acknowledged)) >= 100 and sum(map(len, told)) >= 20
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
        corrections = list(store.corrections())
    stored = {c.content: c.label for c in corrections if c.kind == "text"}
    missing = {text: label for text, label in expected.items() if stored.get(text) != label}
    assert missing == {}, f"{len(missing)} acknowledged /feedback corrections lost or with another label"
    stored_tells = {c.key: c.label for c in corrections if c.kind == "message"}
    lost = {key for client in told for key, label in client.items() if stored_tells.get(key) != label}
    assert lost == set(), f"{len(lost)} acknowledged TELLs lost or with another label"

    # the restarted server opens the same database and counts what was stored
    with live_server(tiny_checkpoint, tmp_path / "restarted.log", **settings) as (url, _):
        stats = httpx.get(f"{url}/feedback/stats", trust_env=False, timeout=30).json()
    assert stats["corrections"] == len(corrections) >= len(expected) + sum(map(len, told))
