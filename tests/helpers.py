"""Plain helpers shared by the tests: a GPT-2-format BPE tokenizer's files, a model card, settings for an app on a
checkpoint, a live server (from tests.live_server, which the benchmarks use too) and ways to break a checkpoint.
Fixtures live in tests/conftest.py; test modules import helpers from here, never from each other."""

import csv
import json
import os
import pickle
import random
import re
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

import training.runtime.precision
from app.settings import Settings

# re-exported (`x as x`) for the tests that start a server
from tests.live_server import free_port as free_port
from tests.live_server import live_server as live_server
from training.finetune.loop import Examples
from training.runtime.checkpoint import ModelCard, save_checkpoint
from training.runtime.inference import Calibration, Threshold, fold_calibration, prior_shift
from training.runtime.model import GPTClassifier
from training.runtime.prefix import fingerprint
from training.runtime.tokenizer import bpe_hashes

# A few merges in GPT-2's data-gym notation ("Ġ" is a space), enough for multi-byte tokens.
MERGES = ["Ġ t", "h e", "i n", "e r", "Ġ a", "o n", "Ġt he", "Ġ w", "r e", "Ġ s", "Ġ f", "Ġ c", "a t", "o u"]
ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def _data_gym_bytes() -> list[str]:
    """GPT-2's printable stand-in character for each byte, in rank order (as tiktoken reads them)."""
    printable = [b for b in range(256) if chr(b).isprintable() and chr(b) != " "]
    others = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + n) for n in range(len(others))]


def make_bpe_files(directory: Path, merges: list[str] = MERGES) -> Path:
    """vocab.bpe and encoder.json in GPT-2's format with the given merges."""
    directory.mkdir(parents=True, exist_ok=True)
    vocab = _data_gym_bytes() + ["".join(m.split()) for m in merges]
    encoder = {token: rank for rank, token in enumerate(vocab)}
    encoder["<|endoftext|>"] = len(vocab)
    (directory / "vocab.bpe").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    (directory / "encoder.json").write_text(json.dumps(encoder), encoding="utf-8")
    return directory


def documentation_pages() -> list[Path]:
    """README.md and the reference pages under docs/ it links to."""
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def readme_python(containing: str, page: str | None = None) -> str:
    """The one ```python block holding `containing` in `page` (a path from the repository root, e.g.
    "docs/exports.md"; by default README.md and every page under docs/), so a test can run the example a user
    copies."""
    pages = [ROOT / page] if page else documentation_pages()
    found = [
        (path, block)
        for path in pages
        for block in re.findall(r"```python\n(.*?)```", path.read_text(encoding="utf-8"), re.S)
        if containing in block
    ]
    where = [str(path.relative_to(ROOT)) for path, _ in found] or [str(path.relative_to(ROOT)) for path in pages]
    assert len(found) == 1, f"{len(found)} python blocks in {where} hold {containing!r}"
    return found[0][1]


def tiny_card(**overrides) -> ModelCard:
    card = {"labels": ("ham", "spam"), "max_tokens": 48, "threshold": None, "base_model": "random init (tiny)"}
    return ModelCard(**{**card, **overrides})


def tiny_settings(checkpoint_dir: Path, **overrides) -> Settings:
    return Settings(**{"checkpoint_dir": checkpoint_dir, "device": "cpu", **overrides})


def error_of(response, status: int) -> dict:
    """The API error of a response that must have `status`: its type, message and details."""
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"type", "message", "details"}
    return error


# --- Training data and runs ------------------------------------------------------------------------

SPAM_WORDS = ["win", "prize", "cash", "claim", "free", "urgent", "call", "now", "offer", "txt", "bonus", "reply"]
HAM_WORDS = ["see", "you", "at", "lunch", "home", "later", "mum", "thanks", "ok", "tonight", "dinner", "soon"]


