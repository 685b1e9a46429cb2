"""Engine throughput on CUDA: ours against transformers in float32, float16 and bfloat16, on the same texts.

    python -m benchmarks.serve_gpu [--texts 4096] [--seed 0] [--max-batch-size 256]

Run on a machine with a CUDA device; no test depends on it. The model is the GPT-2 124M architecture with random
(seeded) weights (OpenAI's are not available to the project's machines; the compute is the same). Per dtype, ours
(Classifier.predict, Settings(device="cuda", dtype=...)) and transformers' GPT2ForSequenceClassification
holding the same weights in the same dtype get the same length-sorted batches, and, stricter, the same forward
passes (each batch split by training.runtime.model.padding_groups), as in benchmarks.serve_engine. Every contender
returns probabilities on the CPU, so each timing includes the wait for the GPU. Contenders are interleaved round by
round.
"""

import argparse
import tempfile
from pathlib import Path

import torch

from benchmarks.common import (
    count,
    load_engine,
    padded_tokens,
    print_table,
    random_checkpoint,
    require_shared_data,
    same_forwards,
    sample_texts,
    time_interleaved,
    transformers_classifier,
    transformers_forward,
    write_result,
)
from training.runtime.checkpoint import load_checkpoint
from training.runtime.classifier import Classifier
from training.runtime.inference import length_sorted_batches
from training.runtime.model import GPTClassifier

DTYPES = ("float32", "float16", "bfloat16")


def dtype_contenders(dtype: str, engine: Classifier, plain: GPTClassifier, batches: list, forwards: list) -> dict:
    """Ours and transformers in `dtype` on the same batches and on the same forward passes, once checked to agree."""
    eot = engine.checkpoint.tokenizer.eot_token
    hf_forward = transformers_forward(transformers_classifier(plain, eot).to("cuda", getattr(torch, dtype)), eot)
    tolerance = 1e-4 if dtype == "float32" else 2e-2
    torch.testing.assert_close(hf_forward(batches[-1]), engine.predict(batches[-1]), atol=tolerance, rtol=0)
    return {
        f"ours_{dtype}": (engine.predict, batches),
        f"transformers_{dtype}": (hf_forward, batches),
        f"ours_{dtype}_same_forwards": (engine.predict, forwards),
        f"transformers_{dtype}_same_forwards": (hf_forward, forwards),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.serve_gpu", description=__doc__.split("\n")[0])
    parser.add_argument("--texts", type=count, default=4096, help="distinct real SMS texts to classify")
    parser.add_argument("--seed", type=int, default=0, help="which texts")
    parser.add_argument("--max-batch-size", type=count, default=256, help="texts per batch (SPAMGPT_MAX_BATCH_SIZE)")
    args = parser.parse_args(argv)
    require_shared_data()
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks.serve_gpu needs a CUDA device")
    texts = sample_texts(args.texts, args.seed)

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = random_checkpoint(Path(tmp))
        engines = {dtype: load_engine(checkpoint, device="cuda", dtype=dtype) for dtype in DTYPES}
        plain = load_checkpoint(checkpoint).model
    first = engines["float32"]
    rows, _ = first.tokenize(texts)
    batches = [[rows[i] for i in b] for b in length_sorted_batches([len(r) for r in rows], args.max_batch_size)]
    forwards = same_forwards(batches)
    contenders = {}
    for dtype, engine in engines.items():
        contenders |= dtype_contenders(dtype, engine, plain, batches, forwards)
    seconds = time_interleaved(contenders, rounds=min(len(batches), 8))
    throughput = {name: len(texts) / s for name, s in seconds.items()}
    speedups = {
        f"ours_vs_transformers_{dtype}{setup}": throughput[f"ours_{dtype}{setup}"]
        / throughput[f"transformers_{dtype}{setup}"]
        for dtype in DTYPES
        for setup in ("", "_same_forwards")
    }
    path = write_result(
        "serve_gpu",
        {
            "model": "gpt2 124M architecture, random (seeded) weights (no pretrained weights available; same compute)",
            "texts": {"count": len(texts), "sample": f"random.Random({args.seed}).sample of the deduplicated SMS"},
            "batches": {
                "same_batches": {"forward_passes": len(batches), "padded_tokens": padded_tokens(batches)},
                "same_forwards": {"forward_passes": len(forwards), "padded_tokens": padded_tokens(forwards)},
                "max_batch_size": args.max_batch_size,
                "tokens": sum(len(r) for r in rows),
            },
            "seconds": seconds,
            "messages_per_second": throughput,
            "speedups": speedups,
        },
    )
    print_table([{"contender": n, "seconds": seconds[n], "messages/s": t} for n, t in throughput.items()])
    print()
    print_table([{"ratio": n, "value": v} for n, v in speedups.items()])
    print(f"written to {path}")


if __name__ == "__main__":
    main()
