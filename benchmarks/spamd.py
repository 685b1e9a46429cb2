"""The spamd listener against the HTTP path on the same mail, in one run, interleaved; then the listener's memory
under bad clients.

    python -m benchmarks.spamd [--messages 48] [--rounds 3] [--clients 8] [--weights gpt2|tiny] [--seed 0]

One server, `python -m app` on loopback with the spamd listener on (tests.live_server), serving the GPT-2 124M
architecture with random weights (benchmarks.common.cached_random_checkpoint; OpenAI's weights are not available here,
the compute is the same) or, with --weights tiny, a tiny random model (where the protocols' own costs dominate).
Messages: a seeded sample of the SpamAssassin public corpus under ../shared/data, half ham, half spam.

Contenders, each sending every message once per round, their order rotated each round so that other load on the
machine hits them alike:
- spamc: Debian's spamc binary, `spamc -c`, one process per message, one at a time (what an MTA's pipe runs);
- spamd xN: N asyncio clients speaking the protocol on raw sockets (CHECK), one connection per message as the protocol
  has it, each sending its next message when the last is answered (N = 1 and --clients);
- http xN: N asyncio clients on keep-alive HTTP/1.1 connections (a minimal client, as light as the spamd one), one
  POST /classify per message, `{"messages": [{"base64": ...}]}`: the same reading, windows and batcher server-side.
Every spamd verdict is checked against HTTP's label for the same message.

Memory: the server's VmRSS idle, and at its peak (sampled every 0.1 s) while, at once, --stalled connections send a
Content-length of max_message_bytes and all but 1 KiB of it, --stalled connections send a header and
nothing, and 8 clients each pipeline 10,000 PINGs; then how each ended and a CHECK's answer meanwhile. The default
11 + 11 + 8 + the CHECK fit within spamd_max_connections (32); more are answered EX_TEMPFAIL.
"""

import argparse
import asyncio
import base64
import json
import random
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import (
    BPE_DIR,
    SHARED_DATA,
    cached_random_checkpoint,
    count,
    print_table,
    require_shared_data,
    rss_mib,
    write_result,
)
from tests.live_server import free_port, live_server
from training.runtime.checkpoint import ModelCard, save_checkpoint
from training.runtime.model import GPTClassifier, GPTConfig

CORPUS = SHARED_DATA / "spamassassin-public-corpus"
JSON = "Content-Type: application/json\r\n"
MAX_MESSAGE_BYTES = 4 * 1024 * 1024  # the default max_message_bytes


