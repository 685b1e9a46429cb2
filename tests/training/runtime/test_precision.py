import os
import platform
from pathlib import Path

import pytest
import torch

from tests.helpers import pretend_cpu
from training.runtime.inference import pad_right, probabilities
from training.runtime.model import GPTClassifier, GPTConfig
from training.runtime.precision import (
    CPU,
    ONEDNN_CACHE_CAPACITY,
    Int8Linear,
    PackedLinear,
    check_precision,
    cpu_info,
    pack_linears,
    prepare_for_inference,
    quantize_int8,
    quantize_uint8,
    training_autocast,
    training_precision,
)

CPU_DEVICE = torch.device("cpu")


def test_vector_flags_and_native_bfloat16_from_the_flags():
    cpu = CPU("Test CPU", frozenset({"fpu", "sse4_2", "avx2", "fma", "avx512_vnni", "amx_bf16", "amx_tile", "lm"}))
    assert cpu.vector_flags == ["amx_bf16", "amx_tile", "avx2", "avx512_vnni", "fma", "sse4_2"]
    assert cpu.native_bfloat16
    assert not CPU("Test CPU", frozenset({"avx2", "avx512f", "avx512_vnni"})).native_bfloat16


@pytest.mark.skipif(not Path("/proc/cpuinfo").is_file(), reason="reads Linux's /proc/cpuinfo")
def test_cpu_info_agrees_with_torchs_own_detection():
    cpu = cpu_info()
    assert cpu.model and cpu.flags
    assert ("avx512_bf16" in cpu.flags) == torch.cpu._is_avx512_bf16_supported()
    assert ("avx2" in cpu.flags) == torch.cpu._is_avx2_supported()


@pytest.mark.parametrize(
    ("flags", "option", "expected"),
    [
        pytest.param(("avx512_bf16",), "bfloat16", torch.bfloat16, id="bfloat16-native"),
        pytest.param(("avx512_bf16",), "auto", None, id="auto-native"),
        pytest.param(("avx2",), "auto", None, id="auto-avx2"),
        pytest.param(("avx2",), "float32", None, id="float32-avx2"),
    ],
)
def test_training_autocast_is_bfloat16_only_where_native_and_asked(monkeypatch, flags, option, expected):
    pretend_cpu(monkeypatch, *flags)
    resolved = training_precision(option, CPU_DEVICE)
    assert resolved == ("bfloat16" if expected is not None else "float32")
    with training_autocast(CPU_DEVICE, resolved):
        assert torch.is_autocast_enabled("cpu") == (expected is not None)
        out = torch.nn.functional.linear(torch.ones(2, 3), torch.ones(4, 3))
    assert out.dtype == (expected or torch.float32)


def test_training_precision_refuses_emulated_bfloat16_and_unknown_names(monkeypatch):
    pretend_cpu(monkeypatch, "avx2")
    with pytest.raises(ValueError, match=r"precision 'bfloat16' needs a device that computes it natively.*Test CPU"):
        training_precision("bfloat16", CPU_DEVICE)
    with pytest.raises(ValueError, match=r"precision must be one of .* got 'float16'"):
        training_precision("float16", CPU_DEVICE)


ROWS = [[5, 17, 33, 2, 9, 100, 41], [7], [250, 3, 3, 80], [12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22]]
OVERFLOW = 42  # a token whose embedding overflows every hidden state it reaches


@pytest.fixture
def model(tiny_config) -> GPTClassifier:
    torch.manual_seed(0)
    return GPTClassifier(tiny_config).eval().requires_grad_(False)


