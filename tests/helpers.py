"""Plain helpers shared by the tests: a GPT-2-format BPE tokenizer's files, a model card, settings for an app on a
checkpoint, a live server (from benchmarks.server, which the benchmarks use too) and ways to break a checkpoint.
Fixtures live in tests/conftest.py; test modules import helpers from here, never from each other."""

import csv
import json
import pickle
import random
from pathlib import Path

from safetensors.torch import load_file, save_file

from app.settings import Settings

# re-exported (`x as x`) for the tests that start a server
from benchmarks.server import free_port as free_port
from benchmarks.server import live_server as live_server
from training.checkpoint import ModelCard

# A few merges in GPT-2's data-gym notation ("Ġ" is a space), enough for multi-byte tokens.
MERGES = ["Ġ t", "h e", "i n", "e r", "Ġ a", "o n", "Ġt he", "Ġ w", "r e", "Ġ s", "Ġ f", "Ġ c", "a t", "o u"]
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


SPAM_WORDS = ["win", "prize", "cash", "claim", "free", "urgent", "call", "now", "offer", "txt", "bonus", "reply"]
HAM_WORDS = ["see", "you", "at", "lunch", "home", "later", "mum", "thanks", "ok", "tonight", "dinner", "soon"]


def write_messages_csv(path: Path, rows: int = 60) -> Path:
    """`rows` short texts with a header (text, label), spam and ham alternating and made of different words; each
    unique, so deduplication keeps them all."""
    rng = random.Random(0)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        for i in range(rows):
            label, words = ("spam", SPAM_WORDS) if i % 2 else ("ham", HAM_WORDS)
            writer.writerow([" ".join(rng.sample(words, 4)) + f" {i}", label])
    return path


def tiny_card(**overrides) -> ModelCard:
    card = {"labels": ("ham", "spam"), "max_tokens": 48, "threshold": None, "base_model": "random init (tiny)"}
    return ModelCard(**{**card, **overrides})


def tiny_settings(checkpoint_dir: Path, **overrides) -> Settings:
    return Settings(**{"checkpoint_dir": checkpoint_dir, "device": "cpu", **overrides})


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
