"""The app over real HTTP against the engine alone, on the same real SMS texts, in one run.

    python -m benchmarks.serve_http [--texts 512] [--seed 0] [--clients 32] [--bulk-size 64] [--bulk-clients 4]
                                    [--precisions float32,int8,bfloat16] [--max-wait-ms MS] [--rounds 1]

- engine: Classifier.tokenize and .predict in this process (tokenize, length-sorted batches at the app's
  default limits, forward, softmax): the most the server could do with these texts. Timed right before and right
  after each timed HTTP pass, and each pass is compared with the mean of its two engine runs, so that other load on
  the machine, and its drift during a run, hit both alike. With --rounds N, each run makes N timed passes on one
  server, the engine timed between them, and reports the pass with the median ratio (every pass under `rounds`).
- http: a uvicorn server started as a subprocess with the image's server command (`python -m app`, which the
  Dockerfile's CMD `spamgpt serve` runs: uvicorn serving app.main:create_app; on 127.0.0.1 and a free port), loaded from
  a GPT-2 124M checkpoint with random weights (OpenAI's are not available here; the compute is the same). Clients are
  asyncio tasks, each with its own keep-alive connection (a minimal HTTP/1.1 client, Connection), each sending its next
  request as soon as the last one is answered, until every text has been sent once (after the same load,
  untimed, as a warm-up):
  - one text per request from --clients clients, with micro-batching on (the default), then off (SPAMGPT_BATCHING=
    false: every request its own forward pass);
  - --bulk-size texts per request from --bulk-clients clients;
  - one text per request with micro-batching again for each other engine of --precisions, each against the engine
    in that precision: the faster the engine, the larger the share of the time the HTTP work takes. On CPU int8
    (SPAMGPT_QUANTIZE_INT8=true) and bfloat16 (SPAMGPT_DTYPE=bfloat16, only where the CPU has it natively); on
    CUDA float16 and bfloat16.
The runs above are in float32 on CPU (SPAMGPT_DTYPE=float32), in the device's default dtype elsewhere.
--max-wait-ms sets how long every server's micro-batcher waits for more texts (SPAMGPT_MAX_WAIT_MS). With one-text
clients that each wait for their answer, the app's default 2 ms lets the clients fall into two cohorts, each batch
holding about half of them (the other half's texts arrive while it runs): a longer wait fills the batches (see
docs/performance.md).
How large the HTTP work is, measured in CPU time, which other load on the machine does not inflate the way it does
wall time: the server process's CPU seconds per text over the timed run (its event loop, tokenizer threads, model
thread and torch's threads) against the engine's per text (this process's CPU time over its timed run); the
difference is what serving over HTTP costs per text, and its share of the server's CPU the share of the machine
that HTTP takes from the model. The event loop's own part (the server's main thread: HTTP parsing, routing,
validation, tokenizing short requests, answers, logging) is recorded per request.
Every HTTP answer is checked against the engine's probabilities for the same text. SPAMGPT_REQUEST_TIMEOUT_S is
raised to the clients' timeout, so that no request is shed (504) for its queue wait: this measures throughput.
Clients and server share the machine's cores, as they would behind a local proxy.
"""

import argparse
import asyncio
import contextlib
import functools
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import torch

from app.settings import Settings
from benchmarks.common import (
    SMS_FILE,
    count,
    cpu_seconds,
    load_engine,
    print_table,
    random_checkpoint,
    require_shared_data,
    sample_texts,
    write_result,
)
from tests.live_server import free_port
from training.runtime.device import DeviceUnavailable, require_available
from training.runtime.precision import cpu_info

