"""Stalled and slow clients held against a real server: its resident memory and /health latency meanwhile.

    python -m benchmarks.stalled [--connections 200] [--hold-s 14] [--checkpoint DIR]

Two servers in one run, each `python -m app` on loopback serving the GPT-2 124M architecture with random weights
(benchmarks.common.cached_random_checkpoint; or --checkpoint), float32:
- bounded: the default limits (request_arrival_timeout_s 10, max_body_bytes_in_flight 32 MiB, max_connections 512);
- unbounded: arrival timeout, body budget and connection limit too large to matter (uvicorn's own behaviour).
Against each, `connections` stalled clients at once, a third of each kind:
(a) a POST declaring Content-Length 100 that sends 20 bytes and stops; (b) request headers sent a byte every 2 s;
(c) a POST declaring max_body_bytes that sends all but 1 KiB of it and stops.
Measured: the server's VmRSS (every 0.25 s: idle, peak while held, at the end of the hold), /health latency on fresh
connections (idle and while held), and how each stalled connection ended (408, 429, closed by the server, or still
open at the end of the hold). Loopback only; bounded in time; stops by itself.
"""

import argparse
import asyncio
import contextlib
import statistics
import tempfile
import time
from collections import Counter
from pathlib import Path

from app.settings import Settings
from benchmarks.common import (
    cached_random_checkpoint,
    count,
    duration,
    print_table,
    require_checkpoint,
    require_shared_data,
    rss_mib,
    write_result,
)
from tests.live_server import live_server

HEAD = "POST /classify HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
UNBOUNDED = dict(request_arrival_timeout_s=10**6, max_body_bytes_in_flight=10**12, max_connections=10**6)
HEALTH_PROBES = 20


async def health_latency_ms(host: str, port: int) -> float:
    """One GET /health on a fresh connection, to the end of its answer; milliseconds (inf when not 200)."""
    start = time.perf_counter()
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(b"GET /health HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
        answer = await asyncio.wait_for(reader.read(), 30)
    finally:
        writer.close()
    return (time.perf_counter() - start) * 1000 if answer.startswith(b"HTTP/1.1 200") else float("inf")


async def health_percentiles(host: str, port: int) -> dict:
    latencies = sorted([await health_latency_ms(host, port) for _ in range(HEALTH_PROBES)])
    return {"p50_ms": statistics.median(latencies), "max_ms": latencies[-1]}


async def stalled_client(host: str, port: int, kind: str, max_body_bytes: int, until: float) -> str:
    """Open a connection, stall it the `kind` way until `until` (event loop time); how it ended."""
    loop = asyncio.get_running_loop()
    reader, writer = await asyncio.open_connection(host, port)
    try:
        if kind == "partial-body":
            writer.write(f"{HEAD}Content-Length: 100\r\n\r\n".encode() + b"x" * 20)
        elif kind == "large-body":
            writer.write(f"{HEAD}Content-Length: {max_body_bytes}\r\n\r\n".encode() + b"x" * (max_body_bytes - 1024))
        answer = asyncio.ensure_future(reader.read())  # the server's answer, if any, then its close
        trickle = HEAD.encode()
        while not answer.done() and loop.time() < until:
            if kind == "trickled-headers" and trickle:
                writer.write(trickle[:1])
                trickle = trickle[1:]
            # writes to a server that stopped reading (a refused large body) time out or fail: that is the point
            with contextlib.suppress(TimeoutError, OSError):
                await asyncio.wait_for(writer.drain(), max(0.01, until - loop.time()))
            await asyncio.wait([answer], timeout=min(2.0, max(0.0, until - loop.time())))
        if not answer.done():
            answer.cancel()
            return "open"
        data = answer.result()
        return data.split(b" ", 2)[1].decode() if data.startswith(b"HTTP/1.1 ") else "closed"
    except (ConnectionError, OSError):
        return "reset"
    finally:
        writer.close()


async def sample_rss(pid: int, samples: list[float], stop: asyncio.Event) -> None:
    while not stop.is_set():
        samples.append(rss_mib(pid))
        await asyncio.sleep(0.25)


async def hold(url: str, pid: int, connections: int, hold_s: float, max_body_bytes: int) -> dict:
    host, port = url.removeprefix("http://").split(":")
    port = int(port)
    idle_rss = rss_mib(pid)
    idle_health = await health_percentiles(host, port)
    loop = asyncio.get_running_loop()
    until = loop.time() + hold_s
    kinds = ["partial-body", "trickled-headers", "large-body"]
    samples, stop = [], asyncio.Event()
    sampler = asyncio.create_task(sample_rss(pid, samples, stop))
    clients = [
        asyncio.create_task(stalled_client(host, port, kinds[i % 3], max_body_bytes, until)) for i in range(connections)
    ]
    await asyncio.sleep(min(3.0, hold_s / 3))  # the stalled clients are all connected and have sent what they send
    held_health = await health_percentiles(host, port)
    held_rss = rss_mib(pid)
    endings = await asyncio.gather(*clients)
    end_rss = rss_mib(pid)
    stop.set()
    await sampler
    by_kind = {kind: dict(Counter(endings[i::3])) for i, kind in enumerate(kinds)}
    return {
        "rss_idle_mib": idle_rss,
        "rss_held_mib": held_rss,
        "rss_peak_mib": max(samples),
        "rss_end_of_hold_mib": end_rss,
        "health_idle": idle_health,
        "health_held": held_health,
        "endings": by_kind,
        "still_open_at_end": sum(e == "open" for e in endings),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--connections", type=count, default=200)
    parser.add_argument("--hold-s", type=duration, default=14.0, help="past the default 10 s arrival timeout")
    parser.add_argument("--checkpoint", type=Path, default=None)
    args = parser.parse_args()
    if args.checkpoint is not None:
        require_checkpoint(parser, "--checkpoint", args.checkpoint, "model.safetensors")
    if args.checkpoint is None:
        require_shared_data()
    checkpoint = args.checkpoint or cached_random_checkpoint()
    defaults = Settings(checkpoint_dir=checkpoint, device="cpu")
    results = {}
    for name, settings in (("bounded", {}), ("unbounded", UNBOUNDED)):
        with (
            tempfile.TemporaryDirectory() as tmp,
            live_server(checkpoint, Path(tmp) / "server.log", **settings) as (url, server),
        ):
            results[name] = asyncio.run(hold(url, server.pid, args.connections, args.hold_s, defaults.max_body_bytes))
    rows = [
        {
            "server": name,
            "RSS idle MiB": r["rss_idle_mib"],
            "RSS held MiB": r["rss_held_mib"],
            "RSS peak MiB": r["rss_peak_mib"],
            "RSS end MiB": r["rss_end_of_hold_mib"],
            "/health p50 ms idle": r["health_idle"]["p50_ms"],
            "/health p50 ms held": r["health_held"]["p50_ms"],
            "/health max ms held": r["health_held"]["max_ms"],
            "open at end": r["still_open_at_end"],
        }
        for name, r in results.items()
    ]
    print_table(rows)
    for name, r in results.items():
        print(f"{name}: endings by kind {r['endings']}")
    config = {
        "connections": args.connections,
        "hold_s": args.hold_s,
        "kinds": "a third each: partial-body (20 of 100 bytes), trickled-headers (1 byte / 2 s), large-body (max-1KiB)",
        "bounded": {k: getattr(defaults, k) for k in UNBOUNDED},
        "unbounded": UNBOUNDED,
        "checkpoint": str(checkpoint),
    }
    print(f"written to {write_result('stalled', {'config': config, 'results': results})}")


if __name__ == "__main__":
    main()
