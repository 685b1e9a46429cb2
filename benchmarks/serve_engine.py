"""Engine throughput on real SMS texts: ours (float32, int8) against ONNX Runtime, transformers and the reference.

    python -m benchmarks.serve_engine [--texts 512] [--seed 0] [--quality-checkpoint DIR]

Contenders, all on the same texts and holding the same weights (GPT-2 124M architecture, random weights: OpenAI's
weights are not available here, and the compute is the same):
- ours float32 / int8: Classifier.predict (int8: Settings.quantize_int8, dynamic int8 nn.Linear).
- ONNX Runtime float32 / dynamic int8: our own ONNX export (training.export.export_onnx, GPTClassifier.forward_padded:
  every position of a right-padded batch computed, the last real token read; written from a separate load of the
  checkpoint, so nothing we time is touched by the exporter), int8 by onnxruntime.quantization.quantize_dynamic
  (QInt8 weights); sessions with every graph optimisation, the same thread count, and idle threads that do not
  spin (they would hold the cores the next contender needs). Fed right-padded batches, as transformers is.
- transformers: GPT2ForSequenceClassification with our weights in its layout, right-padded batches with an
  attention_mask, torch.inference_mode, the same thread count.
- reference: the inference of "Build a Large Language Model (From Scratch)" ch. 6: every text truncated and padded
  to 120 tokens, batches of 8 in order, logits at position -1; run with our model's own blocks.
Two setups for ours against transformers, all contenders interleaved round by round so that a load change on the
machine hits each alike; tokenizing is done once, outside the timing, for every contender:
- same batches (the issue's setup): both get the engine's length-sorted batches at the app's default limits. Ours
  computes on real tokens only (training.runtime.model.Packing); transformers pads each batch to its longest row.
- same forward passes (stricter): each of those batches split by training.runtime.model.padding_groups (64 tokens of
  overhead per pass) into rows of similar length, for both: transformers is handed the padding avoidance that our
  model does inside, and the two run the same matrix products on near-equal shapes.

Every contender's probabilities on all the texts are checked against ours float32: the largest absolute difference
and the share of argmax labels that agree (random weights and head: probabilities near 0.5, so label agreement
is a harsh test for int8 here). Then int8 and bfloat16 quality: a checkpoint trained on the real split
(--quality-checkpoint; benchmarks.train_accuracy makes the default) classifies its test texts in float32, int8 and
bfloat16; the labels must agree on >= 99% and the test accuracy move by <= 0.5 points. bfloat16 is computed even
where the CPU would emulate it (agreement only, recorded as emulated); its throughput (ours_bfloat16) only where
the CPU has it natively.
"""

import argparse
import json
import os
import random
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from app.settings import Settings
from benchmarks.common import (
    BPE_DIR,
    ROOT,
    SMS_FILE,
    print_table,
    reference_logits,
    require_shared_data,
    write_result,
)
from training.config import BaseModelConfig
from training.export.formats import ONNX_FILE, export_onnx, hf_state_dict
from training.finetune.data import deduplicate, load_sms_spam, text_id
from training.finetune.evaluate import EVAL_BATCH_SIZE
from training.runtime.checkpoint import REPORT_DIR, ModelCard, load_checkpoint, save_checkpoint
from training.runtime.classifier import Classifier
from training.runtime.inference import decide, length_sorted_batches, pad_right, probabilities
from training.runtime.model import GPTClassifier, GPTConfig, padding_groups
from training.runtime.options import ClassifierOptions
from training.runtime.precision import cpu_info
from training.runtime.tokenizer import load_tokenizer

