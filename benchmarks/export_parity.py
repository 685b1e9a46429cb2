"""Parity of the exports with our own probabilities, on real SMS texts in mixed-length batches.

    python -m benchmarks.export_parity [--preset gpt2] [--texts 512] [--batch-size 16] [--max-tokens 256] [--seed 0]

A GPT-2 classifier of the preset's size with seeded random weights (OpenAI's are not available here) and a head
made sharp and biased (so its probabilities spread over 0..1 and the bias matters), saved with the real BPE files;
then `training.export.formats`'s Hugging Face layout run by transformers' own text-classification pipeline, and its ONNX
graph run by ONNX Runtime. Texts go in a seeded sample's order, unsorted, in batches of --batch-size, each padded
to its longest row: the batch shapes vary. Reported: the largest absolute difference in any probability, and the
seconds each export and its run took.
"""

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import BPE_DIR, count, print_table, require_shared_data, sample_texts, write_result
from training.export.formats import ONNX_FILE, ONNX_OPSET, export_hf, export_onnx, onnx_inputs
from training.runtime.checkpoint import ModelCard, load_checkpoint, save_checkpoint
from training.runtime.inference import pad_right, predict_probabilities
from training.runtime.model import GPTClassifier, GPTConfig
from training.runtime.tokenizer import encode_batch


def sharp_checkpoint(directory: Path, preset: str, seed: int, max_tokens: int) -> Path:
    torch.manual_seed(seed)
    model = GPTClassifier(GPTConfig.from_preset(preset))
    with torch.no_grad():
        model.score.weight.normal_(0.0, 0.5)
        model.score.bias.copy_(torch.tensor([1.5, -1.5]))
    card = ModelCard(labels=("ham", "spam"), max_tokens=max_tokens, threshold=None, base_model=f"{preset} (random)")
    return save_checkpoint(directory, model, BPE_DIR, card)


def hf_probabilities(directory: Path, texts: list[str], batch_size: int) -> torch.Tensor:
    from transformers import pipeline

    classify = pipeline("text-classification", model=str(directory), top_k=None, batch_size=batch_size, device="cpu")
    answers = classify(texts, truncation=True)
    return torch.tensor(
        [[{a["label"]: a["score"] for a in answer}[label] for label in ("ham", "spam")] for answer in answers]
    )


def onnx_probabilities(directory: Path, rows: list[list[int]], batch_size: int) -> tuple[torch.Tensor, list]:
    import onnxruntime

    session = onnxruntime.InferenceSession(str(directory / ONNX_FILE), providers=["CPUExecutionProvider"])
    out, shapes = [], []
    for start in range(0, len(rows), batch_size):
        idx, lengths = pad_right(rows[start : start + batch_size])
        shapes.append(list(idx.shape))
        out.append(session.run(["probabilities"], onnx_inputs(idx, lengths))[0])
    return torch.from_numpy(np.concatenate(out)), shapes


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="gpt2")
    parser.add_argument("--texts", type=count, default=512)
    parser.add_argument("--batch-size", type=count, default=16)
    parser.add_argument("--max-tokens", type=count, default=256, help="at most the preset's positions (tiny: 64)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    require_shared_data()
    texts = sample_texts(args.texts, args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = sharp_checkpoint(Path(tmp) / "ckpt", args.preset, args.seed, args.max_tokens)
        loaded = load_checkpoint(ckpt)
        rows, truncated = encode_batch(loaded.tokenizer, texts, args.max_tokens)
        ours = predict_probabilities(loaded.model, rows)
        started = time.perf_counter()
        hf = hf_probabilities(export_hf(ckpt, Path(tmp) / "hf"), texts, args.batch_size)
        hf_seconds = time.perf_counter() - started
        print(f"hf: max abs difference {float((hf - ours).abs().max()):.3g} ({hf_seconds:.0f} s)", flush=True)
        started = time.perf_counter()
        onnx, shapes = onnx_probabilities(export_onnx(ckpt, Path(tmp) / "onnx"), rows, args.batch_size)
        onnx_seconds = time.perf_counter() - started
    lengths = [len(r) for r in rows]
    rows_out = [
        {"export": "hf (transformers pipeline)", "max_abs_diff": float((hf - ours).abs().max()), "seconds": hf_seconds},
        {
            "export": f"onnx opset {ONNX_OPSET} (onnxruntime)",
            "max_abs_diff": float((onnx - ours).abs().max()),
            "seconds": onnx_seconds,
        },
    ]
    print_table(rows_out)
    path = write_result(
        f"export_parity_{args.preset}",
        {
            "args": vars(args),
            "texts": len(texts),
            "tokens": {"min": min(lengths), "max": max(lengths), "truncated": sum(truncated)},
            "p_spam": {
                "min": float(ours[:, 1].min()),
                "median": float(ours[:, 1].median()),
                "max": float(ours[:, 1].max()),
            },
            "batch_shapes": shapes,
            "results": rows_out,
        },
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