def logits(model, rows):
    with torch.inference_mode():
        return model(*pad_right(rows))


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch built without oneDNN")
def test_packed_linears_give_the_plain_models_logits_and_keep_a_nan_row_to_itself(model):
    model.transformer.wte.weight[OVERFLOW] = 3e38
    rows = [*ROWS, [5, OVERFLOW, 6]]
    plain = logits(model, rows)
    packed = pack_linears(model)
    assert not any(isinstance(m, torch.nn.Linear) for m in packed.modules())
    assert sum(isinstance(m, PackedLinear) for m in packed.modules()) == 4 * model.config.n_layer + 1  # + the head
    together = logits(packed, rows)
    torch.testing.assert_close(together, plain, rtol=1e-4, atol=1e-5, equal_nan=True)
    assert torch.isnan(together[-1]).all() and torch.isfinite(together[:-1]).all()
    torch.testing.assert_close(together[:-1], torch.cat([logits(packed, [row]) for row in ROWS]), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    ("environment", "expected"),
    [
        ({}, str(ONEDNN_CACHE_CAPACITY)),
        ({"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "64"}, "64"),
        ({"DNNL_PRIMITIVE_CACHE_CAPACITY": "64"}, None),  # oneDNN's older name, read when the newer is unset
        ({"LRU_CACHE_CAPACITY": "64"}, str(ONEDNN_CACHE_CAPACITY)),  # ideep's own cache, sized on its own
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])  # bfloat16 products run on oneDNN too
def test_a_cpu_model_bounds_onednns_kernel_cache_unless_the_environment_sizes_it(
    monkeypatch, model, environment, expected, dtype
):
    for variable in ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "DNNL_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY"):
        monkeypatch.delenv(variable, raising=False)
    for variable, value in environment.items():
        monkeypatch.setenv(variable, value)
    prepare_for_inference(model.to(dtype), int8=False)
    assert os.environ.get("ONEDNN_PRIMITIVE_CACHE_CAPACITY") == expected
    assert os.environ["LRU_CACHE_CAPACITY"] == environment.get("LRU_CACHE_CAPACITY", str(ONEDNN_CACHE_CAPACITY))


@pytest.mark.parametrize("value", ["0", "abc", "-1", ""])
def test_an_lru_cache_capacity_that_would_crash_onednn_is_refused_by_name(monkeypatch, model, value):
    monkeypatch.setenv("LRU_CACHE_CAPACITY", value)
    with pytest.raises(ValueError, match=f"LRU_CACHE_CAPACITY must be a positive integer.*got '{value}'"):
        prepare_for_inference(model, int8=False)
    assert any(isinstance(m, torch.nn.Linear) for m in model.modules())  # refused before anything changed


ONEDNN_X86 = torch.backends.mkldnn.is_available() and platform.machine().lower() in ("x86_64", "amd64")
BFLOAT16_PACKS = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


@pytest.mark.parametrize(
    ("dtype", "int8", "linear"),
    [
        (torch.float32, False, PackedLinear),
        (torch.float32, True, Int8Linear if ONEDNN_X86 else torch.ao.nn.quantized.dynamic.Linear),
        (torch.bfloat16, False, PackedLinear if BFLOAT16_PACKS else torch.nn.Linear),
    ],
)
def test_prepare_for_inference_packs_float32_on_cpu_and_quantizes_when_asked(model, dtype, int8, linear):
    prepare_for_inference(model.to(dtype), int8)
    assert type(model.transformer.h[0].mlp.c_fc) is linear
    fused = linear in (PackedLinear, Int8Linear)  # the GELU runs inside c_fc
    assert isinstance(model.transformer.h[0].mlp.gelu, torch.nn.Identity if fused else torch.nn.GELU)


def test_int8_off_x86_falls_back_to_torchs_dynamic_quantization(monkeypatch, model):
    monkeypatch.setattr(platform, "machine", lambda: "aarch64")
    quantize_int8(model)
    assert type(model.transformer.h[0].mlp.c_fc) is torch.ao.nn.quantized.dynamic.Linear
    assert isinstance(model.transformer.h[0].mlp.gelu, torch.nn.GELU)


@pytest.mark.parametrize(
    "x",
    [
        torch.linspace(-3, 5, 40).view(4, 10),
        torch.linspace(0.5, 2, 12).view(3, 4),  # all positive: the range still holds 0
        torch.zeros(2, 3),
    ],
)
def test_quantize_uint8_spans_the_range_with_zero_and_rounds_to_the_nearest_level(x):
    u8, scale, zero_point, overflowed = quantize_uint8(x)
    assert overflowed is None
    assert u8.dtype == torch.uint8 and u8.shape == x.shape
    restored = (u8.float() - zero_point) * scale
    assert (restored - x).abs().max() <= scale / 2 + 1e-6
    if x.min() < 0 < x.max():
        assert (u8.min(), u8.max()) == (0, 255)  # all 256 levels over the range


def test_quantize_uint8_leaves_non_finite_values_out_of_the_range():
    x = torch.tensor([[1.0, float("nan"), -2.0], [float("inf"), 0.5, -float("inf")]])
    u8, scale, zero_point, overflowed = quantize_uint8(x)
    finite = torch.isfinite(x)
    assert overflowed.tolist() == [True, True] and quantize_uint8(x[:1, ::2])[3] is None
    assert scale == pytest.approx(3 / 255)
    assert ((u8.float() - zero_point) * scale - x)[finite].abs().max() <= scale / 2 + 1e-6


# A model wide enough for oneDNN's blocked kernels (the tiny one's 32 features fit in one block), short enough to test
MID_CONFIG = GPTConfig(n_layer=2, n_head=4, n_embd=256, block_size=128, vocab_size=300)
MID_ROWS = [
    [100 + (7 * i + 3 * j) % 200 for j in range(n)] for i, n in enumerate([1, 3, 17, 18, 40, 41, 64, 90, 5, 33])
]


@pytest.fixture
def mid_model() -> GPTClassifier:
    torch.manual_seed(0)
    return GPTClassifier(MID_CONFIG).eval().requires_grad_(False)


@pytest.mark.skipif(not ONEDNN_X86, reason="oneDNN int8 runs on x86 only")
def test_int8_gives_float32s_probabilities_within_the_bar_and_keeps_a_nan_row_to_itself(mid_model):
    mid_model.transformer.wte.weight[OVERFLOW] = 3e38
    rows = [*MID_ROWS, [5, OVERFLOW, 6]]
    plain = probabilities(logits(mid_model, rows))
    int8 = probabilities(logits(quantize_int8(mid_model), rows))
    assert sum(isinstance(m, Int8Linear) for m in mid_model.modules()) == 4 * MID_CONFIG.n_layer + 1  # + the head
    assert torch.isnan(int8[-1]).all() and torch.isfinite(int8[:-1]).all()
    torch.testing.assert_close(int8[:-1], plain[:-1], rtol=0, atol=2e-2)  # the bar of test_classifier's int8 test
    assert not torch.equal(int8[:-1], plain[:-1])  # computed in int8
    alone = torch.cat([probabilities(logits(mid_model, [row])) for row in MID_ROWS])
    torch.testing.assert_close(int8[:-1], alone, rtol=0, atol=2e-2)  # the activations' range is the batch's


@pytest.mark.skipif(not BFLOAT16_PACKS, reason="oneDNN takes no bfloat16 on this CPU")
def test_packed_bfloat16_gives_the_plain_bfloat16_models_probabilities(mid_model):
    plain = probabilities(logits(mid_model, MID_ROWS))
    bfloat16 = mid_model.to(torch.bfloat16)
    unpacked = probabilities(logits(bfloat16, MID_ROWS))
    packed = probabilities(logits(pack_linears(bfloat16), MID_ROWS))
    assert sum(isinstance(m, PackedLinear) for m in bfloat16.modules()) == 4 * MID_CONFIG.n_layer + 1
    torch.testing.assert_close(packed, unpacked, rtol=0, atol=1e-2)  # both bfloat16, rounded in other places
    torch.testing.assert_close(packed, plain, rtol=0, atol=2e-2)  # the bar of test_classifier's bfloat16 test


@pytest.mark.parametrize(("flags", "offered"), [(("avx512_bf16",), True), (("avx2",), False)])
def test_float16_on_cpu_is_refused_offering_bfloat16_only_where_native(monkeypatch, flags, offered):
    pretend_cpu(monkeypatch, *flags)
    with pytest.raises(ValueError, match="dtype 'float16' is not supported on CPU; use float32") as refused:
        check_precision(CPU_DEVICE, "float16", quantize_int8=False)
    assert ("bfloat16 (this CPU computes it natively)" in str(refused.value)) is offered
