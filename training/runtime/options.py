"""How a checkpoint is loaded and run for inference: one options type for the server's settings (app.settings builds
one from its SPAMGPT_* fields) and the scoring commands (`predict`'s options, Ray Data), validated by one set of
rules. Apart from training.runtime.classifier so that training.config can hold it without importing the checkpoint
loader."""

from dataclasses import MISSING, dataclass, field

import torch

from training.runtime import precision
from training.runtime.device import DEVICE_HELP, resolve_device
from training.runtime.mail import WINDOW_RULES


def opt(default=MISSING, help: str = "", choices: tuple | None = None, positional: bool = False):
    """A dataclass field whose help text and choices the command line shows (training.cli reads them); positional:
    an argument, not --name. The one definition for every command's options (training.config uses it too)."""
    return field(default=default, metadata={"help": help, "choices": choices, "positional": positional})


@dataclass(frozen=True)
class ClassifierOptions:
    """How a checkpoint is loaded and run: the server's SPAMGPT_DEVICE, _DTYPE, _QUANTIZE_INT8, _TORCH_THREADS,
    _PRIOR, _MAX_BATCH_SIZE, _MAX_BATCH_TOKENS, _MAIL_WINDOWS and _MAIL_MAX_WINDOWS (app.settings.Settings builds one
    from them, and takes its defaults from here), and `predict`'s --device, --dtype, --quantize-int8, --threads,
    --batch-size, --max-batch-tokens, --prior, --mail-windows and --mail-max-windows. Validated on construction.

    Raises ValueError showing the bad value: a device torch does not know (training.runtime.device.resolve_device),
    precision options the device cannot run (training.runtime.precision.check_precision), a prior outside (0, 1), a
    batch or window limit below 1, negative threads or more than MAX_THREADS, a window rule not in WINDOW_RULES.
    """

    device: str = opt("auto", DEVICE_HELP)
    dtype: str = opt("auto", precision.DTYPE_HELP, precision.DTYPES)
    quantize_int8: bool = opt(
        False, "CPU only: int8 weights for every linear layer, 1.5x (AVX2) to 2.6x (VNNI) float32's speed"
    )
    threads: int = opt(0, "torch intra-op threads; 0 keeps torch's default (all cores)")
    batch_size: int = opt(32, "texts per forward pass: larger raises throughput until the device saturates")
    max_batch_tokens: int = opt(16384, "padded tokens (rows x longest row) per forward pass: bounds activation memory")
    prior: float | None = opt(
        None,
        "binary models: the share of the threshold's label (spam) expected in this traffic; probabilities are "
        "corrected to it (default: the checkpoint's prior, the source data's rate)",
    )
    # "first" by measurement (benchmarks/mail_reading.py, docs/mail.md): a model trained on each message's first
    # max_tokens tokens ranks mail better on them than on the mean or max over its windows, at a third of the time
    mail_windows: str = opt(
        "first",
        "how a message longer than max_tokens is read (training.runtime.mail.WINDOW_RULES): first: its first "
        "max_tokens tokens; mean: the mean of its windows' logits; max: its spammiest window",
        WINDOW_RULES,
    )
    mail_max_windows: int = opt(
        8, "mean and max: windows of max_tokens read from one message at most; bounds what one message costs"
    )

    def __post_init__(self):
        precision.check_precision(self.torch_device, self.dtype, self.quantize_int8)
        if self.prior is not None and not 0 < self.prior < 1:
            raise ValueError(f"prior must lie in (0, 1), got {self.prior!r}")
        if self.mail_windows not in WINDOW_RULES:
            raise ValueError(f"mail_windows must be one of {WINDOW_RULES}, got {self.mail_windows!r}")
        for name in ("batch_size", "max_batch_tokens", "mail_max_windows"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)!r}")
        if self.threads < 0:
            raise ValueError(f"threads must not be negative, got {self.threads!r}")
        if self.threads > MAX_THREADS:
            raise ValueError(too_many_threads("threads", self.threads))

    @property
    def torch_device(self) -> torch.device:
        """The device `device` names (training.runtime.device.resolve_device: auto is cuda, then mps, then cpu)."""
        return resolve_device(self.device)

    @property
    def torch_dtype(self) -> torch.dtype:
        """The dtype `dtype` names on torch_device (training.runtime.precision.resolve_dtype)."""
        return precision.resolve_dtype(self.dtype, self.torch_device)


# More intra-op threads than any CPU has only contend, and torch starts every one: 100,000 crash the process. A
# bound that does not depend on this machine, so that a configuration checked here (CI validating a manifest for a
# larger node) means the same on the machine that runs it; the largest two-socket servers have under 1,024 CPUs.
MAX_THREADS = 1024


def too_many_threads(name: str, threads: int) -> str:
    """Why `threads` intra-op threads above MAX_THREADS are refused, naming the option `name`."""
    return f"{name} must be at most {MAX_THREADS} (more threads than CPUs only contend), got {threads!r}"