def sample_messages(n: int, seed: int) -> list[bytes]:
    """n raw messages of the public corpus, half from ham/, half from spam/, under MAX_MESSAGE_BYTES."""
    chosen = []
    for kind in ("ham", "spam"):
        files = sorted((CORPUS / kind).glob("*.eml"))
        files = [f for f in files if f.stat().st_size < MAX_MESSAGE_BYTES]
        chosen += random.Random(seed).sample(files, n // 2)
    return [f.read_bytes() for f in chosen]


def spamd_check(raw: bytes) -> bytes:
    return f"CHECK SPAMC/1.5\r\nContent-length: {len(raw)}\r\n\r\n".encode() + raw


async def spamd_client(port: int, raws: list[bytes], latencies: list[float], verdicts: dict[int, bool]) -> None:
    """CHECK each message on its own connection; latencies in seconds; verdicts by message index."""
    for index, raw in raws:
        start = time.perf_counter()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(spamd_check(raw))
        writer.write_eof()
        answer = await reader.read()
        writer.close()
        latencies.append(time.perf_counter() - start)
        assert answer.startswith(b"SPAMD/1.1 0 EX_OK\r\nSpam: "), answer[:200]
        verdicts[index] = answer.split(b"Spam: ", 1)[1].startswith(b"True")


async def http_client(port: int, raws: list, latencies: list[float], labels: dict[int, bool]) -> None:
    """POST /classify one message at a time on one keep-alive connection; latencies in seconds."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        for index, raw in raws:
            body = json.dumps({"messages": [{"base64": base64.b64encode(raw).decode()}]}).encode()
            head = f"POST /classify HTTP/1.1\r\nHost: bench\r\n{JSON}Content-Length: {len(body)}\r\n\r\n"
            start = time.perf_counter()
            writer.write(head.encode() + body)
            status = await reader.readuntil(b"\r\n")
            headers = await reader.readuntil(b"\r\n\r\n")
            length = next(
                int(line.split(b":")[1])
                for line in headers.split(b"\r\n")
                if line.lower().startswith(b"content-length")
            )
            answer = json.loads(await reader.readexactly(length))
            latencies.append(time.perf_counter() - start)
            assert status.startswith(b"HTTP/1.1 200"), (status, answer)
            labels[index] = answer["results"][0]["label"] == "spam"
    finally:
        writer.close()


def spamc_run(port: int, raws: list, latencies: list[float], verdicts: dict[int, bool]) -> None:
    for index, raw in raws:
        start = time.perf_counter()
        done = subprocess.run(["spamc", "-d", "127.0.0.1", "-p", str(port), "-x", "-c"], input=raw, capture_output=True)
        latencies.append(time.perf_counter() - start)
        assert done.returncode in (0, 1), done.stderr
        verdicts[index] = done.returncode == 1


def run_contender(name: str, clients: int, ports: tuple[int, int], raws: list[bytes], seen: dict):
    """One pass of every message through `name` with `clients` clients: (wall seconds, latencies in seconds)."""
    latencies: list[float] = []
    verdicts = seen.setdefault(name, {})
    work = list(enumerate(raws))
    shares = [work[i::clients] for i in range(clients)]
    start = time.perf_counter()
    if name == "spamc":
        spamc_run(ports[1], work, latencies, verdicts)
    else:

        async def run():
            client = spamd_client if name == "spamd" else http_client
            port = ports[1] if name == "spamd" else ports[0]
            await asyncio.gather(*(client(port, share, latencies, verdicts) for share in shares))

        asyncio.run(run())
    return time.perf_counter() - start, latencies


async def bad_clients(port: int, stalled: int, hold_s: float) -> dict:
    """Stalled bodies, stalled headers and pipelined PINGs at once; how each ended, and a CHECK meanwhile."""

    async def one(data: bytes, close_after: bool) -> str:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(data)
        if close_after:
            writer.write_eof()
        try:
            answer = await asyncio.wait_for(reader.read(), hold_s)
        except TimeoutError:
            return "still open"
        finally:
            writer.close()
        first = answer.split(b"\r\n", 1)[0].split(b" ")  # SPAMD/1.x CODE NAME ...
        return first[2].decode() if answer.startswith(b"SPAMD/") and len(first) > 2 else "closed, no answer"

    body_head = f"CHECK SPAMC/1.5\r\nContent-length: {MAX_MESSAGE_BYTES}\r\n\r\n".encode()
    kinds = {
        "stalled body": (body_head + b"x" * (MAX_MESSAGE_BYTES - 1024), False, stalled),
        "stalled header": (b"CHECK SPAMC/1.5\r\nContent-length: 100\r\n", False, stalled),
        "10,000 pipelined PINGs": (b"PING SPAMC/1.5\r\n\r\n" * 10_000, False, 8),
    }
    tasks = {
        name: [asyncio.ensure_future(one(data, close)) for _ in range(n)] for name, (data, close, n) in kinds.items()
    }
    await asyncio.sleep(1)
    good = await one(spamd_check(b"Subject: hello\r\n\r\nSee you at noon?\r\n"), True)
    ends = {name: dict(sorted(_count([await t for t in group]).items())) for name, group in tasks.items()}
    return {"ends": ends, "check_meanwhile": good}


def _count(items: list[str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for item in items:
        counts[item] = counts.get(item, 0) + 1
    return counts


def memory_under_bad_clients(server_pid: int, port: int, stalled: int, hold_s: float) -> dict:
    idle = rss_mib(server_pid)
    peak = idle
    done = False

    async def sample():
        nonlocal peak
        while not done:
            peak = max(peak, rss_mib(server_pid))
            await asyncio.sleep(0.1)

    async def run():
        nonlocal done
        sampler = asyncio.ensure_future(sample())
        try:
            return await bad_clients(port, stalled, hold_s)
        finally:
            done = True
            await sampler

    outcome = asyncio.run(run())
    return {
        "rss_idle_mib": round(idle, 1),
        "rss_peak_mib": round(peak, 1),
        "rss_after_mib": round(rss_mib(server_pid), 1),
        **outcome,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=count, default=48)
    parser.add_argument("--rounds", type=count, default=3)
    parser.add_argument("--clients", type=count, default=8)
    parser.add_argument("--weights", choices=("gpt2", "tiny"), default="gpt2")
    parser.add_argument("--stalled", type=count, default=11, help="stalled connections of each kind (the memory part)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    require_shared_data()
    if not CORPUS.is_dir():
        raise SystemExit(f"needs the SpamAssassin public corpus under {CORPUS} (SPAMGPT_SHARED_DATA)")
    if shutil.which("spamc") is None:
        raise SystemExit("needs Debian's spamc (apt-get install spamc)")
    raws = sample_messages(args.messages, args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = cached_random_checkpoint() if args.weights == "gpt2" else tiny_checkpoint(Path(tmp) / "tiny")
        spamd_port = free_port()
        settings = {"spamd_port": spamd_port, "request_timeout_s": 600, "request_arrival_timeout_s": 10}
        with live_server(checkpoint, Path(tmp) / "server.log", **settings) as (url, server):
            ports = (int(url.rsplit(":", 1)[1]), spamd_port)
            contenders = [("spamc", 1), ("spamd", 1), ("http", 1), ("spamd", args.clients), ("http", args.clients)]
            seen: dict = {}
            for name, clients in contenders:  # warm-up, untimed
                run_contender(name, clients, ports, raws[:4], {})
            timings: dict = {c: [] for c in contenders}
            for r in range(args.rounds):
                for name, clients in contenders[r % len(contenders) :] + contenders[: r % len(contenders)]:
                    timings[(name, clients)].append(run_contender(name, clients, ports, raws, seen))
                    print(f"round {r + 1}: {name} x{clients} {timings[(name, clients)][-1][0]:.1f} s", flush=True)
            assert seen["spamd"] == seen["http"] == seen["spamc"], "a spamd verdict differs from HTTP's label"
            memory = memory_under_bad_clients(server.pid, spamd_port, args.stalled, hold_s=30)
    rows = []
    for (name, clients), runs in timings.items():
        latencies = sorted(x for _, lat in runs for x in lat)
        wall = sum(w for w, _ in runs)
        rows.append(
            {
                "contender": f"{name} x{clients}",
                "messages": len(latencies),
                "messages_per_s": round(len(latencies) / wall, 2),
                "p50_ms": round(statistics.median(latencies) * 1000, 1),
                "p95_ms": round(latencies[int(0.95 * (len(latencies) - 1))] * 1000, 1),
            }
        )
    by_name = {row["contender"]: row for row in rows}
    for row in rows:
        http = by_name[f"http x{row['contender'].split(' x')[1]}"]
        row["throughput_vs_http"] = round(row["messages_per_s"] / http["messages_per_s"], 2)
    print_table(rows)
    print(json.dumps(memory, indent=2))
    result = {
        "weights": "GPT-2 124M architecture, random weights" if args.weights == "gpt2" else "tiny preset, random",
        "messages": args.messages,
        "rounds": args.rounds,
        "spam_verdicts": sum(seen["http"].values()),
        "rows": rows,
        "memory": memory,
    }
    print(write_result(f"spamd_{args.weights}", result))


def tiny_checkpoint(directory: Path) -> Path:
    """The tiny preset with seeded random weights and the real BPE files."""
    torch.manual_seed(0)
    config = GPTConfig.from_preset("tiny")
    card = ModelCard(labels=("ham", "spam"), max_tokens=config.block_size, threshold=None, base_model="tiny (random)")
    return save_checkpoint(directory, GPTClassifier(config), BPE_DIR, card)


if __name__ == "__main__":
    main()
