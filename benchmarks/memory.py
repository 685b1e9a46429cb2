"""Peak resident memory of the server for the largest request its limits allow, float32 and int8.

    python -m benchmarks.memory

The GPT-2 124M architecture with random (seeded) weights and the real BPE, exported with save_checkpoint to
benchmarks/checkpoints/gpt2-random (benchmarks.common.cached_random_checkpoint; git-ignored; made on the first run).
Each case runs in a fresh Python process: create_app with the default settings, the lifespan loads and warms up the
model, then one POST /classify through the whole app (body limit, validation, tokenizing, micro-batcher, model).
ru_maxrss is read after load and warm-up, then reset to the current RSS, then read again after the request: the
difference is what the request cost at its peak.

The largest request: max_texts_per_request texts, each tokenizing to more than the checkpoint's max_tokens (real
SMS messages joined until long enough), so every text is truncated to max_tokens. The other cases ask whether the
peak is bounded per batch rather than per request: one batch's worth of the same texts, and the same with a
smaller max_batch_tokens.
"""

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
from fastapi.testclient import TestClient

from app.main import create_app
from app.settings import Settings
from benchmarks.common import (
    RANDOM_CHECKPOINT,
    ROOT,
    SMS_FILE,
    cached_random_checkpoint,
    print_table,
    require_shared_data,
    write_result,
)
from training.finetune.data import deduplicate, load_sms_spam

MAX_TOKENS = 256  # the checkpoint's (random_checkpoint's card, the CLI's default)


def long_texts(tokenizer, n: int, max_tokens: int, seed: int = 0) -> list[str]:
    """n distinct texts, each real SMS messages joined until it tokenizes to more than max_tokens (so is truncated)."""
    messages = deduplicate(load_sms_spam(SMS_FILE)).texts
    rng = random.Random(seed)
    texts = []
    for _ in range(n):
        parts = []
        while len(tokenizer.encode_ordinary(" ".join(parts))) <= max_tokens:
            parts.append(rng.choice(messages))
        texts.append(" ".join(parts))
    return texts


def max_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def reset_max_rss() -> None:
    """Drop the high-water mark (ru_maxrss, VmHWM) to the current RSS (Linux >= 4.0), so the next reading is the
    request's own peak, not loading's: int8 loads float32 weights first, above what it then holds."""
    Path("/proc/self/clear_refs").write_text("5")


def measure(n_texts: int, quantize_int8: bool, overrides: dict) -> dict:
    """In this (fresh) process: load, warm up, then one request of n_texts texts at max_tokens each."""
    settings = Settings(checkpoint_dir=RANDOM_CHECKPOINT, device="cpu", quantize_int8=quantize_int8, **overrides)
    with TestClient(create_app(settings)) as client:
        engine = client.app.state.service.classifier
        texts = long_texts(engine.checkpoint.tokenizer, n_texts, engine.card.max_tokens)
        load_peak = max_rss_mib()
        reset_max_rss()
        after_load = max_rss_mib()
        start = time.perf_counter()
        response = client.post("/classify", json={"texts": texts})
        seconds = time.perf_counter() - start
        after_request = max_rss_mib()
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert all(r["tokens"] == engine.card.max_tokens and r["truncated"] for r in results), "a text was not truncated"
    return {
        "texts": n_texts,
        "tokens_per_text": engine.card.max_tokens,
        "max_batch_size": settings.max_batch_size,
        "max_batch_tokens": settings.max_batch_tokens,
        "rows_per_batch": min(settings.max_batch_size, settings.max_batch_tokens // engine.card.max_tokens),
        "body_bytes": len(json.dumps({"texts": texts})),
        "max_rss_during_load_mib": load_peak,
        "max_rss_after_load_mib": after_load,
        "max_rss_after_request_mib": after_request,
        "request_peak_mib": after_request - after_load,
        "request_seconds": seconds,
        "torch_threads": torch.get_num_threads(),
    }


def cases(settings: Settings) -> list[dict]:
    one_batch = min(settings.max_batch_size, settings.max_batch_tokens // MAX_TOKENS)
    small_budget = {"max_batch_tokens": MAX_TOKENS * one_batch // 4}  # a quarter of the rows per forward pass
    kinds = (
        ("largest request", settings.max_texts_per_request, {}, {}),
        ("one batch", one_batch, {}, {}),
        ("one batch, 1/4 token budget", one_batch, small_budget, {}),
    )
    rows = [
        {"case": case, "dtype": dtype, "n_texts": n, "overrides": overrides, "env": env}
        for dtype in ("float32", "int8")
        for case, n, overrides, env in kinds
    ]
    # glibc's malloc keeps an arena per thread that allocates (torch's intra-op workers, the executor's threads);
    # one arena shows how much of the largest request's peak is memory held by the others.
    one_arena = {"MALLOC_ARENA_MAX": "1"}
    rows.append({**rows[0], "case": "largest request, MALLOC_ARENA_MAX=1", "env": one_arena})
    return rows


def run_case(case: dict) -> dict:
    """One case in a fresh interpreter, so ru_maxrss starts from nothing each time."""
    argv = [
        sys.executable,
        "-m",
        "benchmarks.memory",
        "--child",
        json.dumps({k: case[k] for k in ("n_texts", "overrides")}),
    ]
    if case["dtype"] == "int8":
        argv.append("--int8")
    env = {**os.environ, **case["env"]}
    child = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True)
    if child.returncode != 0:
        sys.exit(f"case {case} failed:\n{child.stderr}")
    return {
        "case": case["case"],
        "dtype": case["dtype"],
        "env": case["env"],
        **json.loads(child.stdout.splitlines()[-1]),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--child", help=argparse.SUPPRESS)  # internal: measure one case in this process
    parser.add_argument("--int8", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(measure(quantize_int8=args.int8, **json.loads(args.child))))
        return
    require_shared_data()
    cached_random_checkpoint()
    defaults = Settings(checkpoint_dir=RANDOM_CHECKPOINT, device="cpu")
    results = []
    for case in cases(defaults):
        print(f"{case['case']}, {case['dtype']} ...", flush=True)
        results.append(run_case(case))
    print_table(
        [
            {
                "case": r["case"],
                "dtype": r["dtype"],
                "texts x tokens": f"{r['texts']} x {r['tokens_per_text']}",
                "rows/batch": r["rows_per_batch"],
                "load peak MiB": r["max_rss_during_load_mib"],
                "after load MiB": r["max_rss_after_load_mib"],
                "after request MiB": r["max_rss_after_request_mib"],
                "request peak MiB": r["request_peak_mib"],
                "s": r["request_seconds"],
            }
            for r in results
        ]
    )
    limits = {name: getattr(defaults, name) for name in ("max_texts_per_request", "max_batch_size", "max_batch_tokens")}
    path = write_result(
        "memory",
        {
            "model": "gpt2 124M architecture, random (seeded) weights, real GPT-2 BPE",
            "checkpoint": str(RANDOM_CHECKPOINT.relative_to(ROOT)),
            "max_tokens": MAX_TOKENS,
            "default_limits": limits,
            "measure": "ru_maxrss of a fresh process: after create_app's lifespan (load + warm-up), reset there to the"
            " current RSS (/proc/self/clear_refs 5), and after one POST /classify through TestClient",
            "results": results,
        },
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
