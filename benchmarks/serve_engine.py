"""Engine throughput on real SMS texts: ours (float32, int8) against ONNX Runtime, transformers and the reference.

    python -m benchmarks.serve_engine [--texts 512] [--seed 0] [--quality-checkpoint DIR]

Contenders, all on the same texts and holding the same weights (GPT-2 124M architecture, random weights: OpenAI's
weights are not available here, and the compute is the same):
- ours float32 / int8: Classifier.predict (int8: Settings.quantize_int8, dynamic int8 nn.Linear).
- ONNX Runtime, two builds, each fed right-padded batches with their attention_mask, as transformers is; sessions
  with every graph optimisation, the same thread count, and idle threads that do not spin (they would hold the
  cores the next contender needs):
  - onnxruntime_spamgpt_float32 / _int8: our own ONNX export (training.export.export_onnx, dynamo,
    GPTClassifier.forward_padded: every position of a right-padded batch computed, the last real token read;
    written from a separate load of the checkpoint, so nothing we time is touched by the exporter), int8 by
    onnxruntime.quantization.quantize_dynamic (QInt8 weights);
  - onnxruntime_transformers_float32 / _optimized_float32 / _optimized_int8: as users build it from transformers'
    GPT2ForSequenceClassification (TorchScript exporter, opset 17), then ORT's transformer optimizer for GPT-2 (the
    fusions Optimum's ORTOptimizer applies), then dynamic int8 of the fused graph (transformers_onnx).
  Our ratios against ONNX Runtime are taken against its fastest contender in each precision and setup, which the
  JSON names (fastest_onnxruntime).
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
the CPU has it natively, and there also the float32 and bfloat16 matrix products MATRIX_PRODUCTS, interleaved with
the contenders: the CPU's own bfloat16 / float32 ratio, the yardstick of ours_bfloat16 / ours_float32.
"""

import argparse
import json
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from app.settings import Settings
from benchmarks.common import (
    BPE_DIR,
    ROOT,
    SMS_FILE,
    SPLIT_OVERHEAD_TOKENS,
    Forward,
    count,
    load_engine,
    padded_tokens,
    print_table,
    random_checkpoint,
    reference_logits,
    require_checkpoint,
    require_shared_data,
    same_forwards,
    sample_texts,
    time_interleaved,
    transformers_classifier,
    transformers_forward,
    write_result,
)
from training.export.formats import ONNX_FILE, export_onnx, onnx_inputs
from training.finetune.data import deduplicate, load_sms_spam, text_id
from training.finetune.evaluate import EVAL_BATCH_SIZE
from training.runtime.checkpoint import REPORT_DIR, load_checkpoint
from training.runtime.classifier import Classifier
from training.runtime.inference import PAD_ID, decide, length_sorted_batches, pad_right, probabilities
from training.runtime.model import GPTClassifier
from training.runtime.options import ClassifierOptions
from training.runtime.precision import cpu_info
from training.runtime.tokenizer import load_tokenizer

if TYPE_CHECKING:
    from transformers import GPT2ForSequenceClassification

TRAINED_CHECKPOINT = ROOT / "benchmarks" / "checkpoints" / "random-init-all"
REFERENCE_PAD_TO = 120  # the reference pads to its longest training message, 120 tokens
REFERENCE_BATCH = 8
TARGETS = {
    "ours_float32_vs_onnxruntime_float32": 1.0,
    "ours_int8_vs_onnxruntime_int8": 1.5,
    "ours_float32_vs_transformers": 1.5,
    "ours_int8_vs_transformers": 2.5,
    "ours_float32_vs_transformers_same_forwards": 1.5,
    "ours_int8_vs_transformers_same_forwards": 2.5,
    "ours_float32_vs_reference": 4.0,
    "ours_float32_vs_onnxruntime_float32_same_forwards": 1.0,
    "ours_int8_vs_onnxruntime_int8_same_forwards": 1.0,
    # (ours_bfloat16 / ours_float32) / (bfloat16 / float32 GFLOPS of MATRIX_PRODUCTS), in the same run; measured
    # only on a CPU with native bfloat16
    "ours_bfloat16_share_of_matrix_product_ratio": 0.9,
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
    "onnxruntime, every session: ORT_ENABLE_ALL; intra-op threads = torch's; session.intra_op.allow_spinning=0 and"
    " session.inter_op.allow_spinning=0; int8: quantize_dynamic(weight_type=QInt8)",
    "onnxruntime_spamgpt_*: our ONNX export (forward_padded, dynamo) of a separate load of the checkpoint",
    "onnxruntime_transformers_*: GPT2ForSequenceClassification with our weights, torch.onnx.export(dynamo=False,"
    " opset_version=17, use_cache off); _optimized_*: onnxruntime.transformers.optimizer.optimize_model("
    "model_type='gpt2') of it (onnxruntime_fused_operators); _optimized_int8: quantize_dynamic of the fused graph",
    "ours vs onnxruntime: against the fastest ONNX Runtime contender in that precision and setup (fastest_onnxruntime)",
    "reference: rows truncated to 120 tokens; ours keeps up to the checkpoint's max_tokens (256), so ours does more"
    " work on the few longer texts",
]


