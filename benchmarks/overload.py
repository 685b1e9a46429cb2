"""Ten times the server's capacity, offered open-loop: does it shed load cleanly and stay within its bounds?

    python -m benchmarks.overload [--duration 40] [--factor 10] [--concurrency 8] [--torch-threads 1]

The server is a real uvicorn subprocess on loopback with the default settings but one torch thread (see
--torch-threads), serving the GPT-2 124M architecture with random weights (benchmarks/checkpoints/gpt2-random, made
by benchmarks.common.cached_random_checkpoint), float32: CPU-bound, as in production. Each request is one real SMS
message.

1. Capacity: closed loop, `concurrency` clients each sending its next request when the last is answered, for
   `capacity_seconds`: requests/s at saturation.
2. Overload: requests fired at factor x capacity for `duration` seconds at fixed times, whatever the answers
   (open loop), each with a client timeout of request_timeout_s + 20 s. Then it waits for the last answers.

Checks: only 200, 429, 503 and 504 come back (503: uvicorn's answer past max_connections open connections, told
apart from any other 503 by its body; 504: the request_timeout_s queue deadline); no request hits the client
timeout; p99 latency of accepted requests is bounded (request_timeout_s + LATENCY_SLACK_S); the server's resident
memory (VmRSS from /proc/<pid>/status, sampled every 0.5 s) does not grow over the second half of the overload.
Loopback only; bounded in time and requests; stops by itself.
"""

import argparse
import asyncio
import json
import random
import statistics
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from app.settings import Settings
from benchmarks.common import (
    SMS_FILE,
    cached_random_checkpoint,
    count,
    duration,
    print_table,
    require_shared_data,
    rss_mib,
    write_result,
)
from tests.live_server import live_server
from training.finetune.data import deduplicate, load_sms_spam

CLIENT_SLACK_S = 20  # past the server's own deadline, a client timeout means the server failed to answer
# request_timeout_s bounds the queue wait only; after it come one batch's forward pass (max_batch_size texts, ~1.6 s
# at the capacity measured here) and reading, tokenizing and answering under load.
LATENCY_SLACK_S = 5
# uvicorn's plain-text answer past --limit-concurrency (SPAMGPT_MAX_CONNECTIONS): load shed at the door
CONNECTION_LIMIT_BODY = b"Service Unavailable"
RSS_GROWTH_LIMIT = 0.05  # "flat": the second half of the overload adds under 5% to the first half's peak


async def post(address: tuple[str, int], body: bytes, timeout_s: float) -> tuple[str, float, dict]:
    """POST /classify on a connection of its own: (outcome, seconds, response headers); outcome is the status code,
    "timeout" or the error's name. Plain asyncio streams, not httpx: at hundreds of requests a second on a shared
    core, httpx's own overhead made the generator fall seconds behind its schedule."""
    host, port = address
    head = f"POST /classify HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}"
    request = f"{head}\r\nConnection: close\r\n\r\n".encode() + body
    start = time.perf_counter()
    try:
        async with asyncio.timeout(timeout_s):
            reader, writer = await asyncio.open_connection(host, port)
            try:
                writer.write(request)
                status = (await reader.readline()).split()[1].decode()
                headers = {}
                while (line := await reader.readline()) not in (b"\r\n", b""):
                    name, _, value = line.decode("latin-1").partition(":")
                    headers[name.strip().lower()] = value.strip()
                body = await reader.readexactly(int(headers.get("content-length", 0)))
                if status == "503" and body != CONNECTION_LIMIT_BODY:
                    status = "503 not the connection limit"  # e.g. draining: a failed check, not load shedding
            finally:
                writer.close()
    except TimeoutError:
        return "timeout", time.perf_counter() - start, {}
    except (OSError, IndexError, asyncio.IncompleteReadError) as exc:
        return type(exc).__name__, time.perf_counter() - start, {}
    return status, time.perf_counter() - start, headers


