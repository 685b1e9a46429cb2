"""What the benchmarks share: the real data beside the project, the machine a run was on, JSON and a table; the
checkpoints and engines they measure; and the contenders and timing that the engine benchmarks (serve_engine on
CPU, serve_gpu on CUDA) both run. Each benchmark is a script of its own that imports only this module."""

import argparse
import json
import math
import os
import platform
import random
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import torch
import torch.nn.functional as F

from app.settings import Settings
from training.config import MAX_TOKENS
from training.export.formats import hf_state_dict
from training.finetune.data import deduplicate, load_sms_spam
from training.runtime.checkpoint import CheckpointError, ModelCard, load_checkpoint, save_checkpoint
from training.runtime.classifier import Classifier
from training.runtime.inference import pad_right, probabilities
from training.runtime.model import GPTClassifier, GPTConfig, Packing, padding_groups
from training.runtime.precision import cpu_info

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("SPAMGPT_SHARED_DATA", ROOT.parent / "shared" / "data"))
SMS_FILE = SHARED_DATA / "sms-spam-collection" / "SMSSpamCollection"
BPE_DIR = SHARED_DATA / "gpt2-bpe"
RESULTS = ROOT / "benchmarks" / "results"
# random_checkpoint's, written once and reused by the benchmarks that start servers (git-ignored)
RANDOM_CHECKPOINT = ROOT / "benchmarks" / "checkpoints" / "gpt2-random"
# other random weights (seed 1): what a live change loads
SECOND_RANDOM_CHECKPOINT = ROOT / "benchmarks" / "checkpoints" / "gpt2-random-seed1"
SPLIT_OVERHEAD_TOKENS = 64  # what one forward pass costs beyond its tokens, for splitting the stricter setup's passes

Forward = Callable[[list[list[int]]], torch.Tensor]  # token id rows -> probabilities on the CPU, (N, n_labels)


# --- Data, the machine, results --------------------------------------------------------------------------------


def require_shared_data() -> None:
    """Exit with a message unless the real SMS data and GPT-2 BPE files are under SHARED_DATA."""
    if not SMS_FILE.is_file() or not (BPE_DIR / "vocab.bpe").is_file():
        sys.exit(f"benchmarks need the real SMS data and GPT-2 BPE files under {SHARED_DATA} (SPAMGPT_SHARED_DATA)")


def sample_texts(n: int, seed: int) -> list[str]:
    """n distinct real SMS texts, a seeded sample of the deduplicated collection. Exits with a message for an n
    beyond the collection's distinct texts (--texts, which `count` already keeps at 1 or more)."""
    texts = deduplicate(load_sms_spam(SMS_FILE)).texts
    if n > len(texts):
        sys.exit(f"error: --texts {n} exceeds the {len(texts)} distinct texts of {SMS_FILE}")
    return random.Random(seed).sample(texts, n)


def count(value: str) -> int:
    """An argparse type: a whole number of at least 1 (texts, clients, rounds, epochs, steps...)."""
    number = int(value)  # argparse reports the ValueError as "invalid count value"
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value!r}")
    return number


def duration(value: str) -> float:
    """An argparse type: a finite number above 0 (seconds, milliseconds, a rate)."""
    number = float(value)
    if not 0 < number < math.inf:
        raise argparse.ArgumentTypeError(f"must be a finite number above 0, got {value!r}")
    return number


def machine() -> dict:
    """The machine a benchmark ran on: CPU model and vector flags (training.runtime.precision.cpu_info, the
    detection the dtype rule uses), cores, torch and its threads, the GPU if any, Python."""
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


