"""Which torch device a run uses: one rule for fine-tuning, evaluation, file scoring, Ray and the server.

`auto` takes cuda, then mps, then cpu: the fastest device the machine has, so that a run does the same thing
whichever command starts it. A CUDA GPU is the fastest where there is one; on an Apple machine MPS runs the model in
float32 faster than its CPU cores. A server that must stay on the CPU says so (SPAMGPT_DEVICE=cpu).
"""

import torch

DEVICE_HELP = "auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps"


def resolve_device(name: str) -> torch.device:
    """`auto` -> the first available of cuda, mps, cpu; anything else is parsed as a torch device.

    Raises ValueError naming the device when torch does not know it.
    """
    if name != "auto":
        try:
            return torch.device(name)
        except RuntimeError as exc:
            raise ValueError(f"unknown device {name!r} (use {DEVICE_HELP})") from exc
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


class DeviceUnavailable(ValueError):
    """A device this machine does not have: a bad option value where the commands take it."""


def require_available(device: torch.device) -> None:
    """Raises DeviceUnavailable naming `device` when it is a CUDA or MPS device this machine does not have."""
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DeviceUnavailable(f"device {str(device)!r} requested but CUDA is not available")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise DeviceUnavailable(f"device {str(device)!r} requested but MPS is not available")