TARGETS = {
    "single_batching_vs_engine": 0.85,
    "single_batching_vs_no_batching": 1.5,
    "bulk_vs_engine": 0.85,
    "single_batching_int8_vs_engine": 0.85,
    "single_batching_bfloat16_vs_engine": 0.85,
    "single_batching_float16_vs_engine": 0.85,
}
# the server's environment and the engine's options for each precision
PRECISIONS = {
    "float32": ({"SPAMGPT_DTYPE": "float32"}, {"dtype": "float32"}),
    "int8": ({"SPAMGPT_QUANTIZE_INT8": "true"}, {"quantize_int8": True}),
    "bfloat16": ({"SPAMGPT_DTYPE": "bfloat16"}, {"dtype": "bfloat16"}),
    "float16": ({"SPAMGPT_DTYPE": "float16"}, {"dtype": "float16"}),  # CUDA only
    "auto": ({}, {}),  # the device's default dtype (off the CPU)
}
STARTUP_SECONDS = 180  # loading 500 MB and a warm-up forward, on a shared CPU
REQUEST_SECONDS = 120  # one request, queueing included
RUN_SECONDS = 300  # one whole load run


def server_command(host: str, port: int) -> list[str]:
    """`python -m app` on `host`:`port`, from this Python's environment."""
    return [sys.executable, "-m", "app", "--host", host, "--port", str(port)]


@contextlib.contextmanager
def server(checkpoint: Path, log: Path, **env: str) -> Iterator[tuple[str, int]]:
    """A uvicorn subprocess serving `checkpoint` on loopback; yields its base URL and pid once /health says ok."""
    port = free_port()
    environ = {
        **os.environ,
        "SPAMGPT_CHECKPOINT_DIR": str(checkpoint),
        "SPAMGPT_DEVICE": "cpu",
        # the benchmark measures throughput, not load shedding: no request may be dropped for its queue wait
        "SPAMGPT_REQUEST_TIMEOUT_S": str(REQUEST_SECONDS),
        **env,
    }
    with log.open("w") as out:
        process = subprocess.Popen(server_command("127.0.0.1", port), env=environ, stdout=out, stderr=out)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + STARTUP_SECONDS
        while not _healthy(url):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"server did not become healthy (exit code {process.poll()}):\n{log.read_text()}")
            time.sleep(0.5)
        yield url, process.pid
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=2).status_code == 200
    except httpx.TransportError:
        return False


