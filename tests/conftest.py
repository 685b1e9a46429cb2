"""Shared fixtures: a GPT-2-format BPE tokenizer and a tiny random checkpoint, both made here, offline."""

import json
from pathlib import Path

import pytest
import torch

from training.checkpoint import ModelCard, save_checkpoint
from training.model import GPTClassifier, GPTConfig
from training.tokenizer import load_tokenizer

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


@pytest.fixture(scope="session")
def bpe_dir(tmp_path_factory) -> Path:
    return make_bpe_files(tmp_path_factory.mktemp("bpe"))


@pytest.fixture(scope="session")
def tokenizer(bpe_dir):
    return load_tokenizer(bpe_dir)


@pytest.fixture(scope="session")
def tiny_config(tokenizer) -> GPTConfig:
    return GPTConfig.from_preset("tiny", vocab_size=tokenizer.n_vocab)


def tiny_card(**overrides) -> ModelCard:
    return ModelCard(
        **{
            "labels": ("ham", "spam"),
            "max_tokens": 48,
            "threshold": None,
            "base_model": "random init (tiny)",
            **overrides,
        }
    )


@pytest.fixture
def tiny_checkpoint(tmp_path, tiny_config, bpe_dir) -> Path:
    """A checkpoint directory holding a tiny random classifier: the contract, not a trained model."""
    torch.manual_seed(0)
    return save_checkpoint(tmp_path / "ckpt", GPTClassifier(tiny_config), bpe_dir, tiny_card())


@pytest.fixture
def shared_data() -> Path:
    """The real SMS data and GPT-2 BPE files beside the project; the test skips where they are absent."""
    if not (SHARED_DATA / "sms-spam-collection" / "SMSSpamCollection").is_file():
        pytest.skip("../shared/data is not present")
    return SHARED_DATA