TRAINED_CHECKPOINT = ROOT / "benchmarks" / "checkpoints" / "random-init-all"
REFERENCE_PAD_TO = 120  # the reference pads to its longest training message, 120 tokens
REFERENCE_BATCH = 8
SPLIT_OVERHEAD_TOKENS = 64  # what one forward pass costs beyond its tokens, for splitting the stricter setup's passes
TARGETS = {
    "ours_float32_vs_onnxruntime_float32": 1.0,
    "ours_int8_vs_onnxruntime_int8": 1.0,
    "ours_float32_vs_transformers": 1.5,
    "ours_int8_vs_transformers": 2.5,
    "ours_float32_vs_transformers_same_forwards": 1.5,
    "ours_int8_vs_transformers_same_forwards": 2.5,
    "ours_float32_vs_reference": 4.0,
    "ours_float32_vs_onnxruntime_float32_same_forwards": 1.0,
    "ours_int8_vs_onnxruntime_int8_same_forwards": 1.0,
    "ours_bfloat16_vs_ours_float32": 3.0,  # measured only on a CPU with native bfloat16
    "int8_label_agreement": 0.99,
    "int8_accuracy_change_points": 0.5,
    "bfloat16_label_agreement": 0.99,
    "bfloat16_accuracy_change_points": 0.5,
}
NOTES = [
    "weights: GPT-2 124M architecture, random (seeded) weights; OpenAI's weights are not available here, same compute",
    "transformers' score layer has no bias: ours is folded into ln_f's bias and the head"
    " (training.export.formats), exactly",
    "messages_per_second counts forward time only (pad, forward, softmax); tokenizing is the same for all and untimed",
    "same batches: length_sorted_batches at the app's default limits for ours and transformers; same_forwards: each"
    " of those split by training.runtime.model.padding_groups(overhead 64) for both",
    "contenders are interleaved: round r runs the r-th share of every contender's batches",
    "onnxruntime: our ONNX export (forward_padded) of a separate load of the checkpoint; ORT_ENABLE_ALL; intra-op"
    " threads = torch's; session.intra_op.allow_spinning=0 and session.inter_op.allow_spinning=0; int8:"
    " quantize_dynamic(weight_type=QInt8) of that graph",
    "reference: rows truncated to 120 tokens; ours keeps up to the checkpoint's max_tokens (256), so ours does more"
    " work on the few longer texts",
]

Forward = Callable[[list[list[int]]], torch.Tensor]


def sample_texts(n: int, seed: int) -> list[str]:
    """n distinct real SMS texts, a seeded sample of the deduplicated collection."""
    texts = deduplicate(load_sms_spam(SMS_FILE)).texts
    if n > len(texts):
        raise ValueError(f"--texts {n} exceeds the {len(texts)} distinct texts")
    return random.Random(seed).sample(texts, n)


def random_checkpoint(directory: Path, seed: int = 0) -> Path:
    """A GPT-2 124M classifier with seeded random weights, saved with the real BPE files."""
    torch.manual_seed(seed)
    model = GPTClassifier(GPTConfig.from_preset("gpt2"))
    card = ModelCard(
        labels=("ham", "spam"),
        max_tokens=BaseModelConfig.max_tokens,
        threshold=None,
        base_model="gpt2 (random weights)",
    )
    return save_checkpoint(directory, model, BPE_DIR, card)


def load_engine(checkpoint: Path, quantize_int8: bool = False, device: str = "cpu", dtype: str = "auto") -> Classifier:
    settings = Settings(checkpoint_dir=checkpoint, device=device, dtype=dtype, quantize_int8=quantize_int8)
    return Classifier.load(checkpoint, settings.classifier_options())


def transformers_classifier(model: GPTClassifier, pad_id: int):
    """GPT2ForSequenceClassification holding `model`'s weights, as `python -m training export --format hf` writes
    them (training.export.hf_state_dict: Conv1D weights transposed back, the score bias folded in exactly)."""
    from transformers import GPT2Config, GPT2ForSequenceClassification

    c = model.config
    config = GPT2Config(
        vocab_size=c.vocab_size,
        n_positions=c.block_size,
        n_embd=c.n_embd,
        n_layer=c.n_layer,
        n_head=c.n_head,
        num_labels=c.n_labels,
        pad_token_id=pad_id,  # how it finds each row's last real token
    )
    hf = GPT2ForSequenceClassification(config).eval()
    missing, unexpected = hf.load_state_dict(hf_state_dict(model), strict=False)
    assert not unexpected and all(k.endswith(".attn.bias") for k in missing), (missing, unexpected)
    return hf


def transformers_forward(hf, pad_id: int) -> Forward:
    """Probabilities on the CPU, as Classifier.predict gives them (on CUDA, that waits for the forward to finish)."""
    device = next(hf.parameters()).device

    @torch.inference_mode()
    def forward(rows: list[list[int]]) -> torch.Tensor:
        idx, lengths = pad_right(rows, pad_id, device)
        mask = torch.arange(idx.size(1), device=device) < lengths[:, None]  # (B, T)
        return probabilities(hf(input_ids=idx, attention_mask=mask.long()).logits).cpu()

    return forward