async def capacity(address: tuple[str, int], bodies: list[bytes], concurrency: int, seconds: float) -> float:
    """Answered 200s per second with `concurrency` closed-loop clients."""
    done = 0
    stop = time.perf_counter() + seconds

    async def one_client(offset: int) -> None:
        nonlocal done
        i = offset
        while time.perf_counter() < stop:
            outcome, _, _ = await post(address, bodies[i % len(bodies)], 60)
            assert outcome == "200", f"capacity run got {outcome}: the server is not keeping up unloaded"
            done, i = done + 1, i + concurrency

    start = time.perf_counter()
    await asyncio.gather(*(one_client(k) for k in range(concurrency)))
    return done / (time.perf_counter() - start)


async def offer(
    address: tuple[str, int], bodies: list[bytes], rate: float, seconds: float, timeout_s: float
) -> tuple[float, float, list]:
    """Fire rate x seconds requests at fixed times (open loop): the seconds firing took, the most any request
    was fired late (the generator's own lag, which would understate the offered load), and every outcome."""
    loop = asyncio.get_running_loop()
    start, tasks, lag = loop.time(), [], 0.0
    for i in range(round(rate * seconds)):
        await asyncio.sleep(max(0.0, start + i / rate - loop.time()))
        lag = max(lag, loop.time() - (start + i / rate))
        tasks.append(asyncio.create_task(post(address, bodies[i % len(bodies)], timeout_s)))
    fired_s = loop.time() - start
    return fired_s, lag, await asyncio.gather(*tasks)


async def sample_rss(pid: int, every_s: float, samples: list[tuple[float, float]]) -> None:
    start = time.perf_counter()
    while True:
        samples.append((time.perf_counter() - start, rss_mib(pid)))
        await asyncio.sleep(every_s)


def server_metrics(text: str) -> dict:
    """The server's own account from /metrics: mean queue wait and forward time, mean batch size, dropped texts."""
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
    }
    means = {}
    for name in ("spamgpt_queue_wait_seconds", "spamgpt_inference_seconds", "spamgpt_batch_size"):
        count = samples[(f"{name}_count", ())]
        means[f"{name}_mean"] = samples[(f"{name}_sum", ())] / count if count else None
    dropped = {
        dict(labels)["reason"]: v for (name, labels), v in samples.items() if name == "spamgpt_dropped_texts_total"
    }
    return {**means, "batches": samples[("spamgpt_batch_size_count", ())], "dropped_texts": dropped}


def percentile(values: list[float], q: float) -> float | None:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else None


async def run(url: str, pid: int, texts: list[str], args: argparse.Namespace, settings: Settings) -> dict:
    address = ("127.0.0.1", int(url.rsplit(":", 1)[1]))
    bodies = [json.dumps({"texts": [text]}).encode() for text in texts]
    rss_start = rss_mib(pid)
    requests_per_s = await capacity(address, bodies, args.concurrency, args.capacity_seconds)
    rate = args.factor * requests_per_s
    samples: list[tuple[float, float]] = []
    sampler = asyncio.create_task(sample_rss(pid, 0.5, samples))
    timeout_s = settings.request_timeout_s + CLIENT_SLACK_S
    fired_s, lag_s, outcomes = await offer(address, bodies, rate, args.duration, timeout_s)
    sampler.cancel()
    await asyncio.sleep(1)  # let the server settle after the last answer
    rss_end = rss_mib(pid)
    async with httpx.AsyncClient(base_url=url, trust_env=False) as client:
        healthy = (await client.get("/health")).status_code == 200
        metrics = server_metrics((await client.get("/metrics")).text)
    return {"generator_max_lag_s": lag_s, "server_metrics": metrics} | summarize(
        requests_per_s, rate, fired_s, outcomes, samples, (rss_start, rss_end), healthy, settings
    )


