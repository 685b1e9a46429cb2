"""The engine benchmark's ONNX Runtime contenders: built as users build them on a tiny model, giving our
probabilities, and ours compared with the fastest of them; bfloat16 compared with the CPU's matrix products."""

import pytest
import torch

from benchmarks.common import transformers_classifier
from benchmarks.serve_engine import (
    FUSED_PER_BLOCK,
    MATRIX_PRODUCTS,
    TARGETS,
    bfloat16_record,
    fastest_onnxruntimes,
    matrix_product_gflops,
    matrix_products,
    onnxruntime_contenders,
    speedups,
)
from training.runtime.checkpoint import load_checkpoint
from training.runtime.inference import pad_right, probabilities

ROWS = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [14, 15, 16, 17]]


def test_every_onnxruntime_contender_is_built_on_a_tiny_model_and_gives_our_probabilities(tiny_checkpoint, tmp_path):
    for module in ("onnx", "onnxruntime", "onnxscript", "transformers"):  # onnxscript: our export's exporter
        pytest.importorskip(module)
    checkpoint = load_checkpoint(tiny_checkpoint)
    model, eot = checkpoint.model, checkpoint.tokenizer.eot_token
    hf = transformers_classifier(model, eot)

    forwards, fused = onnxruntime_contenders(tiny_checkpoint, hf, eot, tmp_path, threads=1)

    assert sorted(forwards) == [
        "onnxruntime_spamgpt_float32",
        "onnxruntime_spamgpt_int8",
        "onnxruntime_transformers_float32",
        "onnxruntime_transformers_optimized_float32",
        "onnxruntime_transformers_optimized_int8",
    ]
    n_layer = model.config.n_layer
    assert {op: fused.get(op) for op in FUSED_PER_BLOCK} == {op: n * n_layer for op, n in FUSED_PER_BLOCK.items()}
    with torch.inference_mode():
        ours = probabilities(model.forward_padded(*pad_right(ROWS)))
    for name, forward in forwards.items():
        # a batch of three lengths and one row alone: the dynamic axes hold, and padding is never read
        for rows, expected in ((ROWS, ours), (ROWS[1:2], ours[1:2])):
            tolerance = 0.02 if name.endswith("int8") else 1e-5
            torch.testing.assert_close(forward(rows), expected, atol=tolerance, rtol=0, msg=name)


def test_ours_is_compared_with_the_fastest_onnxruntime_contender_in_each_precision_and_setup():
    throughput = {
        "ours_float32": 40.0,
        "ours_int8": 90.0,
        "onnxruntime_spamgpt_float32": 30.0,
        "onnxruntime_spamgpt_int8": 70.0,
        "onnxruntime_transformers_float32": 32.0,
        "onnxruntime_transformers_optimized_float32": 31.0,
        "onnxruntime_transformers_optimized_int8": 89.0,
        "transformers_float32": 50.0,  # not ONNX Runtime: never picked
        "reference_float32": 10.0,
        "ours_float32_same_forwards": 41.0,
        "ours_int8_same_forwards": 91.0,
        "onnxruntime_spamgpt_float32_same_forwards": 36.0,
        "onnxruntime_spamgpt_int8_same_forwards": 80.0,
        "onnxruntime_transformers_float32_same_forwards": 33.0,
        "onnxruntime_transformers_optimized_float32_same_forwards": 34.0,
        "onnxruntime_transformers_optimized_int8_same_forwards": 60.0,
        "transformers_float32_same_forwards": 20.0,
    }

    fastest = fastest_onnxruntimes(throughput)

    assert fastest == {
        "float32": "onnxruntime_transformers_float32",
        "int8": "onnxruntime_transformers_optimized_int8",
        "float32_same_forwards": "onnxruntime_spamgpt_float32_same_forwards",
        "int8_same_forwards": "onnxruntime_spamgpt_int8_same_forwards",
    }
    ratios = speedups(throughput, fastest)
    assert ratios["ours_float32_vs_onnxruntime_float32"] == 40.0 / 32.0
    assert ratios["ours_int8_vs_onnxruntime_int8"] == 90.0 / 89.0
    assert ratios["ours_float32_vs_onnxruntime_float32_same_forwards"] == 41.0 / 36.0
    assert ratios["ours_int8_vs_onnxruntime_int8_same_forwards"] == 91.0 / 80.0


def test_bfloat16_is_held_to_the_matrix_products_ratio_of_the_same_run_and_int8_to_one_and_a_half_onnxruntime():
    throughput = {
        "ours_float32": 40.0,
        "ours_int8": 90.0,
        "ours_bfloat16": 60.0,  # 1.5x ours float32
        "onnxruntime_spamgpt_int8": 60.0,
        "transformers_float32": 20.0,
        "reference_float32": 10.0,
        "ours_float32_same_forwards": 41.0,
        "ours_int8_same_forwards": 91.0,
        "transformers_float32_same_forwards": 20.0,
    }
    fastest = dict.fromkeys(
        ("float32", "int8", "float32_same_forwards", "int8_same_forwards"), "onnxruntime_spamgpt_int8"
    )
    gflops = {"float32": 100.0, "bfloat16": 200.0}  # the CPU's products: 2x in bfloat16

    ratios = speedups(throughput, fastest, gflops)

    assert ratios["ours_bfloat16_share_of_matrix_product_ratio"] == 1.5 / 2.0
    assert TARGETS["ours_bfloat16_share_of_matrix_product_ratio"] == 0.9
    assert ratios["ours_int8_vs_onnxruntime_int8"] == 1.5 and TARGETS["ours_int8_vs_onnxruntime_int8"] == 1.5
    assert bfloat16_record(throughput, gflops)["matrix_product_bfloat16_vs_float32"] == 2.0
    del throughput["ours_bfloat16"]  # a CPU without native bfloat16: no bfloat16 ratio, no target to meet
    assert "ours_bfloat16_share_of_matrix_product_ratio" not in speedups(throughput, fastest)


def test_the_matrix_products_are_the_mlp_products_and_their_gflops_count_two_flops_per_multiply_add():
    outputs = matrix_products(torch.bfloat16)([])

    assert MATRIX_PRODUCTS == ((736, 768, 3072), (736, 3072, 768))
    assert outputs.dtype == torch.bfloat16 and outputs.shape == (2,)
    assert matrix_product_gflops(seconds=2.0, calls=3) == 3 * 2 * (2 * 736 * 768 * 3072) / 2.0 / 1e9
