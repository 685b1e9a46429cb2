"""Serving speed after a live model change, against a server that had none, in one run.

    python -m benchmarks.change_speed [--precisions float32,int8,bfloat16] [--requests 16] [--rounds 3]

For each precision, two servers (`python -m app`, tests.live_server, the app's defaults: torch on every core) serve
the same GPT-2 124M checkpoint with random weights (benchmarks/checkpoints/gpt2-random; OpenAI's weights are not
available here, the compute is the same). One, "changed", first has a model added and removed through the admin API
(PUT then DELETE /admin/models/extra, a second 124M checkpoint loaded and warmed up while serving); the other,
"unchanged", has none. Each is then timed over the same --requests requests of 32 real SMS texts, sent one after
another (each answered before the next is sent: every request one batch of 32, HTTP a small share of the time), the
two servers alternating --rounds times so that other load on the machine hits both alike. Target: the changed
server's texts per second at least 0.95 of the unchanged one's. bfloat16 runs only where the CPU has it natively.

Why it can differ: torch's intra-op thread pool (OpenMP) belongs to the thread that calls it, and once two threads'
pools live in one process, libgomp counts more threads than cores and every pool's idle threads stop spinning
between parallel regions. Each server's OS thread count after its change is recorded beside its speed.
"""

import argparse
import os
import tempfile
import time
from pathlib import Path

import httpx

from benchmarks.common import (
    SECOND_RANDOM_CHECKPOINT,
    cached_random_checkpoint,
    count,
    print_table,
    require_shared_data,
    sample_texts,
    write_result,
)
from tests.live_server import live_server
from training.runtime.precision import cpu_info

TARGET = 0.95  # changed / unchanged texts per second
BATCH = 32  # texts per request: the app's default max_batch_size
KEY = "benchmark-key"
# the server's settings for each precision
PRECISIONS = {"float32": {"dtype": "float32"}, "int8": {"quantize_int8": "true"}, "bfloat16": {"dtype": "bfloat16"}}


def change(client: httpx.Client, checkpoint: Path) -> None:
    """A model added and removed while serving, through the admin API."""
    added = client.put("/admin/models/extra", json={"checkpoint": str(checkpoint)}, timeout=300)
    assert added.status_code == 201, added.text
    removed = client.delete("/admin/models/extra")
    assert removed.status_code == 200, removed.text


def timed_pass(client: httpx.Client, requests: list[list[str]]) -> float:
    """Seconds to send `requests` one after another, each answered 200 before the next."""
    start = time.perf_counter()
    for texts in requests:
        response = client.post("/classify", json={"texts": texts})
        assert response.status_code == 200, response.text
    return time.perf_counter() - start


def measure(precision: str, checkpoints: list[Path], requests: list[list[str]], rounds: int, tmp: Path) -> dict:
    """Texts per second of the changed and the unchanged server in `precision`, interleaved over `rounds`."""
    settings = {"models": f"spam={checkpoints[0]}", "api_key": KEY, **PRECISIONS[precision]}
    texts = sum(map(len, requests))
    seconds: dict[str, list[float]] = {"changed": [], "unchanged": []}
    threads = {}
    with (
        live_server(None, tmp / f"{precision}-changed.log", 600, **settings) as (changed_url, changed),
        live_server(None, tmp / f"{precision}-unchanged.log", 600, **settings) as (unchanged_url, unchanged),
    ):
        servers = {"changed": (changed_url, changed.pid), "unchanged": (unchanged_url, unchanged.pid)}
        clients = {
            name: httpx.Client(base_url=url, headers={"X-API-Key": KEY}, timeout=120, trust_env=False)
            for name, (url, _) in servers.items()
        }
        with clients["changed"], clients["unchanged"]:
            change(clients["changed"], checkpoints[1])
            for name, client in clients.items():
                timed_pass(client, requests[:2])  # warm-up, untimed
                threads[name] = len(os.listdir(f"/proc/{servers[name][1]}/task"))
            for _ in range(rounds):
                for name, client in clients.items():
                    seconds[name].append(timed_pass(client, requests))
    speed = {name: rounds * texts / sum(values) for name, values in seconds.items()}
    return {
        "precision": precision,
        "changed_texts_per_s": speed["changed"],
        "unchanged_texts_per_s": speed["unchanged"],
        "ratio": speed["changed"] / speed["unchanged"],
        "changed_os_threads": threads["changed"],
        "unchanged_os_threads": threads["unchanged"],
        "seconds": seconds,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--precisions", default="float32,int8,bfloat16", help="comma-separated, of " + ",".join(PRECISIONS)
    )
    parser.add_argument("--requests", type=count, default=16, help=f"requests of {BATCH} texts per timed pass")
    parser.add_argument("--rounds", type=count, default=3, help="timed passes per server, alternating")
    parser.add_argument("--seed", type=int, default=0, help="which texts")
    args = parser.parse_args(argv)
    precisions = args.precisions.split(",")
    if unknown := set(precisions) - set(PRECISIONS):
        parser.error(f"--precisions: unknown {sorted(unknown)}; known: {sorted(PRECISIONS)}")
    if not cpu_info().native_bfloat16 and "bfloat16" in precisions:
        precisions.remove("bfloat16")
        print("bfloat16 skipped: this CPU emulates it")
    require_shared_data()
    checkpoints = [cached_random_checkpoint(), cached_random_checkpoint(SECOND_RANDOM_CHECKPOINT, seed=1)]
    texts = sample_texts(args.requests * BATCH, args.seed)
    requests = [texts[i : i + BATCH] for i in range(0, len(texts), BATCH)]
    with tempfile.TemporaryDirectory() as tmp:
        runs = [measure(precision, checkpoints, requests, args.rounds, Path(tmp)) for precision in precisions]
    checks = {f"{run['precision']}_ratio_at_least_{TARGET}": run["ratio"] >= TARGET for run in runs}
    write_result(
        "change_speed",
        {
            "settings": {**vars(args), "model": "gpt2 124M, random weights", "target": TARGET},
            "runs": runs,
            "checks": checks,
        },
    )
    print_table([{k: v for k, v in run.items() if k != "seconds"} for run in runs])
    print("checks:", checks)


if __name__ == "__main__":
    main()