def onnxruntime_forwards(checkpoint: Path, directory: Path, threads: int) -> dict[str, Forward]:
    """ONNX Runtime float32 and dynamic int8 sessions on the checkpoint's ONNX export (written under `directory`),
    as forwards giving probabilities like Classifier.predict."""
    import onnxruntime
    from onnxruntime.quantization import QuantType, quantize_dynamic

    float32 = export_onnx(checkpoint, directory / "float32") / ONNX_FILE
    int8 = directory / "int8" / ONNX_FILE
    int8.parent.mkdir()
    quantize_dynamic(float32, int8, weight_type=QuantType.QInt8)
    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")

    def forward_of(path: Path) -> Forward:
        session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

        def forward(rows: list[list[int]]) -> torch.Tensor:
            idx, lengths = pad_right(rows)
            feed = {"input_ids": idx.numpy(), "lengths": lengths.numpy()}
            return torch.from_numpy(session.run(["probabilities"], feed)[0])

        return forward

    return {"onnxruntime_float32": forward_of(float32), "onnxruntime_int8": forward_of(int8)}


def onnxruntime_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


def agreement(forwards: dict[str, Forward], batches: list[list[list[int]]], baseline: str) -> dict[str, dict]:
    """Each forward's probabilities on every batch against `baseline`'s: the largest absolute difference and the
    share of rows whose argmax label agrees."""
    probs = {name: torch.cat([forward(batch) for batch in batches]) for name, forward in forwards.items()}
    base = probs[baseline]
    return {
        name: {
            "max_abs_probability_difference": (p - base).abs().max().item(),
            "label_agreement": (p.argmax(1) == base.argmax(1)).float().mean().item(),
        }
        for name, p in probs.items()
        if name != baseline
    }


def reference_forward(model: GPTClassifier, pad_id: int) -> Forward:
    """The reference's inference: rows truncated and padded to 120 tokens, logits at position -1."""

    @torch.inference_mode()
    def forward(rows: list[list[int]]) -> torch.Tensor:
        return probabilities(reference_logits(model, rows, REFERENCE_PAD_TO, pad_id))

    return forward


