"""The checkpoint directory: the one contract between training and serving.

config.json        format_version, model config, labels, max_tokens, pooling, threshold, provenance
model.safetensors  the whole classifier's weights (safetensors only: nothing here unpickles)
tokenizer/         vocab.bpe + encoder.json, their sha256 recorded in config.json
report/            metrics.json, the data split, plots (written by training, not needed to serve)
"""

import json
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import tiktoken
import torch
from safetensors.torch import load_file, save_file

from training.runtime.inference import (
    Calibration,
    Readout,
    Threshold,
    binary_prior,
    check_prior,
    prior_shift,
)
from training.runtime.mail import Extraction
from training.runtime.model import GPTClassifier, GPTConfig
from training.runtime.prefix import PrefixFingerprint, mismatches
from training.runtime.record import from_flat
from training.runtime.tokenizer import BPE_FILES, TokenizerError, bpe_hashes, file_problem, load_tokenizer

FORMAT_VERSION = 2
CONFIG_FILE, WEIGHTS_FILE, TOKENIZER_DIR, REPORT_DIR = (
    "config.json",
    "model.safetensors",
    "tokenizer",
    "report",
)
SPLIT_FILE = f"{REPORT_DIR}/split.json"
POOLING = "last_token"
# config.json fields written by save_checkpoint around the card's own
REQUIRED_FIELDS = ("format_version", "model", "pooling", "tokenizer")
# card fields a config.json may lack (written by an earlier spamgpt): they read as None
OPTIONAL_FIELDS = ("extraction", "prefix")


class CheckpointError(RuntimeError):
    """A checkpoint directory that cannot be served; the message names the file and the problem."""


@dataclass(frozen=True)
class DataSummary:
    """What a checkpoint was trained on."""

    source: str  # the --data argument: "sms" or a path
    fingerprint: dict  # training.finetune.data.fingerprint of the source before deduplication: sha256, rows, labels
    rows_after_dedup_and_balance: int
    split: dict[str, int]  # rows per role (training.finetune.data.ROLES)
    duplicates_dropped: dict[str, int]  # {"exact": n, "near": n} (training.finetune.data.Duplicates)
    # {label: rows} after deduplication, before balancing: the default deployment prior
    labels_before_balancing: dict[str, int]


@dataclass(frozen=True)
class ModelCard:
    """config.json's description of the classifier, read and checked once by load_checkpoint.

    `training` is `{}` and `data` None for a checkpoint not written by `finetune` (config.json holds `{}` for both);
    `created` and `version` are filled in by save_checkpoint.
    """

    labels: tuple[str, ...]  # in the head's index order
    max_tokens: int  # texts are truncated to this many tokens, in training and serving
    # a binary model's decision rule on its calibrated probabilities; None: argmax. Served at another prior: the
    # threshold in force on the reported probabilities (decisions stay the saved threshold's, see Readout)
    threshold: Threshold | None
    base_model: str  # e.g. "gpt2", or "gpt2 (random init)"
    metrics: dict[str, Any] = field(default_factory=dict)  # the evaluation summary, as training recorded it
    # the run's arguments, flat ({option: JSON value}), as fine-tuning recorded them: a record the runtime carries
    # and never reads (training.finetune.pipeline.training_config interprets it)
    training: dict[str, Any] = field(default_factory=dict)
    data: DataSummary | None = None
    # folded into the weights; None for a checkpoint not written by finetune: temperature 1, the training prior
    calibration: Calibration | None = None
    created: str | None = None  # ISO 8601, UTC
    version: str | None = None  # of the spamgpt package that wrote it
    # how raw messages became its training texts (training.runtime.mail); None: trained on plain texts, so that a
    # message is read by training.runtime.mail.DEFAULT_EXTRACTION. Absent from config.json reads as None
    extraction: Extraction | None = None
    # the frozen prefix's fingerprint (training.runtime.prefix), checked against the weights at load; None: nothing
    # frozen (every weight trained), or a checkpoint written before fingerprints: it shares its prefix with none
    prefix: PrefixFingerprint | None = None

    def to_json(self) -> dict:
        """The card's fields in config.json's on-disk shape."""
        return {
            "labels": list(self.labels),
            "max_tokens": self.max_tokens,
            "threshold": None if self.threshold is None else asdict(self.threshold),
            "base_model": self.base_model,
            "metrics": self.metrics,
            "training": self.training,
            "data": {} if self.data is None else asdict(self.data),
            "calibration": None if self.calibration is None else asdict(self.calibration),
            "created": self.created,
            "version": self.version,
            "extraction": None if self.extraction is None else self.extraction.to_json(),
            "prefix": None if self.prefix is None else self.prefix.to_json(),
        }