class Connection:
    """A minimal HTTP/1.1 keep-alive client on asyncio streams, for the load generator: it shares the cores with
    the server, and httpx spent about 2.8 ms of CPU per request here, a tenth of the machine at this load."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, host: str):
        self.reader, self.writer, self.host = reader, writer, host

    @classmethod
    async def open(cls, url: str) -> "Connection":
        host, port = url.removeprefix("http://").split(":")
        return cls(*await asyncio.open_connection(host, int(port)), host)

    async def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        head = f"POST {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: application/json\r\n"
        self.writer.write(f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body)
        status_line, *headers = (await self.reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        fields = dict(line.lower().split(": ", 1) for line in headers if line)
        return int(status_line.split()[1]), await self.reader.readexactly(int(fields["content-length"]))

    def close(self) -> None:
        self.writer.close()


async def send_all(url: str, clients: int, requests: list[list[str]]) -> dict:
    """Every request sent once by `clients` clients, each on a keep-alive connection of its own opened before the
    clock starts; wall seconds, latencies and each text's probs. Bodies are encoded before and answers decoded
    after the timing: the client's JSON work is not the server's. Each pass opens its own connections: the server
    closes one that carries no request for request_arrival_timeout_s (a client that got none of an earlier pass's
    requests while the machine was slow)."""
    connections = [await Connection.open(url) for _ in range(clients)]
    bodies = iter([(texts, json.dumps({"texts": texts}).encode()) for texts in requests])  # each taken once
    latencies, answers = [], []

    async def client(connection: Connection) -> None:
        for texts, body in bodies:
            start = time.perf_counter()
            status, answer = await connection.post("/classify", body)
            latencies.append(time.perf_counter() - start)
            if status != 200:
                raise RuntimeError(f"/classify answered {status}: {answer[:300]!r}")
            answers.append((texts, answer))

    try:
        start = time.perf_counter()
        async with asyncio.timeout(RUN_SECONDS):
            await asyncio.gather(*(client(c) for c in connections))
        seconds = time.perf_counter() - start
    finally:
        for connection in connections:
            connection.close()
    probabilities = {}
    for texts, answer in answers:
        results = json.loads(answer)["results"]
        assert len(results) == len(texts), (len(results), len(texts))
        probabilities.update((text, result["probabilities"]) for text, result in zip(texts, results, strict=True))
    return {"seconds": seconds, "latencies": latencies, "answers": probabilities}


async def timed_pass(url: str, pid: int, requests: list[list[str]], clients: int) -> dict:
    """Throughput, latencies, each text's probabilities and the server's (process `pid`) CPU time of sending every
    request once."""
    cpu_before, loop_before = cpu_seconds(pid), cpu_seconds(pid, thread=pid)
    run = await send_all(url, clients, requests)
    server_cpu, loop_cpu = cpu_seconds(pid) - cpu_before, cpu_seconds(pid, thread=pid) - loop_before
    texts = sum(len(r) for r in requests)
    latencies = run["latencies"]
    return {
        "requests": len(requests),
        "texts_per_request": len(requests[0]),
        "clients": clients,
        "seconds": run["seconds"],
        "messages_per_second": texts / run["seconds"],
        "server_cpu_ms_per_text": 1000 * server_cpu / texts,
        "event_loop_cpu_ms_per_request": 1000 * loop_cpu / len(requests),
        "latency_p50_ms": 1000 * statistics.median(latencies),
        "latency_p99_ms": 1000 * statistics.quantiles(latencies, n=100, method="inclusive")[98],
        "answers": run["answers"],
    }


def measure(
    checkpoint: Path,
    log: Path,
    requests: list[list[str]],
    clients: int,
    engine: Callable[[], tuple[float, float, dict]],
    rounds: int,
    **env: str,
) -> dict:
    """`rounds` timed HTTP passes over `requests` on one server (after the same untimed: the first forward pass at
    each new shape is slower, and a warm server has seen them), the engine (`engine`: time_engine's result) timed
    before the first and after each, so that each pass sits between two engine runs. The pass with the median
    ratio to the mean of its two engine runs is the result, every pass's numbers under `rounds`."""
    texts = sum(len(r) for r in requests)
    engines = [engine()]
    passes = []
    with server(checkpoint, log, **env) as (url, pid):
        asyncio.run(send_all(url, clients, requests))  # warm-up
        for _ in range(rounds):
            passes.append(asyncio.run(timed_pass(url, pid, requests, clients)))
            engines.append(engine())
    for run, before, after in zip(passes, engines, engines[1:], strict=False):
        run["engine_messages_per_second"] = (texts / before[0] + texts / after[0]) / 2
        run["engine_messages_per_second_before_after"] = [texts / before[0], texts / after[0]]
        run |= http_overhead(run, 1000 * (before[1] + after[1]) / 2 / texts)
        run["max_probability_difference_vs_engine"] = max_difference(run.pop("answers"), before[2])
    result = sorted(passes, key=vs_engine)[(len(passes) - 1) // 2]  # the lower median for an even count
    return {**result, "rounds": passes}


def time_engine(
    checkpoint: Path, texts: list[str], settings: Settings, device: str, precision: str
) -> tuple[float, float, dict]:
    """Wall and CPU seconds (this process's, all threads) for Classifier.tokenize and .predict on all texts at the
    app's default batch limits (after the same untimed), and each text's probabilities, in `precision`
    (PRECISIONS). The engine is freed afterwards, so the server gets the memory."""
    engine = load_engine(checkpoint, device=device, **PRECISIONS[precision][1])
    limits = settings.max_batch_size, settings.max_batch_tokens
    engine.predict(engine.tokenize(texts)[0], *limits)  # warm-up, as for the server
    start, cpu_start = time.perf_counter(), time.process_time()
    probs = engine.predict(engine.tokenize(texts)[0], *limits)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    answers = {
        text: dict(zip(engine.card.labels, p, strict=True)) for text, p in zip(texts, probs.tolist(), strict=True)
    }
    del engine
    gc.collect()
    return seconds, cpu, answers


def max_difference(http: dict, engine: dict) -> float:
    assert http.keys() == engine.keys(), "the server did not answer every text"
    return max(abs(http[text][label] - p) for text, probs in engine.items() for label, p in probs.items())


def http_overhead(run: dict, engine_cpu_ms_per_text: float) -> dict:
    """What serving `run` over HTTP cost beyond the engine, in CPU milliseconds per text and as a share of the
    server's CPU time."""
    extra = run["server_cpu_ms_per_text"] - engine_cpu_ms_per_text
    return {
        "engine_cpu_ms_per_text": engine_cpu_ms_per_text,
        "http_cpu_ms_per_text": extra,
        "http_share_of_server_cpu": extra / run["server_cpu_ms_per_text"],
    }


def vs_engine(run: dict) -> float:
    """An HTTP run's throughput over its engine's (the mean of the runs before and after it), in the same
    precision."""
    return run["messages_per_second"] / run["engine_messages_per_second"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.serve_http", description=__doc__.split("\n")[0])
    parser.add_argument("--texts", type=count, default=512, help="distinct real SMS texts, each sent once per run")
    parser.add_argument("--seed", type=int, default=0, help="which texts")
    parser.add_argument(
        "--rounds",
        type=count,
        default=1,
        help="timed HTTP passes per run, each between two engine runs; the pass with the median ratio is reported",
    )
    parser.add_argument("--clients", type=count, default=32, help="concurrent clients sending one text per request")
    parser.add_argument("--bulk-size", type=count, default=64, help="texts per request in the bulk run")
    parser.add_argument("--bulk-clients", type=count, default=4, help="concurrent clients in the bulk run")
    parser.add_argument("--device", default="cpu", help="SPAMGPT_DEVICE for the server and the engine (cuda: float16)")
    parser.add_argument(
        "--precisions",
        default="float32,int8,bfloat16",
        help="engines to serve one-text requests with besides the first runs': on CPU int8, bfloat16 (where native);"
        " on CUDA float16, bfloat16; others are left out",
    )
    parser.add_argument(
        "--max-wait-ms",
        type=float,
        help="SPAMGPT_MAX_WAIT_MS for every server (default: the app's); the result is written as "
        "serve_http_wait<MS>ms",
    )
    args = parser.parse_args(argv)
    on_cpu = args.device == "cpu"
    runnable = ("int8", "bfloat16") if on_cpu else ("float16", "bfloat16")
    unknown = set(args.precisions.split(",")) - set(PRECISIONS)
    if unknown:
        parser.error(f"--precisions: unknown {sorted(unknown)}; choose from {[p for p in PRECISIONS if p != 'auto']}")
    base = "float32" if on_cpu else "auto"
    asked = [p for p in args.precisions.split(",") if p != base]
    faster = [p for p in asked if p in runnable]
    skipped = {p: f"not an engine precision on {args.device}" for p in asked if p not in runnable}
    if on_cpu and "bfloat16" in faster and not cpu_info().native_bfloat16:
        skipped["bfloat16"] = "no native bfloat16 on this CPU"
        faster.remove("bfloat16")
    waits = {} if args.max_wait_ms is None else {"max_wait_ms": args.max_wait_ms}
    try:  # as the servers run: a device or wait they would refuse (negative, infinite, past the request deadline)
        settings = Settings(checkpoint_dir=".", device=args.device, request_timeout_s=REQUEST_SECONDS, **waits)
    except ValueError as exc:
        error = exc.errors()[0]
        given = f"--device {args.device}" if error["loc"] == ("device",) else f"--max-wait-ms {args.max_wait_ms:g}"
        parser.error(f"{given}: {error['msg']}")
    try:
        require_available(torch.device(args.device))
    except DeviceUnavailable as exc:
        parser.error(f"--device {args.device}: {exc}")
    if args.bulk_size > settings.max_texts_per_request:
        parser.error(
            f"--bulk-size {args.bulk_size}: the server takes at most {settings.max_texts_per_request} texts a request"
        )
    for option in ("clients", "bulk_clients"):
        if getattr(args, option) > settings.max_connections:
            parser.error(
                f"--{option.replace('_', '-')} {getattr(args, option)}: the server holds at most "
                f"{settings.max_connections} connections"
            )
    require_shared_data()
    torch.set_num_threads(os.cpu_count())  # what the server's torch uses by default (SPAMGPT_TORCH_THREADS=0)
    texts = sample_texts(args.texts, args.seed)
    single = [[text] for text in texts]
    bulk = [texts[i : i + args.bulk_size] for i in range(0, len(texts), args.bulk_size)]
    load_before = os.getloadavg()[0]

    device = {"SPAMGPT_DEVICE": args.device, **{f"SPAMGPT_{k.upper()}": str(v) for k, v in waits.items()}}
    scenarios = {  # name: (requests, clients, precision, server environment)
        "http_single_batching": (single, args.clients, base, device),
        "http_single_no_batching": (single, args.clients, base, {**device, "SPAMGPT_BATCHING": "false"}),
        "http_bulk_batching": (bulk, args.bulk_clients, base, device),
        **{f"http_single_batching_{p}": (single, args.clients, p, device) for p in faster},
    }
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = random_checkpoint(Path(tmp) / "checkpoint")
        for name, (requests, clients, precision, env) in scenarios.items():
            engine = functools.partial(time_engine, checkpoint, texts, settings, args.device, precision)
            env = {**env, **PRECISIONS[precision][0]}
            runs[name] = measure(checkpoint, Path(tmp) / f"{name}.log", requests, clients, engine, args.rounds, **env)
            runs[name]["precision"] = precision
    load_after = os.getloadavg()[0]

    single_batching, no_batching = runs["http_single_batching"], runs["http_single_no_batching"]
    ratios = {
        "single_batching_vs_engine": vs_engine(single_batching),
        "single_batching_vs_no_batching": single_batching["messages_per_second"] / no_batching["messages_per_second"],
        "bulk_vs_engine": vs_engine(runs["http_bulk_batching"]),
        **{f"single_batching_{p}_vs_engine": vs_engine(runs[f"http_single_batching_{p}"]) for p in faster},
    }
    met = {name: value >= TARGETS[name] for name, value in ratios.items()}
    result = "serve_http" if args.device == "cpu" else f"serve_http_{args.device.replace(':', '')}"
    path = write_result(
        result + (f"_wait{args.max_wait_ms:g}ms" if waits else ""),
        {
            "model": "gpt2 124M architecture, random (seeded) weights (no pretrained weights here; same compute)",
            "texts": {
                "source": str(SMS_FILE),
                "count": len(texts),
                "sample": f"random.Random({args.seed}).sample of the deduplicated collection",
            },
            "server": {
                "command": server_command("127.0.0.1", 0)[1:],
                "environment": {**device, "SPAMGPT_REQUEST_TIMEOUT_S": REQUEST_SECONDS},
                "environment_by_precision": {p: PRECISIONS[p][0] for p in (base, *faster)},
                "settings": {
                    name: getattr(settings, name) for name in ("max_batch_size", "max_batch_tokens", "max_wait_ms")
                },
            },
            "load_average_1min": {"before": load_before, "after": load_after},
            "http": runs,
            "precisions_not_run": skipped,
            "ratios": ratios,
            "targets": TARGETS,
            "met": met,
        },
    )
    rows = [
        {
            "run": name,
            "precision": r["precision"],
            "requests": r["requests"],
            "texts/request": r["texts_per_request"],
            "clients": r["clients"],
            "messages/s": r["messages_per_second"],
            "engine messages/s": r["engine_messages_per_second"],
            "p50 ms": r["latency_p50_ms"],
            "p99 ms": r["latency_p99_ms"],
            "server cpu ms/text": r["server_cpu_ms_per_text"],
            "event loop cpu ms/request": r["event_loop_cpu_ms_per_request"],
            "engine cpu ms/text": r["engine_cpu_ms_per_text"],
        }
        for name, r in runs.items()
    ]
    print_table(rows)
    print()
    print_table([{"ratio": n, "value": v, "target": TARGETS[n], "met": met[n]} for n, v in ratios.items()])
    print(f"written to {path}")


if __name__ == "__main__":
    main()
