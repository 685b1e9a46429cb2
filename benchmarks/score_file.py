"""File scoring (`python -m training predict`) against the serving engine, and its memory as the file grows.

    python -m benchmarks.score_file [--texts 512] [--rounds 2] [--memory-rows 300] [--int8]

The GPT-2 124M architecture with random (seeded) weights and the real BPE (benchmarks.common.cached_random_checkpoint,
made once in benchmarks/checkpoints/gpt2-random); real SMS texts (benchmarks.common.sample_texts).

- Throughput: the same texts through Classifier (tokenize + predict at the app's default batch limits: what
  a server spends on them beside HTTP) and through training.scoring.files.predict on a CSV of them (reading, tokenizing,
  predicting, writing the CSV; model load excluded from both). The two alternate round by round, so a load change on
  the shared machine hits both alike. Target: predict's rows/s at least 0.9x the engine's.
- Memory: `python -m training predict` in a fresh process on a CSV of N rows and on one of 10 N (the SMS texts
  repeated in a seeded order), its peak RSS (ru_maxrss from wait4). Target: flat, the 10x file's peak within a
  few percent of the small one's.
"""

import argparse
import csv
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from app.settings import Settings
from benchmarks.common import (
    ROOT,
    SMS_FILE,
    cached_random_checkpoint,
    count,
    load_engine,
    print_table,
    require_shared_data,
    sample_texts,
    write_result,
)
from training.config import PredictConfig
from training.finetune.data import deduplicate, load_sms_spam
from training.runtime.options import ClassifierOptions
from training.scoring.files import predict

TARGET_RATIO = 0.9


def write_csv(path: Path, texts: list[str]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "text"])
        writer.writerows(enumerate(texts))
    return path


def throughput(checkpoint: Path, texts: list[str], rounds: int, int8: bool, workdir: Path) -> dict:
    """Rows per second of the engine and of file scoring on `texts`, alternating `rounds` times."""
    settings = Settings(checkpoint_dir=checkpoint, device="cpu", quantize_int8=int8)
    engine = load_engine(checkpoint, quantize_int8=int8)
    data = write_csv(workdir / "texts.csv", texts)
    scoring = ClassifierOptions(
        device="cpu", quantize_int8=int8, batch_size=settings.max_batch_size, max_batch_tokens=settings.max_batch_tokens
    )
    engine_s, file_s = [], []
    for r in range(rounds):
        start = time.perf_counter()
        rows, _ = engine.tokenize(texts)
        engine.predict(rows, settings.max_batch_size, settings.max_batch_tokens)
        engine_s.append(time.perf_counter() - start)
        out = workdir / f"scores-{r}.csv"
        summary = predict(PredictConfig(str(checkpoint), str(data), str(out), scoring=scoring, progress=False))
        assert summary["rows_written"] == len(texts) and summary["bad_rows"] == 0, summary
        file_s.append(summary["seconds"])
    engine_rate, file_rate = len(texts) / sum(engine_s) * rounds, len(texts) / sum(file_s) * rounds
    return {
        "texts": len(texts),
        "rounds": rounds,
        "dtype": "int8" if int8 else "float32",
        "engine_seconds": engine_s,
        "predict_seconds": file_s,
        "engine_rows_per_second": engine_rate,
        "predict_rows_per_second": file_rate,
        "ratio": file_rate / engine_rate,
        "target_ratio": TARGET_RATIO,
    }


def peak_memory(checkpoint: Path, rows: int, int8: bool, workdir: Path) -> dict:
    """`python -m training predict` on a CSV of `rows` SMS texts, in a fresh process: its peak RSS."""
    texts = deduplicate(load_sms_spam(SMS_FILE)).texts
    rng = random.Random(rows)
    data = write_csv(workdir / f"memory-{rows}.csv", [rng.choice(texts) for _ in range(rows)])
    argv = [sys.executable, "-m", "training", "predict", "--checkpoint", str(checkpoint), "--data", str(data)]
    argv += ["--out", str(workdir / f"memory-{rows}.out.csv"), "--device", "cpu", "--no-progress"]
    argv += ["--quantize-int8"] if int8 else []
    start = time.perf_counter()
    child = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode != 0:
        sys.exit(f"predict on {rows} rows failed with status {child.returncode}")
    return {
        "rows": rows,
        "input_bytes": data.stat().st_size,
        "peak_rss_mib": usage.ru_maxrss / 1024,  # KiB on Linux
        "seconds": time.perf_counter() - start,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.score_file", description=__doc__.split("\n")[0])
    parser.add_argument("--texts", type=count, default=512, help="distinct real SMS texts for the throughput ratio")
    parser.add_argument("--rounds", type=count, default=2, help="engine and file scoring alternate this many times")
    parser.add_argument("--memory-rows", type=count, default=300, help="rows of the small file; the large has 10x")
    parser.add_argument("--int8", action="store_true", help="both sides int8 (SPAMGPT_QUANTIZE_INT8 / --quantize-int8)")
    args = parser.parse_args(argv)
    require_shared_data()
    torch.set_num_threads(os.cpu_count())
    checkpoint = cached_random_checkpoint()
    texts = sample_texts(args.texts, seed=0)
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        speed = throughput(checkpoint, texts, args.rounds, args.int8, Path(tmp))
        sizes = [peak_memory(checkpoint, n, args.int8, Path(tmp)) for n in (args.memory_rows, 10 * args.memory_rows)]
    growth = sizes[1]["peak_rss_mib"] / sizes[0]["peak_rss_mib"]
    print_table(
        [
            {"what": "engine (tokenize + predict)", "rows/s": speed["engine_rows_per_second"]},
            {"what": "python -m training predict", "rows/s": speed["predict_rows_per_second"]},
            {"what": "ratio (target >= 0.9)", "rows/s": speed["ratio"]},
        ]
    )
    print_table(sizes)
    print(f"peak RSS, 10x file / 1x file: {growth:.3f}")
    path = write_result(
        "score_file" + ("_int8" if args.int8 else ""),
        {
            "model": "gpt2 124M architecture, random (seeded) weights, real GPT-2 BPE",
            "checkpoint": str(checkpoint.relative_to(ROOT)),
            "command": "python -m benchmarks.score_file " + " ".join(sys.argv[1:] if argv is None else argv),
            "load_average_before": load_before,
            "load_average_after": os.getloadavg()[0],
            "throughput": speed,
            "memory": {"runs": sizes, "peak_ratio_10x_over_1x": growth, "target": "flat"},
        },
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
