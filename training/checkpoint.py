"""The checkpoint directory: the one contract between training and serving.

config.json        format_version, model config, labels, max_tokens, pooling, threshold, provenance
model.safetensors  the whole classifier's weights (safetensors only: nothing here unpickles)
tokenizer/         vocab.bpe + encoder.json, their sha256 recorded in config.json
report/            metrics.json, the data split, plots (written by training, not needed to serve)
"""

import json
import shutil
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import tiktoken
import torch
from safetensors.torch import load_file, save_file

from training.model import GPTClassifier, GPTConfig
from training.tokenizer import BPE_FILES, TokenizerError, bpe_hashes, load_tokenizer

FORMAT_VERSION = 1
CONFIG_FILE, WEIGHTS_FILE, TOKENIZER_DIR, REPORT_DIR = (
    "config.json",
    "model.safetensors",
    "tokenizer",
    "report",
)
POOLING = "last_token"
# Fields the trainer supplies; save_checkpoint adds format_version, model, pooling, tokenizer, created, version.
CARD_FIELDS = ("labels", "max_tokens", "threshold", "base_model", "metrics", "training", "data")
REQUIRED_FIELDS = ("format_version", "model", "pooling", "tokenizer", "created", "version", *CARD_FIELDS)


class CheckpointError(RuntimeError):
    """A checkpoint directory that cannot be served; the message names the file and the problem."""


@dataclass
class Checkpoint:
    path: Path
    model: GPTClassifier  # in eval mode, on the requested device and dtype
    tokenizer: tiktoken.Encoding
    card: dict  # config.json as written

    @property
    def labels(self) -> list[str]:
        return self.card["labels"]

    @property
    def max_tokens(self) -> int:
        return self.card["max_tokens"]

    @property
    def threshold(self) -> dict | None:
        return self.card["threshold"]


def package_version() -> str:
    try:
        return version("spamgpt")
    except PackageNotFoundError:
        return "unknown"


def decide_labels(probs: torch.Tensor, labels: list[str], threshold: dict | None) -> list[str]:
    """Labels for (B, n_labels) probabilities: argmax, or for a binary model with a threshold chosen on
    validation, the positive label wherever its probability reaches the threshold."""
    if threshold is None:
        return [labels[i] for i in probs.argmax(dim=1).tolist()]
    positive = labels.index(threshold["label"])
    other = labels[1 - positive]
    return [labels[positive] if p >= threshold["value"] else other for p in probs[:, positive].tolist()]


def save_checkpoint(directory: str | Path, model: GPTClassifier, tokenizer_dir: str | Path, card: dict) -> Path:
    """Write config.json, model.safetensors and tokenizer/ into `directory` (created if needed)."""
    missing = [name for name in CARD_FIELDS if name not in card]
    assert not missing, f"checkpoint card lacks {missing}"
    directory = Path(directory)
    (directory / TOKENIZER_DIR).mkdir(parents=True, exist_ok=True)
    for name in BPE_FILES:
        shutil.copyfile(Path(tokenizer_dir) / name, directory / TOKENIZER_DIR / name)
    weights = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in model.state_dict().items()}
    save_file(weights, directory / WEIGHTS_FILE, metadata={"format": "pt"})
    # safetensors creates the file owner-only; a server running as another user must still read it
    (directory / WEIGHTS_FILE).chmod(0o644)
    config = {
        "format_version": FORMAT_VERSION,
        "model": model.config.to_dict(),
        "pooling": POOLING,
        "tokenizer": {"name": "gpt2", "sha256": bpe_hashes(directory / TOKENIZER_DIR)},
        **{name: card[name] for name in CARD_FIELDS},
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "version": package_version(),
    }
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    return directory