def summarize(
    requests_per_s: float,
    rate: float,
    fired_s: float,
    outcomes: list,
    samples: list[tuple[float, float]],
    rss_start_end: tuple[float, float],
    healthy: bool,
    settings: Settings,
) -> dict:
    rss_start, rss_end = rss_start_end
    counts = Counter(outcome for outcome, _, _ in outcomes)
    accepted = [seconds for outcome, seconds, _ in outcomes if outcome == "200"]
    refused = [headers for outcome, _, headers in outcomes if outcome == "429"]
    first_half = [rss for t, rss in samples if t <= fired_s / 2]
    second_half = [rss for t, rss in samples if t > fired_s / 2]
    growth = (max(second_half) - max(first_half)) / max(first_half)
    p99 = percentile(accepted, 99)
    latency_bound_s = settings.request_timeout_s + LATENCY_SLACK_S
    checks = {
        "only_200_429_503_504": set(counts) <= {"200", "429", "503", "504"},
        "no_client_timeout": counts["timeout"] == 0,
        "every_429_has_retry_after": all("retry-after" in headers for headers in refused),
        "p99_accepted_within_deadline_plus_slack": p99 is not None and p99 <= latency_bound_s,
        "rss_flat_second_half": growth < RSS_GROWTH_LIMIT,
        "healthy_after": healthy,
    }
    n = len(outcomes)
    return {
        "capacity_requests_per_s": requests_per_s,
        "offered_requests_per_s": rate,
        "achieved_offered_requests_per_s": n / fired_s,
        "requests": n,
        "duration_s": fired_s,
        "outcomes": dict(counts),
        "accepted_requests_per_s": len(accepted) / fired_s,
        "share": {outcome: count / n for outcome, count in counts.items()},
        "accepted_latency_s": {
            "p50": percentile(accepted, 50),
            "p99": percentile(accepted, 99),
            "max": max(accepted, default=None),
        },
        "latency_bound_s": latency_bound_s,
        "rss_mib": {
            "start": rss_start,
            "peak": max(rss for _, rss in samples),
            "end": rss_end,
            "first_half_peak": max(first_half),
            "second_half_peak": max(second_half),
        },
        "rss_samples": samples,
        "checks": checks,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=duration, default=40, help="seconds of overload")
    parser.add_argument("--factor", type=duration, default=10, help="offered load as a multiple of capacity")
    parser.add_argument("--concurrency", type=count, default=8, help="closed-loop clients measuring capacity")
    parser.add_argument("--capacity-seconds", type=duration, default=15)
    # One core for the model leaves the other to the server's event loop and to this load generator: on two cores,
    # with torch on both, the generator falls behind and the event loop is starved, which measures the machine.
    parser.add_argument("--torch-threads", type=int, default=1, help="the server's SPAMGPT_TORCH_THREADS")
    parser.add_argument(
        "--max-queue-texts", type=count, help="the server's SPAMGPT_MAX_QUEUE_TEXTS (default: its default)"
    )
    parser.add_argument("--name", default="overload", help="results/<name>.json")
    args = parser.parse_args(argv)
    require_shared_data()
    checkpoint = cached_random_checkpoint()
    texts = deduplicate(load_sms_spam(SMS_FILE)).texts
    random.Random(0).shuffle(texts)
    # The defaults the server runs with, but for the options given
    changed = {"torch_threads": args.torch_threads}
    if args.max_queue_texts is not None:
        changed["max_queue_texts"] = args.max_queue_texts
    settings = Settings(checkpoint_dir=checkpoint, device="cpu", **changed)
    server_log = Path(tempfile.mkdtemp()) / "server.log"
    with live_server(checkpoint, server_log, **changed) as (url, server):
        result = asyncio.run(run(url, server.pid, texts, args, settings))
    result["server_exit_code"] = server.returncode
    result["settings"] = {name: getattr(settings, name) for name in Settings.model_fields if name != "api_key"}
    result["settings"]["checkpoint_dir"] = str(checkpoint)
    result["model"] = "gpt2 124M architecture, random (seeded) weights, float32, real GPT-2 BPE; one SMS per request"
    result["args"] = vars(args)
    rss, latency = result["rss_mib"], result["accepted_latency_s"]
    print_table(
        [
            {
                "capacity req/s": result["capacity_requests_per_s"],
                "offered req/s": result["achieved_offered_requests_per_s"],
                "accepted req/s": result["accepted_requests_per_s"],
                "429 share": result["share"].get("429", 0.0),
                "504 share": result["share"].get("504", 0.0),
                "p50 accepted s": latency["p50"],
                "p99 accepted s": latency["p99"],
                "RSS start/peak/end MiB": f"{rss['start']:.0f} / {rss['peak']:.0f} / {rss['end']:.0f}",
            }
        ]
    )
    print("outcomes:", result["outcomes"])
    print("checks:", result["checks"], f"generator lag {result['generator_max_lag_s']:.2f} s; server log {server_log}")
    print(f"wrote {write_result(args.name, result)}")


if __name__ == "__main__":
    main()