def write_messages_csv(path: Path, n: int = 60, seed: int = 0) -> Path:
    """`n` short texts (header text,label), spam and ham alternating, from different words; each unique, so
    deduplication keeps them all."""
    rng = random.Random(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        for i in range(n):
            label, words = ("spam", SPAM_WORDS) if i % 2 else ("ham", HAM_WORDS)
            writer.writerow([" ".join(rng.sample(words, 4)) + f" {i}", label])
    return path


def finetune_argv(csv_data: Path, bpe_dir: Path, out: Path, *extra: str) -> list[str]:
    """`python -m training finetune` arguments for a tiny random model, 2 epochs on CPU (extra ones win)."""
    return [
        "finetune", "--preset", "tiny", "--init", "random", "--data", str(csv_data), "--tokenizer-dir", str(bpe_dir),
        "--out", str(out), "--epochs", "2", "--max-tokens", "48", "--lr", "1e-3", "--device", "cpu", *extra,
    ]  # fmt: skip


# One thread per process: training processes on a shared machine do not fight over cores, and every run of a test
# does its arithmetic alike (a thread count splits matrix products differently)
TRAINING_ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def run_training(argv: list[str], processes: int = 1) -> str:
    """Run `python -m training *argv` in a new process, or under torchrun with that many local `processes`;
    returns its stdout. Fails the test (showing stderr) when it exits non-zero."""
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"] if processes > 1 else []
    done = subprocess.run(
        [sys.executable, *launcher, "-m", "training", *argv], env=TRAINING_ENV, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


# `python -m training`, paused for good after PAUSE_AFTER_STEPS optimizer steps (writing PAUSE_MARKER first)
PAUSING_CLI = """
import os, sys, time
from torch.optim.optimizer import register_optimizer_step_post_hook
from training.cli import main
steps = 0
def pause(optimizer, args, kwargs):
    global steps
    steps += 1
    if steps == int(os.environ["PAUSE_AFTER_STEPS"]):
        open(os.environ["PAUSE_MARKER"], "w").close()
        time.sleep(600)
register_optimizer_step_post_hook(pause)
sys.exit(main(sys.argv[1:]))
"""


def kill_after_steps(argv: list[str], steps: int, log: Path, timeout_s: float = 300) -> None:
    """Run `python -m training *argv` in a new process and SIGKILL it right after its `steps`-th optimizer step:
    a known place, however fast or slow the machine. Its output goes to `log`."""
    marker = log.with_suffix(".paused")
    env = {**TRAINING_ENV, "PAUSE_AFTER_STEPS": str(steps), "PAUSE_MARKER": str(marker)}
    with open(log, "wb") as output:
        child = subprocess.Popen([sys.executable, "-c", PAUSING_CLI, *argv], env=env, stdout=output, stderr=output)
    try:
        deadline = time.monotonic() + timeout_s
        while not marker.exists():
            assert child.poll() is None, log.read_text()
            assert time.monotonic() < deadline, f"no optimizer step {steps} within {timeout_s} s"
            time.sleep(0.1)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert child.returncode == -signal.SIGKILL


def pretend_cpu(monkeypatch, *flags: str) -> None:
    """Make training.runtime.precision see a CPU named "Test CPU" with exactly these /proc/cpuinfo flags."""
    monkeypatch.setattr(
        training.runtime.precision, "cpu_info", lambda: training.runtime.precision.CPU("Test CPU", frozenset(flags))
    )


def synthetic(n: int, seed: int, flip: bool = False) -> Examples:
    """Rows of 3..12 tokens; class 0 draws from tokens 0..49, class 1 from 50..99 (flip swaps the targets)."""
    rng = random.Random(seed)
    rows, targets = [], []
    for i in range(n):
        label = i % 2
        rows.append([rng.randrange(50 * label, 50 * label + 50) for _ in range(rng.randint(3, 12))])
        targets.append(1 - label if flip else label)
    return Examples(rows, targets)


# --- Checkpoints that share a prefix ----------------------------------------------------------------


def sibling(directory, config, bpe_dir, base_seed: int, tail_seed: int, labels=("ham", "spam"), blocks: int = 1):
    """A checkpoint whose embeddings and first `blocks` blocks are those of a model seeded `base_seed`, and whose
    other weights are seeded `tail_seed`, with the fingerprint of that prefix in its card."""
    torch.manual_seed(base_seed)
    base = GPTClassifier(config)
    torch.manual_seed(tail_seed)
    model = GPTClassifier(replace(config, n_labels=len(labels)))
    state = model.state_dict()
    for key, tensor in base.state_dict().items():
        if key.startswith(("transformer.wte.", "transformer.wpe.")) or any(
            key.startswith(f"transformer.h.{i}.") for i in range(blocks)
        ):
            state[key] = tensor
    model.load_state_dict(state)
    prefix = fingerprint(model.state_dict(), model.config, bpe_hashes(bpe_dir), blocks)
    return save_checkpoint(directory, model, bpe_dir, tiny_card(labels=labels, prefix=prefix))


# --- Broken checkpoints ---------------------------------------------------------------------------


class PickleBomb:
    """Unpickling this creates `marker`: proof that a loader ran pickle on the file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


def edit_card(**changes):
    def edit(ckpt: Path):
        card = json.loads((ckpt / "config.json").read_text())
        for key, value in changes.items():
            if value is DELETE:
                del card[key]
            else:
                card[key] = value
        (ckpt / "config.json").write_text(json.dumps(card))

    return edit


def edit_tensors(change):
    def edit(ckpt: Path):
        state = load_file(ckpt / "model.safetensors")
        change(state)
        save_file(state, ckpt / "model.safetensors")

    return edit


def flip_header_byte(ckpt: Path):
    raw = bytearray((ckpt / "model.safetensors").read_bytes())
    raw[8] ^= 0xFF  # the first byte of the JSON header, after its 8-byte length
    (ckpt / "model.safetensors").write_bytes(bytes(raw))


def truncate(ckpt: Path):
    raw = (ckpt / "model.safetensors").read_bytes()
    (ckpt / "model.safetensors").write_bytes(raw[: len(raw) // 2])


def plant_pickle(ckpt: Path):
    # Written only to prove it is never read as pickle: the loader must refuse it without unpickling.
    payload = {"score.weight": PickleBomb(ckpt.parent / "pickle-ran")}
    (ckpt / "model.safetensors").write_bytes(pickle.dumps(payload))


DELETE = object()


def calibrated_checkpoint(directory: Path, config, bpe_dir: Path, temperature: float = 2.0) -> Path:
    """A tiny random ham / spam model with a sharp head, calibrated as finetune calibrates: trained at a uniform
    prior, `temperature` and the shift to a 13% spam prior folded into the head; threshold spam >= 0.3."""
    torch.manual_seed(0)
    model = GPTClassifier(config)
    with torch.no_grad():
        model.score.weight.normal_(0.0, 3.0)
    uniform, prior = {"ham": 0.5, "spam": 0.5}, {"ham": 0.87, "spam": 0.13}
    fold_calibration(model, temperature, prior_shift(uniform, prior, ("ham", "spam")))
    card = tiny_card(threshold=Threshold("spam", 0.3), calibration=Calibration(temperature, uniform, prior))
    return save_checkpoint(directory, model, bpe_dir, card)