def time_interleaved(contenders: dict[str, tuple[Forward, list[list[list[int]]]]], rounds: int) -> dict[str, float]:
    """Seconds each contender spends on all its batches. Each round runs the next share of every contender's
    batches, so that other load on the machine is spread over all of them alike."""
    for forward, batches in contenders.values():  # warm-up: the shortest and the longest batch
        forward(batches[0]), forward(batches[-1])
    seconds = dict.fromkeys(contenders, 0.0)
    for r in range(rounds):
        for name, (forward, batches) in contenders.items():
            share = batches[r * len(batches) // rounds : (r + 1) * len(batches) // rounds]
            start = time.perf_counter()
            for batch in share:
                forward(batch)
            seconds[name] += time.perf_counter() - start
    return seconds


def precision_quality(checkpoint: Path) -> dict:
    """float32 against int8 and against bfloat16 on the trained checkpoint's test texts: label agreement (argmax and
    at the checkpoint's threshold), the largest probability difference, and test accuracy.

    bfloat16 runs even on a CPU that would emulate it (the engine refuses that, for speed): the model loaded in
    bfloat16 directly, its numbers the same as on a native CPU up to the kernels' rounding. Recorded as emulated.
    """
    test_ids = set(json.loads((checkpoint / REPORT_DIR / "split.json").read_text())["test"])
    data = deduplicate(load_sms_spam(SMS_FILE))
    test = [(text, label) for text, label in zip(data.texts, data.labels, strict=True) if text_id(text) in test_ids]
    assert len(test) == len(test_ids), f"{len(test_ids)} test ids, {len(test)} texts found"
    texts, truth = [t for t, _ in test], [label for _, label in test]
    engines = {
        "float32": load_engine(checkpoint),
        "int8": load_engine(checkpoint, quantize_int8=True),
        # past check_precision: see above
        "bfloat16": Classifier(load_checkpoint(checkpoint, dtype=torch.bfloat16), ClassifierOptions(device="cpu")),
    }
    outputs = {}
    for name, engine in engines.items():
        probs = engine.predict(engine.tokenize(texts)[0], EVAL_BATCH_SIZE)
        outputs[name] = (
            probs,
            decide(probs, engine.card.labels, None),
            decide(probs, engine.card.labels, engine.card.threshold),
        )
    f32_probs, f32_argmax, f32_served = outputs["float32"]
    result = {
        "checkpoint": str(checkpoint),
        "model": load_checkpoint(checkpoint).card.base_model,
        "test_texts": len(texts),
        "float32_accuracy": _mean(a == b for a, b in zip(f32_argmax, truth, strict=True)),
        "float32_accuracy_at_threshold": _mean(a == b for a, b in zip(f32_served, truth, strict=True)),
    }
    for name in ("int8", "bfloat16"):
        probs, argmax, served = outputs[name]
        accuracy = _mean(a == b for a, b in zip(argmax, truth, strict=True))
        result[name] = {
            "label_agreement": _mean(a == b for a, b in zip(f32_argmax, argmax, strict=True)),
            "label_agreement_at_threshold": _mean(a == b for a, b in zip(f32_served, served, strict=True)),
            "max_probability_difference": (f32_probs - probs).abs().max().item(),
            "accuracy": accuracy,
            "accuracy_at_threshold": _mean(a == b for a, b in zip(served, truth, strict=True)),
            "accuracy_change_points": 100 * (accuracy - result["float32_accuracy"]),
        }
    result["bfloat16"]["computed"] = (
        "native bfloat16" if cpu_info().native_bfloat16 else "emulated (no native bfloat16 on this CPU): agreement only"
    )
    return result


def same_forwards(batches: list[list[list[int]]]) -> list[list[list[int]]]:
    """The stricter setup's forward passes: each batch split into rows of similar length by padding_groups."""
    return [
        [batch[i] for i in group]
        for batch in batches
        for group in padding_groups([len(r) for r in batch], SPLIT_OVERHEAD_TOKENS)
    ]


def padded_tokens(batches: list[list[list[int]]]) -> int:
    return sum(len(b) * max(len(r) for r in b) for b in batches)


def _mean(flags) -> float:
    flags = list(flags)
    return sum(flags) / len(flags)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.serve_engine", description=__doc__.split("\n")[0])
    parser.add_argument("--texts", type=int, default=512, help="distinct real SMS texts to classify")
    parser.add_argument("--seed", type=int, default=0, help="which texts")
    parser.add_argument(
        "--quality-checkpoint", type=Path, default=TRAINED_CHECKPOINT, help="trained checkpoint for int8 quality"
    )
    args = parser.parse_args(argv)
    require_shared_data()
    torch.set_num_threads(os.cpu_count())
    texts = sample_texts(args.texts, args.seed)
    enc = load_tokenizer(BPE_DIR)
    settings = Settings(checkpoint_dir=".")  # only for the engine's default batch limits
    load_before = os.getloadavg()[0]

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = random_checkpoint(Path(tmp))
        ours, ours_int8 = load_engine(checkpoint), load_engine(checkpoint, quantize_int8=True)
        plain = load_checkpoint(checkpoint).model  # plain nn.Linear weights, as the checkpoint holds them
        onnx = onnxruntime_forwards(checkpoint, Path(tmp) / "onnx", torch.get_num_threads())
        # bfloat16 throughput only where it is native: emulated, it is slower than float32 and the engine refuses it
        bfloat16 = load_engine(checkpoint, dtype="bfloat16") if cpu_info().native_bfloat16 else None
    rows, _ = ours.tokenize(texts)
    lengths = [len(r) for r in rows]
    batches = [
        [rows[i] for i in batch]
        for batch in length_sorted_batches(lengths, settings.max_batch_size, settings.max_batch_tokens)
    ]
    forwards = same_forwards(batches)
    hf = transformers_classifier(plain, enc.eot_token)
    hf_forward = transformers_forward(hf, enc.eot_token)
    torch.testing.assert_close(hf_forward(batches[-1]), ours.predict(batches[-1]), atol=1e-4, rtol=1e-4)
    probability_checks = agreement(
        {"ours_float32": ours.predict, "ours_int8": ours_int8.predict, "transformers_float32": hf_forward, **onnx},
        batches,
        baseline="ours_float32",
    )

    reference_batches = [rows[i : i + REFERENCE_BATCH] for i in range(0, len(rows), REFERENCE_BATCH)]
    contenders = {
        "ours_float32": (ours.predict, batches),
        "ours_int8": (ours_int8.predict, batches),
        "onnxruntime_float32": (onnx["onnxruntime_float32"], batches),
        "onnxruntime_int8": (onnx["onnxruntime_int8"], batches),
        "transformers_float32": (hf_forward, batches),
        "ours_float32_same_forwards": (ours.predict, forwards),
        "ours_int8_same_forwards": (ours_int8.predict, forwards),
        "onnxruntime_float32_same_forwards": (onnx["onnxruntime_float32"], forwards),
        "onnxruntime_int8_same_forwards": (onnx["onnxruntime_int8"], forwards),
        "transformers_float32_same_forwards": (hf_forward, forwards),
        "reference_float32": (reference_forward(plain, enc.eot_token), reference_batches),
    }
    if bfloat16 is not None:
        contenders["ours_bfloat16"] = (bfloat16.predict, batches)
    seconds = time_interleaved(contenders, rounds=len(batches))
    load_after = os.getloadavg()[0]

    throughput = {name: len(texts) / s for name, s in seconds.items()}
    speedups = {
        "ours_float32_vs_onnxruntime_float32": throughput["ours_float32"] / throughput["onnxruntime_float32"],
        "ours_int8_vs_onnxruntime_int8": throughput["ours_int8"] / throughput["onnxruntime_int8"],
        "ours_float32_vs_transformers": throughput["ours_float32"] / throughput["transformers_float32"],
        "ours_int8_vs_transformers": throughput["ours_int8"] / throughput["transformers_float32"],
        "ours_float32_vs_transformers_same_forwards": throughput["ours_float32_same_forwards"]
        / throughput["transformers_float32_same_forwards"],
        "ours_int8_vs_transformers_same_forwards": throughput["ours_int8_same_forwards"]
        / throughput["transformers_float32_same_forwards"],
        "ours_float32_vs_reference": throughput["ours_float32"] / throughput["reference_float32"],
        "ours_float32_vs_onnxruntime_float32_same_forwards": throughput["ours_float32_same_forwards"]
        / throughput["onnxruntime_float32_same_forwards"],
        "ours_int8_vs_onnxruntime_int8_same_forwards": throughput["ours_int8_same_forwards"]
        / throughput["onnxruntime_int8_same_forwards"],
    }
    if bfloat16 is not None:
        speedups["ours_bfloat16_vs_ours_float32"] = throughput["ours_bfloat16"] / throughput["ours_float32"]
    quality = precision_quality(args.quality_checkpoint)
    met = {name: speedups[name] >= TARGETS[name] for name in speedups}
    for name in ("int8", "bfloat16"):
        met[f"{name}_label_agreement"] = quality[name]["label_agreement"] >= TARGETS[f"{name}_label_agreement"]
        met[f"{name}_accuracy_change_points"] = (
            abs(quality[name]["accuracy_change_points"]) <= TARGETS[f"{name}_accuracy_change_points"]
        )
    path = write_result(
        "serve_engine",
        {
            "model": "gpt2 124M architecture, random (seeded) weights; int8, bfloat16 quality on --quality-checkpoint",
            "onnxruntime": onnxruntime_version(),
            "texts": {
                "source": str(SMS_FILE),
                "count": len(texts),
                "sample": f"random.Random({args.seed}).sample of the deduplicated collection",
                "tokens": sum(lengths),
                "tokens_mean": sum(lengths) / len(lengths),
                "tokens_max": max(lengths),
            },
            "batches": {
                "same_batches": {
                    "forward_passes": len(batches),
                    "padded_tokens": padded_tokens(batches),
                    "max_batch_size": settings.max_batch_size,
                    "max_batch_tokens": settings.max_batch_tokens,
                },
                "same_forwards": {
                    "forward_passes": len(forwards),
                    "padded_tokens": padded_tokens(forwards),
                    "overhead_tokens": SPLIT_OVERHEAD_TOKENS,
                },
                "reference": {
                    "forward_passes": len(reference_batches),
                    "batch_size": REFERENCE_BATCH,
                    "pad_to": REFERENCE_PAD_TO,
                },
            },
            "load_average_1min": {"before": load_before, "after": load_after},
            "seconds": seconds,
            "messages_per_second": throughput,
            "speedups": speedups,
            "probabilities_vs_ours_float32": probability_checks,
            "precision_quality": quality,
            "bfloat16_throughput": "measured (ours_bfloat16)"
            if bfloat16 is not None
            else "not measured: this CPU has no native bfloat16 (avx512_bf16 or amx_bf16)",
            "targets": TARGETS,
            "met": met,
            "notes": NOTES,
        },
    )
    print_table([{"contender": n, "seconds": seconds[n], "messages/s": t} for n, t in throughput.items()])
    print()
    print_table([{"vs ours_float32": n, **check} for n, check in probability_checks.items()])
    print()
    quality_values = {
        f"{name}_{measure}": quality[name][measure]
        for name in ("int8", "bfloat16")
        for measure in ("label_agreement", "accuracy_change_points")
    }
    print_table(
        [
            {"ratio": n, "value": v, "target": TARGETS[n], "met": met[n]}
            for n, v in {**speedups, **quality_values}.items()
        ]
    )
    print(f"bfloat16: {quality['bfloat16']['computed']}")
    print(f"written to {path}")


if __name__ == "__main__":
    main()
