from pathlib import Path

import pytest
import torch

from tests.helpers import pretend_cpu
from training.precision import CPU, cpu_info, training_autocast

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


@pytest.mark.parametrize(("flags", "expected"), [(("avx512_bf16",), torch.bfloat16), (("avx2",), None)])
def test_training_autocast_is_bfloat16_only_where_native(monkeypatch, flags, expected):
    pretend_cpu(monkeypatch, *flags)
    with training_autocast(CPU_DEVICE):
        assert torch.is_autocast_enabled("cpu") == (expected is not None)
        out = torch.nn.functional.linear(torch.ones(2, 3), torch.ones(4, 3))
    assert out.dtype == (expected or torch.float32)
