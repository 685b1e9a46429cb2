"""Which precision a loaded classifier runs in: the dtype "auto" means, which dtypes and int8 each device takes,
what the CPU computes natively, int8 dynamic quantization, and float32 weights packed for the CPU. One rule for every
consumer that loads a classifier (training.runtime.classifier: the server, file scoring, Ray) and for fine-tuning's
precision (training.finetune.loop), so that the same options mean the same thing in all of them."""

import contextlib
import functools
import math
import os
import platform
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from training.runtime.model import MLP

DTYPES = ("auto", "float32", "float16", "bfloat16")
HALF_DTYPES = ("float16", "bfloat16")
DTYPE_HELP = (
    "auto (float32 on CPU; on CUDA bfloat16 where the GPU has it natively, else float16), float32, float16 or "
    "bfloat16; float16 only on CUDA, bfloat16 on CUDA and on CPUs that compute it natively (avx512_bf16 or amx_bf16)"
)
# x86 CPU flags (Linux /proc/cpuinfo names) under which oneDNN multiplies bfloat16 natively; without one of them
# torch emulates bfloat16 through float32, slower than float32 itself.
NATIVE_BFLOAT16_FLAGS = ("avx512_bf16", "amx_bf16")
# The flags that say which vector units a CPU has, for benchmark records: SIMD widths, FMA, int8 dot products (VNNI),
# bfloat16 and float16 instructions, AMX tiles.
VECTOR_FLAG_PREFIXES = ("sse", "ssse", "avx", "fma", "f16c", "amx", "asimd", "sve", "bf16", "i8mm")


@dataclass(frozen=True)
class CPU:
    """The host CPU as Linux describes it: `model` its name, `flags` its feature flags (x86 `flags`, Arm
    `Features`). Without /proc/cpuinfo the flags are empty (nothing is taken to be native) and the model is
    platform's name for the processor."""

    model: str
    flags: frozenset[str]

    @property
    def vector_flags(self) -> list[str]:
        """The flags naming vector units (VECTOR_FLAG_PREFIXES), sorted."""
        return sorted(f for f in self.flags if f.startswith(VECTOR_FLAG_PREFIXES))

    @property
    def native_bfloat16(self) -> bool:
        """Whether this CPU multiplies bfloat16 natively (one of NATIVE_BFLOAT16_FLAGS)."""
        return any(flag in self.flags for flag in NATIVE_BFLOAT16_FLAGS)


@functools.cache
def cpu_info() -> CPU:
    """The host CPU, read once from /proc/cpuinfo (its first processor: a machine's cores are alike)."""
    model, flags = platform.processor() or platform.machine(), frozenset()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name":
                    model = value.strip()
                elif key in ("flags", "Features"):
                    flags = frozenset(value.split())
                elif not line.strip() and flags:
                    break  # end of the first processor
    except OSError:
        pass
    return CPU(model, flags)


