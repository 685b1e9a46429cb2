"""Which torch device a run uses."""

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