@dataclass
class Checkpoint:
    """A loaded checkpoint directory: the classifier, its tokenizer, its card and how its logits are read out."""

    path: Path
    model: GPTClassifier  # in eval mode, on the requested device and dtype; its weights as the file holds them
    tokenizer: tiktoken.Encoding
    card: ModelCard
    readout: Readout  # probabilities at the card's prior, labels by the checkpoint's own threshold


def package_version() -> str:
    """The installed spamgpt's version, "unknown" when run from a tree that is not installed."""
    try:
        return version("spamgpt")
    except PackageNotFoundError:
        return "unknown"


def save_checkpoint(directory: str | Path, model: GPTClassifier, tokenizer_dir: str | Path, card: ModelCard) -> Path:
    """Write config.json, model.safetensors and tokenizer/ into `directory` (created if needed); the card's
    `created` and `version` are set here.

    Raises CheckpointError, before writing anything, for what load_checkpoint would refuse: a card it refuses with
    this model (e.g. max_tokens beyond the model's block_size), a tokenizer that cannot be read or has more tokens
    than the model's vocab_size; naming what is wrong."""
    directory, tokenizer_dir = Path(directory), Path(tokenizer_dir)
    try:
        hashes, tokenizer = bpe_hashes(tokenizer_dir), load_tokenizer(tokenizer_dir)
    except TokenizerError as exc:
        raise CheckpointError(str(exc)) from exc
    card = replace(card, created=datetime.now(UTC).isoformat(timespec="seconds"), version=package_version())
    config = {
        "format_version": FORMAT_VERSION,
        "model": model.config.to_dict(),
        "pooling": POOLING,
        "tokenizer": {"name": "gpt2", "sha256": hashes},
        **card.to_json(),
    }
    text = json.dumps(config, indent=2) + "\n"
    # what load_checkpoint will check
    _card(directory / CONFIG_FILE, json.loads(text), model.config)
    _check_vocabulary(tokenizer_dir, tokenizer, model.config)
    (directory / TOKENIZER_DIR).mkdir(parents=True, exist_ok=True)
    for name in BPE_FILES:
        shutil.copyfile(tokenizer_dir / name, directory / TOKENIZER_DIR / name)
    weights = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in model.state_dict().items()}
    save_file(weights, directory / WEIGHTS_FILE, metadata={"format": "pt"})
    # safetensors creates the file owner-only; a server running as another user must still read it
    (directory / WEIGHTS_FILE).chmod(0o644)
    (directory / CONFIG_FILE).write_text(text)
    return directory


def load_checkpoint(
    path: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    prior: float | None = None,
) -> Checkpoint:
    """Rebuild the classifier from the directory alone, after checking every part of it.

    prior: for a binary model, the rate of its positive label (training.runtime.inference.positive_label: spam) expected
    where it serves, instead of the card's deployment prior (training.runtime.inference.Calibration). The weights
    stay as saved; the returned readout reports probabilities at the new prior (logits + log(prior / card prior))
    and decides on the saved logits by the saved threshold, so that probabilities change and decisions cannot (a
    false-positive rate does not depend on the spam rate). The returned card states the prior in force and the
    threshold on the reported probabilities that makes the same decisions (Readout.threshold_in_force).

    Raises CheckpointError naming the file and what is wrong with it; ValueError for a prior outside (0, 1), a
    model that is not binary, or a checkpoint without a calibration record (its training prior is unknown).
    """
    path = Path(path)
    if not path.is_dir():
        problem = "not a directory (a checkpoint is a directory)" if path.exists() else "checkpoint directory not found"
        raise CheckpointError(f"{path}: {problem}")
    raw = _read_json(path / CONFIG_FILE)
    config = _model_config(path / CONFIG_FILE, raw)
    card = _card(path / CONFIG_FILE, raw, config)
    state = _read_weights(path / WEIGHTS_FILE, config)
    try:
        tokenizer = load_tokenizer(path / TOKENIZER_DIR, expected_sha256=raw["tokenizer"]["sha256"])
    except TokenizerError as exc:
        raise CheckpointError(str(exc)) from exc
    _check_vocabulary(path / TOKENIZER_DIR, tokenizer, config)
    if card.prefix is not None:
        wrong = mismatches(card.prefix, state, config, raw["tokenizer"]["sha256"])
        if wrong:
            raise CheckpointError(
                f"{path / CONFIG_FILE}: the recorded prefix fingerprint {card.prefix.sha256} does not hold: "
                + "; ".join(wrong)
            )
    with torch.device("meta"):  # no random init: every parameter comes from the file
        model = GPTClassifier(config)
    model.load_state_dict(state, strict=True, assign=True)
    readout = Readout(card.labels, card.threshold)
    if prior is not None:
        card, readout = _serve_at(card, prior)
    model.to(device=device, dtype=dtype).eval().requires_grad_(False)
    return Checkpoint(path=path, model=model, tokenizer=tokenizer, card=card, readout=readout)