def check_precision(device: torch.device, dtype: str, quantize_int8: bool) -> None:
    """Refuse what a device cannot run well: float16 on CPU (slow or unsupported there), bfloat16 on a CPU that
    would emulate it (no NATIVE_BFLOAT16_FLAGS: slower than float32), int8 off the CPU (torch's dynamic
    quantization has CPU kernels only) or on a half-precision model (it quantizes float32 weights).

    Raises ValueError naming the dtype, device or missing CPU feature.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    if device.type == "cpu" and dtype == "float16":
        native = ", bfloat16 (this CPU computes it natively)" if native_bfloat16(device) else ""
        raise ValueError(f"dtype {dtype!r} is not supported on CPU; use float32{native}, or quantize_int8 for speed")
    if device.type == "cpu" and dtype == "bfloat16" and not native_bfloat16(device):
        raise ValueError(
            f"dtype 'bfloat16' on CPU needs native bfloat16 (CPU flag {' or '.join(NATIVE_BFLOAT16_FLAGS)}), which"
            f" this CPU ({cpu_info().model}) lacks: torch would emulate it, slower than float32; use float32, or"
            " quantize_int8 for speed"
        )
    if quantize_int8 and device.type != "cpu":
        raise ValueError(f"quantize_int8 runs on CPU only, got device {str(device)!r}; use dtype float16 on CUDA")
    if quantize_int8 and dtype in HALF_DTYPES:
        raise ValueError(f"quantize_int8 quantizes a float32 model, got dtype {dtype!r}; use dtype auto or float32")


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """The torch dtype: "auto" -> on CUDA bfloat16 where the GPU computes it natively (float32's range: GPT-2's
    activations are known to overflow float16), else float16; float32 elsewhere, even on a CPU with native
    bfloat16, so that a CPU's probabilities (and the thresholds chosen on them) are the same on every CPU: measured
    (docs/performance.md), bfloat16 runs 0.66x float32 on an Intel Xeon with avx512_bf16 and no AMX (its matrix
    product 0.56x), 1.68x on an AMD Zen 4 and 2.39x on a Xeon with amx_bf16, int8 faster still on all three, and
    its probabilities differ from float32's by up to about 1e-2: ask for it with dtype bfloat16. Any other name of
    DTYPES -> that torch dtype."""
    if dtype != "auto":
        return getattr(torch, dtype)
    if device.type != "cuda":
        return torch.float32
    return torch.bfloat16 if cuda_supports_bfloat16(device) else torch.float16


def cuda_supports_bfloat16(device: torch.device) -> bool:
    """Whether the CUDA `device` computes bfloat16 natively (Ampere and later); emulated bfloat16 is slow."""
    with torch.cuda.device(device):
        return torch.cuda.is_bf16_supported(including_emulation=False)


def native_bfloat16(device: torch.device) -> bool:
    """Whether `device` computes bfloat16 natively: a CUDA GPU from Ampere on, a CPU with NATIVE_BFLOAT16_FLAGS."""
    if device.type == "cuda":
        return cuda_supports_bfloat16(device)
    return device.type == "cpu" and cpu_info().native_bfloat16


TRAINING_PRECISIONS = ("auto", "float32", "bfloat16")
TRAINING_PRECISION_HELP = (
    "what fine-tuning computes in. auto: float32 on every CPU, so that the same command trains the same model "
    "whether or not the CPU has native bfloat16 (bfloat16 autocast changes the trained weights); on CUDA, bfloat16 "
    "autocast where the GPU computes it natively (float32's range, no loss scaling), else float32. bfloat16: autocast "
    "on CUDA or on a CPU with avx512_bf16 or amx_bf16 (refused where it would be emulated, slower than float32). The "
    "checkpoint records the precision that ran"
)


def training_precision(precision: str, device: torch.device) -> str:
    """The precision fine-tuning computes in on `device` for the option `precision` (TRAINING_PRECISIONS):
    "auto" -> "bfloat16" on a CUDA device that computes it natively, "float32" elsewhere (every CPU: the same
    command trains the same weights on CPUs with and without native bfloat16); "float32" and "bfloat16" as given.

    Raises ValueError for an unknown name, or "bfloat16" on a device without native bfloat16 (native_bfloat16).
    """
    if precision not in TRAINING_PRECISIONS:
        raise ValueError(f"precision must be one of {TRAINING_PRECISIONS}, got {precision!r}")
    if precision == "auto":
        return "bfloat16" if device.type == "cuda" and native_bfloat16(device) else "float32"
    if precision == "bfloat16" and not native_bfloat16(device):
        raise ValueError(
            f"precision 'bfloat16' needs a device that computes it natively (a CUDA GPU from Ampere on, or a CPU "
            f"with {' or '.join(NATIVE_BFLOAT16_FLAGS)}); {str(device)!r} ({cpu_info().model}) would emulate it, "
            "slower than float32: use float32"
        )
    return precision


def training_autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """The autocast fine-tuning's forward passes run under on `device` for a resolved `precision`
    (training_precision): bfloat16 autocast for "bfloat16", none for "float32"."""
    assert precision in ("float32", "bfloat16"), f"an unresolved training precision {precision!r}"
    if precision == "bfloat16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


# oneDNN compiles a kernel per input shape and caches it, in oneDNN's primitive cache and in the cache of torch's
# bindings (ideep), 1024 entries each by default; a packed batch's token count differs from batch to batch, so a
# server would add a few MB per new count until both are full (measured: 760 MB after some 400 shapes; bounding only
# oneDNN's still grew 290 MB in 300 batches). One forward pass uses 4 linear shapes at its token count and up to 5
# at its row count (the last block and the head): 16 entries keep a pass's kernels, and memory stays flat.
ONEDNN_CACHE_CAPACITY = 16
# Each cache's size as read from the environment: oneDNN's under either name (the first set wins), then ideep's.
ONEDNN_CACHE_VARIABLES = ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "DNNL_PRIMITIVE_CACHE_CAPACITY")
IDEEP_CACHE_VARIABLE = "LRU_CACHE_CAPACITY"
# The row count oneDNN picks the packed weight layout for: about a default batch's packed tokens (32 SMS texts of
# some 20 tokens); any row count runs on it, and 64 to 4096 measured alike.
PACKING_ROWS_HINT = 512


# oneDNN post-ops the linear layers fuse, as torch's oneDNN bindings name them: (post-op, its scalars, algorithm).
# "gelu_tanh" is GPT-2's activation (MLP.gelu), computed on the product's output while it is still in cache.
POST_OPS = {"none": ("none", [], ""), "gelu_tanh": ("gelu", [], "tanh")}


class PackedLinear(nn.Module):
    """An nn.Linear whose weight is reordered once into oneDNN's blocked layout for this CPU, so that each call
    multiplies without repacking it (what torch.compile's CPU weight freezing does; torch.ops.mkldnn, torch's
    oneDNN bindings), followed by the `activation` of POST_OPS fused into the product. (..., in_features) float32 or
    bfloat16 -> (..., out_features) in the same dtype, the nn.Linear's result (then the activation) up to float
    rounding. Inference only: the packed weight takes no gradient and is not in the state dict."""

    def __init__(self, linear: nn.Linear, activation: str = "none"):
        super().__init__()
        self.in_features, self.out_features, self.activation = linear.in_features, linear.out_features, activation
        weight = linear.weight.detach()
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, PACKING_ROWS_HINT)
        self.bias = None if linear.bias is None else linear.bias.detach().clone()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, *POST_OPS[self.activation])


class Int8Linear(nn.Module):
    """An nn.Linear in int8 on oneDNN's quantized matrix product (u8 x s8 with int32 accumulation: VNNI where the
    CPU has it), followed by the `activation` of POST_OPS fused into the product: what torch's x86 int8 inference
    (PT2E quantization with torch.compile) runs, here without a compiler.

    Weights: int8, symmetric, one scale per output channel (the row's largest magnitude maps to 127). Activations:
    quantized per call to uint8 over the whole input's range (torch.quantize_per_tensor_dynamic, all 8 bits).
    (..., in_features) float32 -> (..., out_features) float32. Inference only; the int8 weight is not in the state
    dict.
    """

    def __init__(self, linear: nn.Linear, activation: str = "none"):
        super().__init__()
        self.in_features, self.out_features, self.activation = linear.in_features, linear.out_features, activation
        weight = linear.weight.detach().float()
        self.weight_scale = weight.abs().amax(dim=1).clamp(min=torch.finfo(torch.float32).tiny) / 127  # (out,)
        int8 = torch.round(weight / self.weight_scale[:, None]).clamp(-127, 127).to(torch.int8)
        self.packed = torch.ops.onednn.qlinear_prepack(int8, [PACKING_ROWS_HINT, self.in_features])
        self.weight_zero_point = torch.zeros(self.out_features, dtype=torch.long)
        self.bias = None if linear.bias is None else linear.bias.detach().float().clone()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        u8, scale, zero_point, overflowed = quantize_uint8(x.reshape(-1, self.in_features))
        y = torch.ops.onednn.qlinear_pointwise(
            u8, scale, zero_point, self.packed, self.weight_scale, self.weight_zero_point, self.bias,
            1.0, 0, torch.float32, *POST_OPS[self.activation],
        )  # fmt: skip
        if overflowed is not None:  # NaN, as float32 would give: attention carries it to the row's other tokens
            y[overflowed] = float("nan")
        return y.view(*shape[:-1], self.out_features)


def quantize_uint8(x: torch.Tensor) -> tuple[torch.Tensor, float, int, torch.Tensor | None]:
    """(M, K) float32 -> ((M, K) uint8, scale, zero point, overflowed), x ~ scale * (uint8 - zero point): all 256
    levels over [min(x, 0), max(x, 0)] (torch's choose_qparams; the range read in one pass, where
    quantize_per_tensor_dynamic makes two). overflowed: None when x is finite, else (M,) bool, the rows holding a
    non-finite value; those values are left out of the range and quantized as 0, so the other rows keep their
    precision (the caller makes the overflowed rows' outputs NaN again)."""
    low, high = torch.aminmax(x)
    low, high = min(low.item(), 0.0), max(high.item(), 0.0)
    if not math.isfinite(high - low):  # in float64: finite for any finite float32 x
        overflowed = ~torch.isfinite(x).all(dim=1)
        return *quantize_uint8(x.nan_to_num(0.0, 0.0, 0.0))[:3], overflowed
    scale = (high - low) / 255 or 1.0
    zero_point = min(max(round(-low / scale), 0), 255)
    with warnings.catch_warnings():  # torch marks its quantized dtypes deprecated; the kernel takes plain uint8
        warnings.filterwarnings("ignore", message=r"(?s).*deprecated")
        q = torch.quantize_per_tensor(x, scale, zero_point, torch.quint8)
    # the quantized tensor's bytes as a plain uint8 tensor, without int_repr's copy
    u8 = torch.empty(0, dtype=torch.uint8).set_(q.untyped_storage(), 0, q.shape, q.stride())
    return u8, scale, zero_point, None


def can_pack(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether pack_linears applies: a CPU torch runs oneDNN on, and a float32 model, or a bfloat16 one where oneDNN
    takes bfloat16 (torch's check: AVX-512 at least; without it bfloat16 stays on nn.Linear)."""
    if device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    return dtype == torch.float32 or (dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def replace_linears(model: nn.Module, make) -> nn.Module:
    """Every nn.Linear of `model` replaced in place by make(linear, activation), the MLPs' GELU fused into their c_fc
    (activation "gelu_tanh", MLP.gelu then the identity) and "none" elsewhere; returns `model`.

    Every other tensor of the model is copied afresh, out of the checkpoint file's memory map
    (safetensors.torch.load_file): measured on the 124M model, without the copies the replaced weights' 330 MB stayed
    resident beside the packed ones; with them it is returned.
    """
    for module in list(model.modules()):
        if isinstance(module, MLP) and isinstance(module.c_fc, nn.Linear):
            module.c_fc, module.gelu = make(module.c_fc, "gelu_tanh"), nn.Identity()
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                setattr(module, name, make(child, "none"))
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            tensor.data = tensor.data.clone()
    return model


def pack_linears(model: nn.Module) -> nn.Module:
    """Every nn.Linear of a float32 or bfloat16 CPU `model` (can_pack) replaced in place by a PackedLinear, the MLPs'
    GELU fused (replace_linears); returns `model`. Measured on 2 cores of an AVX2 AMD EPYC (benchmarks/README.md,
    "ONNX Runtime and bfloat16"): the engine 1.27x ONNX Runtime's float32 on the same batches, against 1.14x unpacked;
    bfloat16 on a native-bfloat16 CPU: docs/performance.md. Callers bound oneDNN's kernel cache first
    (bound_onednn_cache, as prepare_for_inference does), or memory grows with every new batch shape."""
    return replace_linears(model, PackedLinear)


def quantize_int8(model: nn.Module) -> nn.Module:
    """Every nn.Linear of a float32 CPU `model` replaced in place by an Int8Linear, the MLPs' GELU fused
    (replace_linears), on an x86 CPU torch runs oneDNN on; elsewhere (Arm, a torch without oneDNN) by torch's dynamic
    int8 nn.Linear (the same quantization but per-tensor weights, no fusion). Returns `model`. Measured against
    torch's dynamic int8 and ONNX Runtime's in docs/performance.md. Callers bound oneDNN's kernel cache first, as for
    pack_linears."""
    if torch.backends.mkldnn.is_available() and platform.machine().lower() in ("x86_64", "amd64"):
        return replace_linears(model, Int8Linear)
    with warnings.catch_warnings():
        # torch marks its eager quantization deprecated in favour of torchao, which we do not depend on
        warnings.filterwarnings("ignore", message=r"(?s).*deprecated")
        torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8, inplace=True)
    return model


def bound_onednn_cache() -> None:
    """Bound oneDNN's kernel caches (oneDNN's own and ideep's) to ONEDNN_CACHE_CAPACITY entries each, unless the
    environment sizes them (ONEDNN_CACHE_VARIABLES, IDEEP_CACHE_VARIABLE). Takes effect where no oneDNN kernel has
    run in the process yet.

    Raises ValueError for an LRU_CACHE_CAPACITY that is not a positive integer: ideep reads it on the first packed
    product and kills the process on 0 or on text.
    """
    lru = os.environ.get(IDEEP_CACHE_VARIABLE)
    if lru is not None and not (lru.strip().isdigit() and int(lru) > 0):
        raise ValueError(f"{IDEEP_CACHE_VARIABLE} must be a positive integer (torch's oneDNN cache size), got {lru!r}")
    if not any(variable in os.environ for variable in ONEDNN_CACHE_VARIABLES):
        os.environ[ONEDNN_CACHE_VARIABLES[0]] = str(ONEDNN_CACHE_CAPACITY)
    os.environ.setdefault(IDEEP_CACHE_VARIABLE, str(ONEDNN_CACHE_CAPACITY))


def prepare_for_inference(model: nn.Module, int8: bool) -> nn.Module:
    """A loaded model made ready to serve on its device, in place: int8 quantization when `int8` (CPU;
    check_precision refuses it elsewhere), else packed linear layers for float32 and bfloat16 on CPU (can_pack), else
    as it is. On CPU, oneDNN's kernel cache is bounded first (bound_onednn_cache): packed float32, bfloat16 and int8
    products all run on oneDNN. Returns `model`.

    Raises ValueError for an LRU_CACHE_CAPACITY that would crash oneDNN (bound_onednn_cache).
    """
    first = next(model.parameters())
    if first.device.type == "cpu":
        bound_onednn_cache()
    if int8:
        return quantize_int8(model)
    return pack_linears(model) if can_pack(first.device, first.dtype) else model
