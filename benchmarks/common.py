"""What every benchmark shares: the real data beside the project, the machine it ran on, JSON and a table."""

import json
import os
import platform
import sys
from datetime import UTC, datetime
from pathlib import Path

import torch
import torch.nn.functional as F

from training.runtime.inference import pad_right
from training.runtime.model import GPTClassifier, Packing
from training.runtime.precision import cpu_info

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("SPAMGPT_SHARED_DATA", ROOT.parent / "shared" / "data"))
SMS_FILE = SHARED_DATA / "sms-spam-collection" / "SMSSpamCollection"
BPE_DIR = SHARED_DATA / "gpt2-bpe"
RESULTS = ROOT / "benchmarks" / "results"


def require_shared_data() -> None:
    if not SMS_FILE.is_file() or not (BPE_DIR / "vocab.bpe").is_file():
        sys.exit(f"benchmarks need the real SMS data and GPT-2 BPE files under {SHARED_DATA} (SPAMGPT_SHARED_DATA)")


def machine() -> dict:
    """The machine a benchmark ran on: CPU model and vector flags (training.runtime.precision.cpu_info, the detection
    the
    dtype rule uses), cores, torch and its threads, the GPU if any, Python."""
    cpu = cpu_info()
    return {
        "cpu": cpu.model,
        "cpu_vector_flags": cpu.vector_flags,
        "cpu_native_bfloat16": cpu.native_bfloat16,
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "python": platform.python_version(),
    }


def write_result(name: str, result: dict) -> Path:
    """benchmarks/results/<name>.json with the machine and time of the run added."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    payload = {"benchmark": name, "created": datetime.now(UTC).isoformat(timespec="seconds"), "machine": machine()}
    path.write_text(json.dumps({**payload, **result}, indent=2) + "\n")
    return path


def print_table(rows: list[dict]) -> None:
    """A plain aligned table of dicts sharing their keys."""
    if not rows:
        return
    keys = list(rows[0])
    cells = [[_fmt(row.get(k)) for k in keys] for row in rows]
    widths = [max(len(k), *(len(c[i]) for c in cells)) for i, k in enumerate(keys)]
    print("  ".join(k.ljust(w) for k, w in zip(keys, widths, strict=True)))
    for c in cells:
        print("  ".join(v.ljust(w) for v, w in zip(c, widths, strict=True)))


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def reference_logits(model: GPTClassifier, rows: list[list[int]], pad_to: int, pad_id: int) -> torch.Tensor:
    """The reference's forward: rows truncated and padded to `pad_to`, every block at every position, the hidden
    state at position -1 (a pad token's, for any row shorter than pad_to)."""
    idx, _ = pad_right([row[:pad_to] for row in rows], pad_id)
    idx = F.pad(idx, (0, pad_to - idx.size(1)), value=pad_id)  # (B, pad_to)
    every = torch.full((idx.size(0),), pad_to)  # the reference's padding is read as tokens like any other
    hidden = model.prefix(idx, Packing(every, idx.device), model.config.n_layer).view(idx.size(0), pad_to, -1)
    return model.score(model.transformer.ln_f(hidden[:, -1]))
