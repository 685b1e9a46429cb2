"""Replacing a model while clients use it: the latency a steady client stream sees during replacements, against the
same stream without them; and the server's resident memory through replacements and a removal.

    python -m benchmarks.model_swap [--replacements 20] [--rounds 4] [--rate 8] [--steady-seconds S] [--torch-threads 1]

The server is a real uvicorn subprocess on loopback (default settings, an API key, `torch_threads` torch threads)
serving one model, "spam": the GPT-2 124M architecture with random weights (benchmarks/checkpoints/gpt2-random, made
by benchmarks.common.cached_random_checkpoint), float32. Replacements alternate between that checkpoint and a second
one of other random weights (seed 1): each is a whole 124M model loaded from disk, checked and warmed up (the
costliest replacement; a sibling on the same base would load the same way and then drop its copy of the prefix).

A steady stream of requests (one real SMS message each, sent at fixed times, `rate` a second, whatever the answers)
runs through the whole measurement, which alternates `rounds` times: a swapping phase of replacements / rounds
replacements (PUT /admin/models/spam, one after the other), then a steady phase without any, as long as the swapping
phase took (or --steady-seconds, where replacements are slow: each is a whole model's load). Interleaving puts both
conditions under the same load from the rest of the machine. Latencies are reported per condition: p50, p99, max;
the target is that p99 during replacements stays within 1.5x of p99 without.

Checks: every request is answered 200 by the model "spam"; /health, polled every 0.2 s throughout, answers 200 every
time; each replacement answers 200. Memory: VmRSS of the server after each replacement, and around an extra model
added (PUT) and removed (DELETE) at the end, after which RSS must come back to within 10% of the added model's
size of where it was before it (the admin API answers once the memory is given back).
"""

import argparse
import asyncio
import random
import statistics
import tempfile
import time
from pathlib import Path

import httpx

from benchmarks.common import (
    SECOND_RANDOM_CHECKPOINT,
    cached_random_checkpoint,
    count,
    duration,
    print_table,
    require_shared_data,
    rss_mib,
    sample_texts,
    write_result,
)
from tests.live_server import live_server

KEY = "benchmark-key"
P99_TARGET = 1.5  # p99 during replacements at most this many times p99 without
RSS_SLACK = 0.10  # after a removal, RSS within this share of the removed model's size of where it was


def percentiles(values: list[float]) -> dict:
    """p50, p99 and max of `values` in milliseconds (p99: statistics.quantiles' inclusive method, 100 cut points)."""
    cuts = statistics.quantiles(values, n=100, method="inclusive")
    return {"requests": len(values), "p50_ms": 1000 * cuts[49], "p99_ms": 1000 * cuts[98], "max_ms": 1000 * max(values)}


class Stream:
    """Requests sent at fixed times, `rate` a second, each tagged with the phase it was sent in."""

    def __init__(self, client: httpx.AsyncClient, texts: list[str], rate: float):
        self.client, self.texts, self.rate = client, texts, rate
        self.phase, self.latencies, self.failures = "steady", {"steady": [], "swapping": []}, []
        self._sent: list[asyncio.Task] = []

    async def run(self, stop: asyncio.Event) -> None:
        start, n = time.monotonic(), 0
        while not stop.is_set():
            self._sent.append(asyncio.create_task(self._one(self.texts[n % len(self.texts)], self.phase)))
            n += 1
            await asyncio.sleep(max(0.0, start + n / self.rate - time.monotonic()))
        await asyncio.gather(*self._sent)

    async def _one(self, text: str, phase: str) -> None:
        sent = time.monotonic()
        try:
            response = await self.client.post("/classify", json={"texts": [text]})
        except httpx.HTTPError as exc:
            self.failures.append(f"{type(exc).__name__}: {exc}")
            return
        elapsed = time.monotonic() - sent
        if response.status_code != 200 or response.json()["model"] != "spam":
            self.failures.append(f"{response.status_code}: {response.text[:200]}")
        self.latencies[phase].append(elapsed)


async def poll_health(client: httpx.AsyncClient, stop: asyncio.Event, answers: list[int]) -> None:
    while not stop.is_set():
        answers.append((await client.get("/health")).status_code)
        await asyncio.sleep(0.2)


async def put(client: httpx.AsyncClient, name: str, checkpoint: Path) -> dict:
    started = time.monotonic()
    response = await client.put(f"/admin/models/{name}", json={"checkpoint": str(checkpoint)}, timeout=300)
    assert response.status_code in (200, 201), response.text
    return {"seconds": time.monotonic() - started, "revision": response.json()["model"]["revision"]}