# (m, k, n): m x k @ k x n, GPT-2 124M's two MLP products for 736 packed tokens, the bfloat16 target's yardstick
MATRIX_PRODUCTS = ((736, 768, 3072), (736, 3072, 768))
MATRIX_PRODUCT_REPEATS = 4  # per round of time_interleaved


def matrix_products(dtype: torch.dtype) -> Forward:
    """A Forward that ignores its rows and runs MATRIX_PRODUCTS once in `dtype` on random operands, at torch's
    thread count; timed among the contenders (time_interleaved), so that load on the machine hits it alike."""
    operands = [(torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)) for m, k, n in MATRIX_PRODUCTS]

    def forward(rows: list[list[int]]) -> torch.Tensor:
        return torch.stack([(a @ b)[0, 0] for a, b in operands])

    return forward


def matrix_product_gflops(seconds: float, calls: int) -> float:
    """Billion floating-point operations per second of `calls` runs of MATRIX_PRODUCTS in `seconds` (2mkn each)."""
    return calls * sum(2 * m * k * n for m, k, n in MATRIX_PRODUCTS) / seconds / 1e9


# The TorchScript exporter's opset for transformers' GPT-2: from 17, LayerNormalization is one ONNX operator
ONNX_USER_OPSET = 17
# ORT's transformer optimizer fuses each block's two residual adds + LayerNorms and its tanh GELU (checked each run)
FUSED_PER_BLOCK = {"SkipLayerNormalization": 2, "FastGelu": 1}


def onnxruntime_session_options(threads: int):
    """Every graph optimisation, `threads` intra-op threads, and idle threads that do not spin (they would hold the
    cores the next contender needs)."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return options


def onnxruntime_forward(path: Path, threads: int, pad_id: int, output: str) -> Forward:
    """An ONNX Runtime CPU session on `path` as a forward giving probabilities like Classifier.predict: rows
    right-padded with `pad_id` and fed with their attention_mask (training.export.onnx_inputs); `output` is
    "probabilities", or "logits" that are softmaxed here."""
    import onnxruntime

    session = onnxruntime.InferenceSession(
        str(path), onnxruntime_session_options(threads), providers=["CPUExecutionProvider"]
    )

    def forward(rows: list[list[int]]) -> torch.Tensor:
        idx, lengths = pad_right(rows, pad_id)
        out = torch.from_numpy(session.run([output], onnx_inputs(idx, lengths))[0])
        return out if output == "probabilities" else probabilities(out)

    return forward


def spamgpt_onnx(checkpoint: Path, directory: Path) -> dict[str, Path]:
    """Our own ONNX export of the checkpoint (training.export.export_onnx, dynamo) and its dynamic int8
    (quantize_dynamic, QInt8 weights), written under `directory`."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    float32 = export_onnx(checkpoint, directory / "float32") / ONNX_FILE
    int8 = directory / "int8.onnx"
    quantize_dynamic(float32, int8, weight_type=QuantType.QInt8)
    return {"float32": float32, "int8": int8}