def load_checkpoint(
    path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> Checkpoint:
    """Rebuild the classifier from the directory alone, after checking every part of it.

    Raises CheckpointError naming the file and what is wrong with it.
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: checkpoint directory not found")
    card = _read_card(path / CONFIG_FILE)
    config = _model_config(path / CONFIG_FILE, card)
    _check_card(path / CONFIG_FILE, card, config)
    state = _read_weights(path / WEIGHTS_FILE, config)
    try:
        tokenizer = load_tokenizer(path / TOKENIZER_DIR, expected_sha256=card["tokenizer"].get("sha256") or {})
    except TokenizerError as exc:
        raise CheckpointError(str(exc)) from exc
    if tokenizer.n_vocab > config.vocab_size:
        raise CheckpointError(
            f"{path / TOKENIZER_DIR}: tokenizer has {tokenizer.n_vocab} tokens, model vocab_size {config.vocab_size}"
        )
    with torch.device("meta"):  # no random init: every parameter comes from the file
        model = GPTClassifier(config)
    model.load_state_dict(state, strict=True, assign=True)
    model.to(device=device, dtype=dtype).eval().requires_grad_(False)
    return Checkpoint(path=path, model=model, tokenizer=tokenizer, card=card)


def _read_card(file: Path) -> dict:
    if not file.is_file():
        raise CheckpointError(f"{file}: missing")
    try:
        card = json.loads(file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{file}: not valid JSON ({exc})") from exc
    if not isinstance(card, dict):
        raise CheckpointError(f"{file}: expected a JSON object, got {type(card).__name__}")
    missing = [name for name in REQUIRED_FIELDS if name not in card]
    if missing:
        raise CheckpointError(f"{file}: missing field {missing[0]!r}")
    if card["format_version"] != FORMAT_VERSION:
        raise CheckpointError(
            f"{file}: unknown format_version {card['format_version']!r} (this spamgpt reads {FORMAT_VERSION})"
        )
    return card


def _model_config(file: Path, card: dict) -> GPTConfig:
    model = card["model"]
    if not isinstance(model, dict):
        raise CheckpointError(f"{file}: 'model' must be an object, got {model!r}")
    try:
        return GPTConfig(**model)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{file}: invalid model config ({exc})") from exc


def _check_card(file: Path, card: dict, config: GPTConfig) -> None:
    labels, max_tokens, threshold = card["labels"], card["max_tokens"], card["threshold"]
    if (
        not isinstance(labels, list)
        or len(labels) != config.n_labels
        or len(set(labels)) != len(labels)
        or not all(isinstance(label, str) and label for label in labels)
    ):
        raise CheckpointError(f"{file}: 'labels' must be {config.n_labels} distinct non-empty strings, got {labels!r}")
    # bool is an int subclass: JSON true must not pass as 1
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or not 1 <= max_tokens <= config.block_size:
        raise CheckpointError(f"{file}: 'max_tokens' must be an integer in 1..{config.block_size}, got {max_tokens!r}")
    if card["pooling"] != POOLING:
        raise CheckpointError(f"{file}: unknown pooling {card['pooling']!r} (expected {POOLING!r})")
    if threshold is not None and not (
        config.n_labels == 2
        and isinstance(threshold, dict)
        and threshold.get("label") in labels
        and isinstance(threshold.get("value"), int | float)
        and not isinstance(threshold["value"], bool)
        and 0.0 <= threshold["value"] <= 1.0
    ):
        raise CheckpointError(
            f"{file}: 'threshold' must be null or {{'label': one of the 2 labels, 'value': 0..1}}, got {threshold!r}"
        )
    if not isinstance(card["tokenizer"], dict) or set(card["tokenizer"].get("sha256") or {}) != set(BPE_FILES):
        raise CheckpointError(f"{file}: 'tokenizer' must record the sha256 of {list(BPE_FILES)}")


def _read_weights(file: Path, config: GPTConfig) -> dict[str, torch.Tensor]:
    if not file.is_file():
        raise CheckpointError(f"{file}: missing")
    try:
        state = load_file(file)
    except Exception as exc:  # safetensors raises its own error types for truncation and bad headers
        raise CheckpointError(f"{file}: not a readable safetensors file ({exc})") from exc
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in GPTClassifier(config).state_dict().items()}
    missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing:
        raise CheckpointError(f"{file}: missing tensor {missing[0]!r} ({len(missing)} missing in all)")
    if extra:
        raise CheckpointError(f"{file}: unexpected tensor {extra[0]!r} ({len(extra)} unexpected in all)")
    for key, shape in expected.items():
        tensor = state[key]
        if tuple(tensor.shape) != shape:
            raise CheckpointError(f"{file}: tensor {key!r} has shape {tuple(tensor.shape)}, config needs {shape}")
        if not tensor.is_floating_point():
            raise CheckpointError(f"{file}: tensor {key!r} has dtype {tensor.dtype}, expected floating point")
        if not torch.isfinite(tensor).all():
            raise CheckpointError(f"{file}: tensor {key!r} has non-finite values (NaN or inf)")
    return {k: v.float() for k, v in state.items()}
