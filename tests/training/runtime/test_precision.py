import os
from pathlib import Path

import pytest
import torch

from tests.helpers import pretend_cpu
from training.runtime.inference import pad_right
from training.runtime.model import GPTClassifier
from training.runtime.precision import (
    CPU,
    ONEDNN_CACHE_CAPACITY,
    PackedLinear,
    cpu_info,
    pack_linears,
    prepare_for_inference,
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


@pytest.mark.parametrize(
    ("dtype", "int8", "linear"),
    [
        (torch.float32, False, PackedLinear),
        (torch.float32, True, torch.ao.nn.quantized.dynamic.Linear),
        (torch.bfloat16, False, torch.nn.Linear),  # bfloat16 matrix products already run on oneDNN
    ],
)
def test_prepare_for_inference_packs_float32_on_cpu_and_quantizes_when_asked(model, dtype, int8, linear):
    prepare_for_inference(model.to(dtype), int8)
    assert type(model.transformer.h[0].mlp.c_fc) is linear
