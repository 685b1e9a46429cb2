"""Which precision a loaded classifier runs in: the dtype "auto" means, which dtypes and int8 each device takes,
and int8 dynamic quantization. One rule for the server (app.settings, app.engine) and for file scoring
(training.scoring), so that the same options mean the same thing in both."""

import warnings

import torch
from torch import nn

DTYPES = ("auto", "float32", "float16", "bfloat16")
HALF_DTYPES = ("float16", "bfloat16")
DTYPE_HELP = "auto (float32 on CPU, float16 on CUDA), float32, float16 or bfloat16; half types only on CUDA"


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
    """The torch dtype: "auto" -> float16 on CUDA, float32 elsewhere; any other name of DTYPES -> that torch dtype."""
    if dtype == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return getattr(torch, dtype)


def quantize_int8(model: nn.Module) -> nn.Module:
    """Every nn.Linear of `model` replaced in place by torch's dynamic int8 version (weights int8, activations
    quantized per batch; CPU only). Returns `model`."""
    with warnings.catch_warnings():
        # torch marks its eager quantization deprecated in favour of torchao, which we do not depend on
        warnings.filterwarnings("ignore", message=r"(?s).*deprecated")
        torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8, inplace=True)
    return model