def rss_mib(pid: int) -> float:
    """Process `pid`'s resident memory now (VmRSS from /proc), in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS in /proc/{pid}/status")


def cpu_seconds(pid: int, thread: int | None = None) -> float:
    """Process `pid`'s CPU time so far, user and system, all its threads (utime + stime from /proc), in seconds;
    given `thread` (a thread id of the process; its main thread's is `pid`), that thread's alone."""
    stat = Path(f"/proc/{pid}/stat" if thread is None else f"/proc/{pid}/task/{thread}/stat")
    fields = stat.read_text().rsplit(")", 1)[1].split()  # after the command name
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def require_checkpoint(parser: argparse.ArgumentParser, option: str, path: Path, *files: str) -> None:
    """Exit through `parser` (status 2, before anything is measured) unless `path` holds config.json and `files`."""
    missing = [name for name in ("config.json", *files) if not (path / name).is_file()]
    if missing:
        parser.error(f"{option} {str(path)!r} is not a trained checkpoint: no {', '.join(missing)} there")


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


# --- Checkpoints and engines -----------------------------------------------------------------------------------


def random_checkpoint(directory: Path, seed: int = 0) -> Path:
    """A GPT-2 124M classifier with seeded random weights, saved with the real BPE files."""
    torch.manual_seed(seed)
    model = GPTClassifier(GPTConfig.from_preset("gpt2"))
    card = ModelCard(
        labels=("ham", "spam"),
        max_tokens=MAX_TOKENS,
        threshold=None,
        base_model="gpt2 (random weights)",
    )
    return save_checkpoint(directory, model, BPE_DIR, card)


def cached_random_checkpoint(directory: Path = RANDOM_CHECKPOINT, seed: int = 0) -> Path:
    """random_checkpoint (`seed`, max_tokens 256) in `directory`: written once, reused while this spamgpt loads it."""
    try:
        load_checkpoint(directory)
    except CheckpointError:
        return random_checkpoint(directory, seed)
    return directory


def load_engine(checkpoint: Path, quantize_int8: bool = False, device: str = "cpu", dtype: str = "auto") -> Classifier:
    """The classifier on `checkpoint`, loaded as the server loads it from these settings."""
    settings = Settings(checkpoint_dir=checkpoint, device=device, dtype=dtype, quantize_int8=quantize_int8)
    return Classifier.load(checkpoint, settings.classifier_options())


# --- Contenders and timing of the engine benchmarks ------------------------------------------------------------


def transformers_classifier(model: GPTClassifier, pad_id: int):
    """GPT2ForSequenceClassification holding `model`'s weights, as `python -m training export --format hf` writes
    them (training.export.hf_state_dict: Conv1D weights transposed back, the score bias folded in exactly)."""
    from transformers import GPT2Config, GPT2ForSequenceClassification

    c = model.config
    config = GPT2Config(
        vocab_size=c.vocab_size,
        n_positions=c.block_size,
        n_embd=c.n_embd,
        n_layer=c.n_layer,
        n_head=c.n_head,
        num_labels=c.n_labels,
        pad_token_id=pad_id,  # how it finds each row's last real token
    )
    hf = GPT2ForSequenceClassification(config).eval()
    missing, unexpected = hf.load_state_dict(hf_state_dict(model), strict=False)
    assert not unexpected and all(k.endswith(".attn.bias") for k in missing), (missing, unexpected)
    return hf


def transformers_forward(hf, pad_id: int) -> Forward:
    """Probabilities on the CPU, as Classifier.predict gives them (on CUDA, that waits for the forward to finish)."""
    device = next(hf.parameters()).device

    @torch.inference_mode()
    def forward(rows: list[list[int]]) -> torch.Tensor:
        idx, lengths = pad_right(rows, pad_id, device)
        mask = torch.arange(idx.size(1), device=device) < lengths[:, None]  # (B, T)
        return probabilities(hf(input_ids=idx, attention_mask=mask.long()).logits).cpu()

    return forward


def reference_logits(model: GPTClassifier, rows: list[list[int]], pad_to: int, pad_id: int) -> torch.Tensor:
    """The reference's forward: rows truncated and padded to `pad_to`, every block at every position, the hidden
    state at position -1 (a pad token's, for any row shorter than pad_to)."""
    idx, _ = pad_right([row[:pad_to] for row in rows], pad_id)
    idx = F.pad(idx, (0, pad_to - idx.size(1)), value=pad_id)  # (B, pad_to)
    every = torch.full((idx.size(0),), pad_to)  # the reference's padding is read as tokens like any other
    hidden = model.prefix(idx, Packing(every, idx.device), model.config.n_layer).view(idx.size(0), pad_to, -1)
    return model.score(model.transformer.ln_f(hidden[:, -1]))


def same_forwards(batches: list[list[list[int]]]) -> list[list[list[int]]]:
    """The stricter setup's forward passes: each batch split into rows of similar length by padding_groups."""
    return [
        [batch[i] for i in group]
        for batch in batches
        for group in padding_groups([len(r) for r in batch], SPLIT_OVERHEAD_TOKENS)
    ]


def padded_tokens(batches: list[list[list[int]]]) -> int:
    """Tokens the batches hold once each is padded to its longest row."""
    return sum(len(b) * max(len(r) for r in b) for b in batches)


def time_interleaved(contenders: dict[str, tuple[Forward, list[list[list[int]]]]], rounds: int) -> dict[str, float]:
    """Seconds each contender spends on all its batches. Each round runs the next share of every contender's
    batches, so that other load on the machine is spread over all of them alike."""
    for forward, batches in contenders.values():  # warm-up: the shortest and the longest batch
        forward(batches[0]), forward(batches[-1])
    seconds = dict.fromkeys(contenders, 0.0)
    for r in range(rounds):
        for name, (forward, batches) in contenders.items():
            share = batches[r * len(batches) // rounds : (r + 1) * len(batches) // rounds]
            start = time.perf_counter()
            for batch in share:
                forward(batch)
            seconds[name] += time.perf_counter() - start
    return seconds