async def measure(url: str, pid: int, texts: list[str], checkpoints: list[Path], args: argparse.Namespace) -> dict:
    headers = {"X-API-Key": KEY}
    # a connection per request: reusing one the server is closing for idleness (uvicorn's keep-alive timeout) is a
    # transport error of the client's making
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=60, limits=limits, trust_env=False) as client:
        stop, health = asyncio.Event(), []
        stream = Stream(client, texts, args.rate)
        background = [asyncio.create_task(stream.run(stop)), asyncio.create_task(poll_health(client, stop, health))]
        await asyncio.sleep(2)  # the stream settles before anything is measured
        stream.latencies["steady"].clear()
        replacements, rss = [], [rss_mib(pid)]
        per_round = args.replacements // args.rounds
        for _ in range(args.rounds):
            stream.phase, started = "swapping", time.monotonic()
            for _ in range(per_round):
                replacements.append(await put(client, "spam", checkpoints[(len(replacements) + 1) % 2]))
                rss.append(rss_mib(pid))
            stream.phase = "steady"
            await asyncio.sleep(args.steady_seconds or time.monotonic() - started)
        stop.set()
        await asyncio.gather(*background)
        before_add = rss_mib(pid)
        await put(client, "extra", checkpoints[1])
        after_add = rss_mib(pid)
        removed = await client.delete("/admin/models/extra")
        assert removed.status_code == 200, removed.text
        after_remove = rss_mib(pid)
    return {
        "steady": percentiles(stream.latencies["steady"]),
        "swapping": percentiles(stream.latencies["swapping"]),
        "failed_requests": stream.failures,
        "health_answers": {str(status): health.count(status) for status in sorted(set(health))},
        "replacements": replacements,
        "rss_mib_after_each_replacement": rss,
        "removal_rss_mib": {"before_add": before_add, "after_add": after_add, "after_remove": after_remove},
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--replacements", type=count, default=20)
    parser.add_argument("--rounds", type=count, default=4, help="swapping and steady phases alternate this many times")
    parser.add_argument("--rate", type=duration, default=8.0, help="requests a second, one text each")
    parser.add_argument("--steady-seconds", type=duration, help="each steady phase's length (default: the swapping's)")
    parser.add_argument("--torch-threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--name", default="model_swap", help="results/<name>.json")
    args = parser.parse_args(argv)
    if args.replacements % args.rounds:
        parser.error(f"--replacements {args.replacements} must be a multiple of --rounds {args.rounds}")
    require_shared_data()
    checkpoints = [cached_random_checkpoint(), cached_random_checkpoint(SECOND_RANDOM_CHECKPOINT, seed=1)]
    texts = sample_texts(500, args.seed)
    random.Random(args.seed).shuffle(texts)
    settings = {"models": f"spam={checkpoints[0]}", "api_key": KEY, "torch_threads": args.torch_threads}
    with tempfile.TemporaryDirectory() as tmp, live_server(None, Path(tmp) / "server.log", 600, **settings) as (url, s):
        result = asyncio.run(measure(url, s.pid, texts, checkpoints, args))
    steady, swapping = result["steady"], result["swapping"]
    ratio = swapping["p99_ms"] / steady["p99_ms"]
    memory = result["removal_rss_mib"]
    added = memory["after_add"] - memory["before_add"]
    checks = {
        "every_request_answered_200": not result["failed_requests"],
        "health_200_throughout": set(result["health_answers"]) == {"200"},
        f"p99_ratio_at_most_{P99_TARGET}": ratio <= P99_TARGET,
        "removal_gives_memory_back": memory["after_remove"] - memory["before_add"] <= RSS_SLACK * added,
    }
    write_result(
        args.name,
        {
            "settings": {
                **vars(args),
                "model": "gpt2 124M, random weights, float32",
                "checkpoints": list(map(str, checkpoints)),
            },
            **result,
            "p99_ratio": ratio,
            "checks": checks,
        },
    )
    print_table([{"condition": name, **result[name]} for name in ("steady", "swapping")])
    print(f"p99 during replacements / without: {ratio:.2f} (target <= {P99_TARGET})")
    seconds, rss = [r["seconds"] for r in result["replacements"]], result["rss_mib_after_each_replacement"]
    print(f"{len(seconds)} replacements, median {statistics.median(seconds):.2f} s; /health {result['health_answers']}")
    print(f"RSS MiB through the replacements: {min(rss):.0f}..{max(rss):.0f}")
    print(f"RSS MiB, an extra model: before {memory['before_add']:.0f}, added {memory['after_add']:.0f}, ", end="")
    print(f"removed {memory['after_remove']:.0f}")
    print("checks:", checks)


if __name__ == "__main__":
    main()
