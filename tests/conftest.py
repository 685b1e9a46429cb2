"""Shared fixtures: a GPT-2-format BPE tokenizer and a tiny random checkpoint, both made here, offline."""

import socket
from pathlib import Path

import pytest
import torch

from tests.helpers import SHARED_DATA, make_bpe_files, tiny_card
from training.runtime.checkpoint import save_checkpoint
from training.runtime.model import GPTClassifier, GPTConfig
from training.runtime.tokenizer import load_tokenizer


@pytest.fixture(autouse=True)
def hub_on_loopback(monkeypatch):
    """The Hugging Face Hub's endpoint is a closed loopback port: a test that reaches for the Hub is refused at once,
    and nothing leaves the machine. Proxy variables are cleared too: through a proxy, even the loopback endpoint
    would be asked of another machine (training.finetune.base.hub_unreachable probes the proxy when one is set)."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    for name in ("http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)


@pytest.fixture(scope="session")
def bpe_dir(tmp_path_factory) -> Path:
    return make_bpe_files(tmp_path_factory.mktemp("bpe"))


@pytest.fixture(scope="session")
def tokenizer(bpe_dir):
    return load_tokenizer(bpe_dir)


@pytest.fixture(scope="session")
def tiny_config(tokenizer) -> GPTConfig:
    return GPTConfig.from_preset("tiny", vocab_size=tokenizer.n_vocab)


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


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to resolve a name or open a connection fails, as on a machine with no network."""

    def refuse(*args, **kwargs):
        raise OSError("network access attempted in a test that must run offline")

    for name in ("getaddrinfo", "create_connection"):
        monkeypatch.setattr(socket, name, refuse)
    for name in ("connect", "connect_ex"):
        monkeypatch.setattr(socket.socket, name, refuse)
