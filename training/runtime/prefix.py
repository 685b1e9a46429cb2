"""The fingerprint of a checkpoint's frozen prefix: what classifiers fine-tuned from one base share exactly.

Fine-tuning the last blocks (or LoRA adapters) leaves the token and position embeddings and the leading blocks as
the base had them. Two checkpoints whose prefixes hold the same weights, in the same architecture, read through the
same tokenizer, compute the same residual stream for a text up to the end of the prefix, so a server can hold one
copy of the prefix and run it once per text for all of them (training.runtime.shared). The fingerprint says so
exactly: a sha256 over the prefix tensors' float32 bytes in the order of their names (with each name, dtype and
shape), over the model config without n_labels (the head's), and over the tokenizer files' sha256s; `finetune`
records it in the card, load_checkpoint recomputes it from the weights file and refuses a mismatch.

In config.json: "prefix": {"blocks": 11, "sha256": ..., "weights": ..., "architecture": ..., "tokenizer": ...},
or null (nothing frozen: every weight trained, so nothing is shared).
"""

import hashlib
import json
import re
from dataclasses import asdict, dataclass, fields

import torch

from training.runtime.model import GPTConfig

EMBEDDINGS = ("transformer.wte.", "transformer.wpe.")
SHA256_HEX = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class PrefixFingerprint:
    """A checkpoint's frozen prefix: the embeddings and the first `blocks` blocks. Equal `sha256`, equal prefix.

    The parts are kept beside the whole so that a checkpoint that fails verification says which part changed.
    """

    blocks: int  # leading blocks frozen while fine-tuning; 0: the embeddings alone (LoRA changes every block)
    sha256: str  # over blocks and the three parts below (combine)
    weights: str  # over the prefix tensors (weights_sha256)
    architecture: str  # over the model config without n_labels (architecture_sha256)
    tokenizer: str  # over the BPE files' sha256s (tokenizer_sha256)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, record: object, n_layer: int) -> "PrefixFingerprint":
        """The fingerprint config.json records; ValueError showing a record of another shape, or more blocks
        than the model's n_layer."""
        names = [f.name for f in fields(cls)]
        if not isinstance(record, dict) or sorted(record) != sorted(names):
            raise ValueError(f"'prefix' must be null or an object with {names}, got {record!r}")
        blocks = record["blocks"]
        if not isinstance(blocks, int) or isinstance(blocks, bool) or not 0 <= blocks <= n_layer:
            raise ValueError(f"'prefix' blocks must be an integer in 0..{n_layer}, got {blocks!r}")
        for name in names[1:]:
            if not isinstance(record[name], str) or not SHA256_HEX.fullmatch(record[name]):
                raise ValueError(f"'prefix' {name} must be a sha256 in lowercase hex, got {record[name]!r}")
        return cls(**record)


def prefix_keys(keys: list[str], blocks: int) -> list[str]:
    """The state-dict keys of the embeddings and the first `blocks` blocks, sorted: a file's order is its own
    (safetensors stores tensors by dtype and name)."""
    owned = (*EMBEDDINGS, *(f"transformer.h.{i}." for i in range(blocks)))
    return sorted(key for key in keys if key.startswith(owned))


def weights_sha256(state: dict[str, torch.Tensor], blocks: int) -> str:
    """sha256 over the prefix tensors of a GPTClassifier state dict (prefix_keys), in the dict's order: each one's
    name, shape and float32 bytes as the checkpoint stores them (little-endian, C order), in prefix_keys' order."""
    digest = hashlib.sha256()
    for key in prefix_keys(list(state), blocks):
        tensor = state[key].detach().to("cpu", torch.float32).contiguous()
        digest.update(f"{key}:{tuple(tensor.shape)}:float32\n".encode())
        digest.update(tensor.view(torch.uint8).numpy())  # the bytes, without a copy
    return digest.hexdigest()


def architecture_sha256(config: GPTConfig) -> str:
    """sha256 of the model config's JSON without n_labels: the head's size is no part of the prefix."""
    sizes = {k: v for k, v in config.to_dict().items() if k != "n_labels"}
    return hashlib.sha256(json.dumps(sizes, sort_keys=True).encode()).hexdigest()


def tokenizer_sha256(bpe_sha256: dict[str, str]) -> str:
    """sha256 of the tokenizer's identity: its files' sha256s (training.runtime.tokenizer.bpe_hashes)."""
    return hashlib.sha256(json.dumps(bpe_sha256, sort_keys=True).encode()).hexdigest()


def combine(blocks: int, weights: str, architecture: str, tokenizer: str) -> str:
    """The fingerprint's sha256 over its parts."""
    parts = {"blocks": blocks, "weights": weights, "architecture": architecture, "tokenizer": tokenizer}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def fingerprint(
    state: dict[str, torch.Tensor], config: GPTConfig, bpe_sha256: dict[str, str], blocks: int
) -> PrefixFingerprint:
    """The fingerprint of a classifier's embeddings and first `blocks` blocks: `state` its state dict, `config` its
    model config, bpe_sha256 its tokenizer files' sha256s."""
    assert 0 <= blocks <= config.n_layer, f"{blocks} prefix blocks in a model of {config.n_layer}"
    parts = weights_sha256(state, blocks), architecture_sha256(config), tokenizer_sha256(bpe_sha256)
    return PrefixFingerprint(blocks, combine(blocks, *parts), *parts)


def mismatches(
    recorded: PrefixFingerprint, state: dict[str, torch.Tensor], config: GPTConfig, bpe_sha256: dict[str, str]
) -> list[str]:
    """What of `recorded` the checkpoint's weights, config and tokenizer do not bear out, in words (empty: all of
    it holds)."""
    found = fingerprint(state, config, bpe_sha256, recorded.blocks)
    described = {
        "weights": f"the frozen weights (the embeddings and the first {recorded.blocks} blocks)",
        "architecture": "the model config",
        "tokenizer": "the tokenizer files",
    }
    wrong = [
        f"{what} hash to {getattr(found, name)}, not the recorded {getattr(recorded, name)}"
        for name, what in described.items()
        if getattr(found, name) != getattr(recorded, name)
    ]
    if not wrong and recorded.sha256 != found.sha256:
        wrong.append(f"its parts combine to {found.sha256}, not the recorded sha256 {recorded.sha256}")
    return wrong