def transformers_onnx(hf: "GPT2ForSequenceClassification", directory: Path) -> tuple[dict[str, Path], dict[str, int]]:
    """ONNX Runtime as users build it from transformers' GPT2ForSequenceClassification `hf`, under `directory`:
    - float32: torch.onnx.export with the TorchScript exporter (dynamo=False), opset 17, input_ids and
      attention_mask with dynamic batch and sequence axes, output logits; no KV cache (use_cache off, as Optimum
      exports a sequence classifier);
    - optimized_float32: onnxruntime.transformers.optimizer.optimize_model(model_type="gpt2") of that graph, the
      fusions Optimum's ORTOptimizer applies for GPT-2;
    - optimized_int8: onnxruntime.quantization.quantize_dynamic (QInt8 weights) of the fused graph;
      DefaultTensorType float, as its error on the fused graph's contrib ops asks for.
    Returns the paths and the optimizer's fused operator counts (nonzero ones only). Raises RuntimeError when the
    fusions expected of GPT-2 (FUSED_PER_BLOCK per block) did not all happen: the contender would not be the one
    named."""
    from onnx import TensorProto
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.transformers.optimizer import optimize_model

    paths = {name: directory / f"{name}.onnx" for name in ("float32", "optimized_float32", "optimized_int8")}
    hf.config.use_cache = False
    example = {
        "input_ids": torch.tensor([[1, 2, 3], [4, 5, 6]]),
        "attention_mask": torch.tensor([[1, 1, 1], [1, 1, 0]]),
    }
    axes = {0: "batch", 1: "sequence"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's tracer warnings and its own deprecation
        torch.onnx.export(
            hf,
            (),
            str(paths["float32"]),
            kwargs=example,
            input_names=list(example),
            output_names=["logits"],
            dynamic_axes={"input_ids": axes, "attention_mask": axes, "logits": {0: "batch"}},
            opset_version=ONNX_USER_OPSET,
            dynamo=False,
        )
    c = hf.config
    optimized = optimize_model(str(paths["float32"]), model_type="gpt2", num_heads=c.n_head, hidden_size=c.n_embd)
    fused = {op: n for op, n in optimized.get_fused_operator_statistics().items() if n}
    expected = {op: per_block * c.n_layer for op, per_block in FUSED_PER_BLOCK.items()}
    if any(fused.get(op, 0) != n for op, n in expected.items()):
        raise RuntimeError(f"ORT's GPT-2 optimizer fused {fused}, expected {expected}")
    optimized.save_model_to_file(str(paths["optimized_float32"]))
    quantize_dynamic(
        paths["optimized_float32"],
        paths["optimized_int8"],
        weight_type=QuantType.QInt8,
        extra_options={"DefaultTensorType": TensorProto.FLOAT},
    )
    return paths, fused


def onnxruntime_contenders(
    checkpoint: Path, hf: "GPT2ForSequenceClassification", pad_id: int, directory: Path, threads: int
) -> tuple[dict[str, Forward], dict[str, int]]:
    """Every ONNX Runtime contender, by name (onnxruntime_<build>_<precision>), and the fused operator counts of
    the transformers build: our export (spamgpt_onnx of `checkpoint`) and the one users build (transformers_onnx of
    `hf`, fed right-padded with its pad_token_id `pad_id`)."""
    ours = spamgpt_onnx(checkpoint, directory / "spamgpt")
    (directory / "transformers").mkdir()
    theirs, fused = transformers_onnx(hf, directory / "transformers")
    forwards = {
        f"onnxruntime_spamgpt_{p}": onnxruntime_forward(path, threads, PAD_ID, "probabilities")
        for p, path in ours.items()
    }
    forwards |= {
        f"onnxruntime_transformers_{name}": onnxruntime_forward(path, threads, pad_id, "logits")
        for name, path in theirs.items()
    }
    return forwards, fused


def fastest_onnxruntimes(throughput: dict[str, float]) -> dict[str, str]:
    """For each precision (float32, int8) and setup (same batches; "_same_forwards"), the name of the fastest ONNX
    Runtime contender timed, keyed "float32", "int8", "float32_same_forwards", "int8_same_forwards"."""
    fastest = {}
    for precision in ("float32", "int8"):
        for suffix in ("", "_same_forwards"):
            names = [n for n in throughput if n.startswith("onnxruntime_") and n.endswith(f"_{precision}{suffix}")]
            fastest[f"{precision}{suffix}"] = max(names, key=throughput.__getitem__)
    return fastest


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


def _mean(flags) -> float:
    flags = list(flags)
    return sum(flags) / len(flags)


@dataclass
class Contenders:
    """Every contender's model, each loaded from the same random checkpoint."""

    ours: Classifier
    ours_int8: Classifier
    ours_bfloat16: Classifier | None  # only where the CPU has bfloat16 natively
    plain: GPTClassifier  # plain nn.Linear weights, as the checkpoint holds them: the reference's
    hf: "GPT2ForSequenceClassification"  # holding plain's weights
    onnx: dict[str, Forward]  # onnxruntime_contenders
    onnx_fused_operators: dict[str, int]  # ORT's optimizer's fusions in the transformers build


@dataclass
class Batches:
    """The token id rows of each setup's forward passes."""

    same: list[list[list[int]]]  # the engine's length-sorted batches at the app's default limits
    forwards: list[list[list[int]]]  # each of those split by padding_groups
    reference: list[list[list[int]]]  # the reference's batches of 8 in order


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.serve_engine", description=__doc__.split("\n")[0])
    parser.add_argument("--texts", type=count, default=512, help="distinct real SMS texts to classify")
    parser.add_argument("--seed", type=int, default=0, help="which texts")
    parser.add_argument(
        "--quality-checkpoint", type=Path, default=TRAINED_CHECKPOINT, help="trained checkpoint for int8 quality"
    )
    args = parser.parse_args(argv)
    require_checkpoint(parser, "--quality-checkpoint", args.quality_checkpoint, f"{REPORT_DIR}/split.json")
    return args


def load_contenders(pad_id: int) -> Contenders:
    """A random checkpoint loaded by every contender, then deleted; `pad_id` is transformers' pad_token_id."""
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = random_checkpoint(Path(tmp))
        plain = load_checkpoint(checkpoint).model
        hf = transformers_classifier(plain, pad_id)
        onnx, fused = onnxruntime_contenders(checkpoint, hf, pad_id, Path(tmp) / "onnx", torch.get_num_threads())
        return Contenders(
            ours=load_engine(checkpoint),
            ours_int8=load_engine(checkpoint, quantize_int8=True),
            plain=plain,
            hf=hf,
            onnx=onnx,
            onnx_fused_operators=fused,
            # emulated, bfloat16 is slower than float32 and the engine refuses it
            ours_bfloat16=load_engine(checkpoint, dtype="bfloat16") if cpu_info().native_bfloat16 else None,
        )


def make_batches(rows: list[list[int]], settings: Settings) -> Batches:
    lengths = [len(r) for r in rows]
    same = [
        [rows[i] for i in batch]
        for batch in length_sorted_batches(lengths, settings.max_batch_size, settings.max_batch_tokens)
    ]
    reference = [rows[i : i + REFERENCE_BATCH] for i in range(0, len(rows), REFERENCE_BATCH)]
    return Batches(same, same_forwards(same), reference)


def timed(c: Contenders, b: Batches, hf_forward: Forward, reference: Forward) -> dict[str, tuple[Forward, list]]:
    """Each timed contender: its forward and the batches it runs."""
    timed = {
        "ours_float32": (c.ours.predict, b.same),
        "ours_int8": (c.ours_int8.predict, b.same),
        **{name: (forward, b.same) for name, forward in c.onnx.items()},
        "transformers_float32": (hf_forward, b.same),
        "ours_float32_same_forwards": (c.ours.predict, b.forwards),
        "ours_int8_same_forwards": (c.ours_int8.predict, b.forwards),
        **{f"{name}_same_forwards": (forward, b.forwards) for name, forward in c.onnx.items()},
        "transformers_float32_same_forwards": (hf_forward, b.forwards),
        "reference_float32": (reference, b.reference),
    }
    if c.ours_bfloat16 is not None:
        timed["ours_bfloat16"] = (c.ours_bfloat16.predict, b.same)
        for dtype in (torch.float32, torch.bfloat16):
            calls = [[]] * (MATRIX_PRODUCT_REPEATS * len(b.same))  # MATRIX_PRODUCT_REPEATS per round
            timed[f"matrix_products_{str(dtype).removeprefix('torch.')}"] = (matrix_products(dtype), calls)
    return timed


def speedups(
    throughput: dict[str, float], fastest: dict[str, str], gflops: dict[str, float] | None = None
) -> dict[str, float]:
    """The ratios TARGETS names, from messages per second; against ONNX Runtime, against `fastest`
    (fastest_onnxruntimes) in each precision and setup. ours_bfloat16's only where it was timed, and then as a share
    of the matrix products' bfloat16 / float32 ratio (`gflops`, GFLOPS keyed "float32" and "bfloat16")."""
    ratios = {
        "ours_float32_vs_onnxruntime_float32": ("ours_float32", fastest["float32"]),
        "ours_int8_vs_onnxruntime_int8": ("ours_int8", fastest["int8"]),
        "ours_float32_vs_transformers": ("ours_float32", "transformers_float32"),
        "ours_int8_vs_transformers": ("ours_int8", "transformers_float32"),
        "ours_float32_vs_transformers_same_forwards": (
            "ours_float32_same_forwards",
            "transformers_float32_same_forwards",
        ),
        "ours_int8_vs_transformers_same_forwards": ("ours_int8_same_forwards", "transformers_float32_same_forwards"),
        "ours_float32_vs_reference": ("ours_float32", "reference_float32"),
        "ours_float32_vs_onnxruntime_float32_same_forwards": (
            "ours_float32_same_forwards",
            fastest["float32_same_forwards"],
        ),
        "ours_int8_vs_onnxruntime_int8_same_forwards": ("ours_int8_same_forwards", fastest["int8_same_forwards"]),
    }
    result = {name: throughput[a] / throughput[b] for name, (a, b) in ratios.items()}
    if "ours_bfloat16" in throughput:
        engine = throughput["ours_bfloat16"] / throughput["ours_float32"]
        result["ours_bfloat16_share_of_matrix_product_ratio"] = engine / (gflops["bfloat16"] / gflops["float32"])
    return result


def bfloat16_record(throughput: dict[str, float], gflops: dict[str, float]) -> dict:
    """ours_bfloat16 / ours_float32 beside the matrix products' GFLOPS and their bfloat16 / float32 ratio."""
    return {
        "ours_bfloat16_vs_ours_float32": throughput["ours_bfloat16"] / throughput["ours_float32"],
        "matrix_products": [f"{m}x{k} @ {k}x{n}" for m, k, n in MATRIX_PRODUCTS],
        "matrix_product_gflops": gflops,
        "matrix_product_bfloat16_vs_float32": gflops["bfloat16"] / gflops["float32"],
    }


def targets_met(ratios: dict[str, float], quality: dict) -> dict[str, bool]:
    met = {name: ratios[name] >= TARGETS[name] for name in ratios}
    for name in ("int8", "bfloat16"):
        met[f"{name}_label_agreement"] = quality[name]["label_agreement"] >= TARGETS[f"{name}_label_agreement"]
        met[f"{name}_accuracy_change_points"] = (
            abs(quality[name]["accuracy_change_points"]) <= TARGETS[f"{name}_accuracy_change_points"]
        )
    return met


def batches_record(b: Batches, settings: Settings) -> dict:
    return {
        "same_batches": {
            "forward_passes": len(b.same),
            "padded_tokens": padded_tokens(b.same),
            "max_batch_size": settings.max_batch_size,
            "max_batch_tokens": settings.max_batch_tokens,
        },
        "same_forwards": {
            "forward_passes": len(b.forwards),
            "padded_tokens": padded_tokens(b.forwards),
            "overhead_tokens": SPLIT_OVERHEAD_TOKENS,
        },
        "reference": {"forward_passes": len(b.reference), "batch_size": REFERENCE_BATCH, "pad_to": REFERENCE_PAD_TO},
    }


def texts_record(texts: list[str], rows: list[list[int]], seed: int) -> dict:
    lengths = [len(r) for r in rows]
    return {
        "source": str(SMS_FILE),
        "count": len(texts),
        "sample": f"random.Random({seed}).sample of the deduplicated collection",
        "tokens": sum(lengths),
        "tokens_mean": sum(lengths) / len(lengths),
        "tokens_max": max(lengths),
    }


def print_report(result: dict, path: Path) -> None:
    seconds, throughput, quality, met = (
        result[k] for k in ("seconds", "messages_per_second", "precision_quality", "met")
    )
    print_table([{"contender": n, "seconds": seconds[n], "messages/s": t} for n, t in throughput.items()])
    print()
    print_table([{"vs ours_float32": n, **check} for n, check in result["probabilities_vs_ours_float32"].items()])
    print()
    quality_values = {
        f"{name}_{measure}": quality[name][measure]
        for name in ("int8", "bfloat16")
        for measure in ("label_agreement", "accuracy_change_points")
    }
    print_table(
        [
            {"ratio": n, "value": v, "target": TARGETS[n], "met": met[n]}
            for n, v in {**result["speedups"], **quality_values}.items()
        ]
    )
    print(f"ours against ONNX Runtime's fastest: {result['fastest_onnxruntime']}")
    print(f"bfloat16: {quality['bfloat16']['computed']}; throughput: {result['bfloat16_throughput']}")
    print(f"written to {path}")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    require_shared_data()
    torch.set_num_threads(os.cpu_count())
    texts = sample_texts(args.texts, args.seed)
    enc = load_tokenizer(BPE_DIR)
    settings = Settings(checkpoint_dir=".")  # only for the engine's default batch limits
    load_before = os.getloadavg()[0]

    c = load_contenders(enc.eot_token)
    rows, _ = c.ours.tokenize(texts)
    batches = make_batches(rows, settings)
    hf_forward = transformers_forward(c.hf, enc.eot_token)
    torch.testing.assert_close(hf_forward(batches.same[-1]), c.ours.predict(batches.same[-1]), atol=1e-4, rtol=1e-4)
    probability_checks = agreement(
        {
            "ours_float32": c.ours.predict,
            "ours_int8": c.ours_int8.predict,
            "transformers_float32": hf_forward,
            **c.onnx,
        },
        batches.same,
        baseline="ours_float32",
    )
    contenders = timed(c, batches, hf_forward, reference_forward(c.plain, enc.eot_token))
    seconds = time_interleaved(contenders, rounds=len(batches.same))
    load_after = os.getloadavg()[0]

    products = {
        name.removeprefix("matrix_products_"): matrix_product_gflops(seconds.pop(name), len(contenders[name][1]))
        for name in list(seconds)
        if name.startswith("matrix_products_")
    }
    throughput = {name: len(texts) / s for name, s in seconds.items()}
    fastest = fastest_onnxruntimes(throughput)
    ratios = speedups(throughput, fastest, products)
    try:
        quality = precision_quality(args.quality_checkpoint)
    except Exception as exc:  # the timings above stand; the record says what failed instead of losing them
        quality = {"failed": f"{type(exc).__name__}: {exc}"}
    result = {
        "model": "gpt2 124M architecture, random (seeded) weights; int8, bfloat16 quality on --quality-checkpoint",
        "onnxruntime": onnxruntime_version(),
        "onnxruntime_fused_operators": c.onnx_fused_operators,
        "fastest_onnxruntime": fastest,
        "texts": texts_record(texts, rows, args.seed),
        "batches": batches_record(batches, settings),
        "load_average_1min": {"before": load_before, "after": load_after},
        "seconds": seconds,
        "messages_per_second": throughput,
        "speedups": ratios,
        "probabilities_vs_ours_float32": probability_checks,
        "precision_quality": quality,
        "bfloat16_throughput": bfloat16_record(throughput, products)
        if c.ours_bfloat16 is not None
        else "not measured: this CPU has no native bfloat16 (avx512_bf16 or amx_bf16)",
        "targets": TARGETS,
        "met": None if "failed" in quality else targets_met(ratios, quality),
        "notes": NOTES,
    }
    path = write_result("serve_engine", result)
    if "failed" in quality:
        raise SystemExit(f"precision quality failed ({quality['failed']}); the timings are in {path}")
    print_report(result, path)


if __name__ == "__main__":
    main()