def _serve_at(card: ModelCard, rate: float) -> tuple[ModelCard, Readout]:
    """The card as served at a positive-label `rate` (its prior and threshold in force) and the readout that
    reports probabilities there and decides at the card's own prior; ValueError as load_checkpoint says."""
    prior = binary_prior(rate, card.labels)
    if card.calibration is None:
        raise ValueError(
            "this checkpoint records no calibration (it was not written by finetune), so its training prior is "
            "unknown and no deployment prior can be applied; serve it without one"
        )
    readout = Readout(card.labels, card.threshold, prior_shift(card.calibration.prior, prior, card.labels))
    served = replace(card, calibration=card.calibration.with_prior(prior), threshold=readout.threshold_in_force)
    return served, readout


def _require_file(file: Path) -> None:
    """Raises CheckpointError unless `file` is a regular file (tokenizer.file_problem says why not)."""
    if problem := file_problem(file):
        raise CheckpointError(f"{file}: {problem}")


def _read_json(file: Path) -> dict:
    _require_file(file)
    try:
        raw = json.loads(file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{file}: not valid JSON ({exc})") from exc
    if not isinstance(raw, dict):
        raise CheckpointError(f"{file}: expected a JSON object, got {type(raw).__name__}")
    if "format_version" not in raw:
        raise CheckpointError(f"{file}: missing field 'format_version'")
    _check_format_version(file, raw["format_version"])
    wanted = (*REQUIRED_FIELDS, *(f.name for f in fields(ModelCard) if f.name not in OPTIONAL_FIELDS))
    missing = [name for name in wanted if name not in raw]
    if missing:
        raise CheckpointError(f"{file}: missing field {missing[0]!r}")
    return raw


def _check_vocabulary(directory: Path, tokenizer: tiktoken.Encoding, config: GPTConfig) -> None:
    """Refuse a tokenizer (in `directory`) with more tokens than the model has embeddings."""
    if tokenizer.n_vocab > config.vocab_size:
        raise CheckpointError(
            f"{directory}: tokenizer has {tokenizer.n_vocab} tokens, model vocab_size {config.vocab_size}"
        )


def _check_format_version(file: Path, found: object) -> None:
    """Refuse a config.json of another format: an earlier one with the command that writes this one."""
    if isinstance(found, int) and not isinstance(found, bool) and 1 <= found < FORMAT_VERSION:
        raise CheckpointError(
            f"{file}: format_version {found} is no longer read (this spamgpt reads {FORMAT_VERSION}); retrain it "
            f"with `spamgpt train --out {file.parent}` and the options recorded under 'training' in {file.name}"
        )
    if isinstance(found, bool) or found != FORMAT_VERSION:
        raise CheckpointError(f"{file}: unknown format_version {found!r} (this spamgpt reads {FORMAT_VERSION})")


def _model_config(file: Path, raw: dict) -> GPTConfig:
    model = raw["model"]
    if not isinstance(model, dict):
        raise CheckpointError(f"{file}: 'model' must be an object, got {model!r}")
    try:
        return GPTConfig(**model)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{file}: invalid model config ({exc})") from exc


def _card(file: Path, raw: dict, config: GPTConfig) -> ModelCard:
    """The card from config.json, every field checked against the model config; the one place that reads it."""
    labels, max_tokens = raw["labels"], raw["max_tokens"]
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
    if raw["pooling"] != POOLING:
        raise CheckpointError(f"{file}: unknown pooling {raw['pooling']!r} (expected {POOLING!r})")
    hashes = raw["tokenizer"].get("sha256") if isinstance(raw["tokenizer"], dict) else None
    if (
        not isinstance(hashes, dict)
        or set(hashes) != set(BPE_FILES)
        or not all(isinstance(h, str) for h in hashes.values())
    ):
        raise CheckpointError(f"{file}: 'tokenizer' must record the sha256 of {list(BPE_FILES)} as strings")
    if not isinstance(raw["base_model"], str) or not raw["base_model"]:
        raise CheckpointError(f"{file}: 'base_model' must be a non-empty string, got {raw['base_model']!r}")
    for name in ("created", "version"):
        if not isinstance(raw[name], str | None):
            raise CheckpointError(f"{file}: {name!r} must be a string or null, got {raw[name]!r}")
    return ModelCard(
        labels=tuple(labels),
        max_tokens=max_tokens,
        threshold=_threshold(file, raw["threshold"], labels),
        base_model=raw["base_model"],
        metrics=_record(file, raw, "metrics", dict),
        training=_record(file, raw, "training", dict),
        data=_record(file, raw, "data", DataSummary),
        calibration=_calibration(file, raw["calibration"], labels),
        created=raw["created"],
        version=raw["version"],
        extraction=_extraction(file, raw.get("extraction")),
        prefix=_prefix(file, raw.get("prefix"), config),
    )


def _extraction(file: Path, record: object) -> Extraction | None:
    """How the checkpoint's messages were read; refused when this spamgpt reads messages otherwise (another
    extraction version or HTML converter), since serving would then feed the model text unlike its training's."""
    if record is None:
        return None
    if not isinstance(record, dict):
        raise CheckpointError(f"{file}: 'extraction' must be an object or null, got {record!r}")
    try:
        return Extraction.from_json(record)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{file}: 'extraction' cannot be applied: {exc}") from exc


def _record(file: Path, raw: dict, name: str, cls: type) -> Any:
    """config.json's object `name` as `cls` (an empty object: None, for a checkpoint not written by finetune)."""
    record = raw[name]
    if not isinstance(record, dict):
        raise CheckpointError(f"{file}: {name!r} must be an object, got {record!r}")
    if cls is dict:
        return record
    try:
        return from_flat(cls, record) if record else None
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{file}: invalid {name!r} record ({exc})") from exc


def _calibration(file: Path, record: object, labels: list[str]) -> Calibration | None:
    if record is None:
        return None
    shape = "null or {'temperature': > 0, 'training_prior': {label: rate}, 'prior': {label: rate}}"
    if not isinstance(record, dict) or set(record) != {"temperature", "training_prior", "prior"}:
        raise CheckpointError(f"{file}: 'calibration' must be {shape}, got {record!r}")
    temperature = record["temperature"]
    if not isinstance(temperature, int | float) or isinstance(temperature, bool) or not temperature > 0:
        raise CheckpointError(f"{file}: 'calibration' temperature must be a positive number, got {temperature!r}")
    for name in ("training_prior", "prior"):
        try:
            check_prior(record[name] if isinstance(record[name], dict) else {}, labels)
        except (ValueError, TypeError) as exc:
            raise CheckpointError(f"{file}: 'calibration' {name}: {exc}") from exc
    return Calibration(float(temperature), record["training_prior"], record["prior"])


def _prefix(file: Path, record: object, config: GPTConfig) -> PrefixFingerprint | None:
    if record is None:
        return None
    try:
        return PrefixFingerprint.from_json(record, config.n_layer)
    except ValueError as exc:
        raise CheckpointError(f"{file}: {exc}") from exc


def _threshold(file: Path, threshold: object, labels: list[str]) -> Threshold | None:
    if threshold is None:
        return None
    if not (
        len(labels) == 2
        and isinstance(threshold, dict)
        and threshold.get("label") in labels
        and isinstance(threshold.get("value"), int | float)
        and not isinstance(threshold["value"], bool)
        and 0.0 <= threshold["value"] <= 1.0
    ):
        raise CheckpointError(
            f"{file}: 'threshold' must be null or {{'label': one of the 2 labels, 'value': 0..1}}, got {threshold!r}"
        )
    return Threshold(threshold["label"], float(threshold["value"]))


def _read_weights(file: Path, config: GPTConfig) -> dict[str, torch.Tensor]:
    _require_file(file)
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


@contextmanager
def staged(target: Path) -> Iterator[Path]:
    """A directory beside `target` that replaces it only once everything inside is written, so that a crash
    never leaves a half checkpoint where serving would look."""
    staging, old = target.with_name(f".{target.name}.staging"), target.with_name(f".{target.name}.old")
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(staging, ignore_errors=True)  # a crashed run's leftovers
    staging.mkdir()
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        target.rename(old)  # a directory cannot be renamed over a non-empty one
    staging.rename(target)
    shutil.rmtree(old, ignore_errors=True)
