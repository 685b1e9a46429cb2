"""Which precision a loaded classifier runs in: the dtype "auto" means, which dtypes and int8 each device takes,
and int8 dynamic quantization. One rule for the server (app.settings, app.engine) and for file scoring
(training.scoring), so that the same options mean the same thing in both."""

import warnings

import torch
from torch import nn

DTYPES = ("auto", "float32", "float16", "bfloat16")
HALF_DTYPES = ("float16", "bfloat16")
DTYPE_HELP = (
    "auto (float32 on CPU; on CUDA bfloat16 where the GPU has it natively, else float16), float32, float16 or "
    "bfloat16; half types only on CUDA"
)


def check_precision(device: torch.device, dtype: str, quantize_int8: bool) -> None:
    """Refuse what a device cannot run well: half types on CPU (slow or unsupported there), int8 off the CPU
    (torch's dynamic quantization has CPU kernels only).

    Raises ValueError naming the dtype or device.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    if device.type == "cpu" and dtype in HALF_DTYPES:
        raise ValueError(f"dtype {dtype!r} is not supported on CPU; use float32, or quantize_int8 for speed")
    if quantize_int8 and device.type != "cpu":
        raise ValueError(f"quantize_int8 runs on CPU only, got device {str(device)!r}; use dtype float16 on CUDA")


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """The torch dtype: "auto" -> on CUDA bfloat16 where the GPU computes it natively (float32's range: GPT-2's
    activations are known to overflow float16), else float16; float32 elsewhere. Any other name of DTYPES -> that
    torch dtype."""
    if dtype != "auto":
        return getattr(torch, dtype)
    if device.type != "cuda":
        return torch.float32
    return torch.bfloat16 if cuda_supports_bfloat16(device) else torch.float16


def cuda_supports_bfloat16(device: torch.device) -> bool:
    """Whether the CUDA `device` computes bfloat16 natively (Ampere and later); emulated bfloat16 is slow."""
    with torch.cuda.device(device):
        return torch.cuda.is_bf16_supported(including_emulation=False)


def quantize_int8(model: nn.Module) -> nn.Module:
    """Every nn.Linear of `model` replaced in place by torch's dynamic int8 version (weights int8, activations
    quantized per batch; CPU only). Returns `model`."""
    with warnings.catch_warnings():
        # torch marks its eager quantization deprecated in favour of torchao, which we do not depend on
        warnings.filterwarnings("ignore", message=r"(?s).*deprecated")
        torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8, inplace=True)
    return model
