"""The frozen prefix a fine-tuning run records (recorded_prefix), and training a sibling: a new classifier on the
frozen prefix of an existing checkpoint (`finetune --prefix-from`).

The sibling keeps the checkpoint's architecture, tokenizer, embeddings and frozen blocks exactly, so its prefix
fingerprint (training.runtime.prefix) is the checkpoint's by construction and a server holding both runs that prefix
once for the two (training.runtime.shared). Only the tail learns the new task: the trainable blocks and the final
norm start from the checkpoint's own (the only copy of the base's blocks it holds), the head, sized for the new
labels, afresh from the run's seed.
"""

import json
from dataclasses import replace
from pathlib import Path

import torch

from training.config import FinetuneConfig
from training.finetune.loop import frozen_prefix
from training.runtime.checkpoint import CONFIG_FILE, Checkpoint, CheckpointError, load_checkpoint
from training.runtime.model import GPTClassifier
from training.runtime.prefix import PrefixFingerprint, fingerprint
from training.runtime.tokenizer import bpe_hashes


def prefix_source(config: FinetuneConfig) -> Checkpoint:
    """The checkpoint `config.base.prefix_from` names, loaded on the CPU in float32 with its prefix fingerprint
    verified (load_checkpoint).

    Raises CheckpointError for a checkpoint that cannot be loaded; ValueError for one that records no frozen prefix,
    a run whose --trainable would leave other blocks frozen than it did, or a max_tokens beyond its positions.
    """
    path = config.base.prefix_from
    try:
        checkpoint = load_checkpoint(path)
    except CheckpointError as exc:
        raise CheckpointError(f"--prefix-from {str(path)!r}: {exc}") from None
    recorded, n_layer = checkpoint.card.prefix, checkpoint.model.config.n_layer
    if recorded is None:
        raise ValueError(
            f"--prefix-from {path!r} records no frozen prefix: every weight of it was trained (--trainable all), or "
            "an earlier spamgpt wrote it; train the base with --trainable last-blocks (or lora) to have one to share"
        )
    frozen = frozen_prefix(config.train, n_layer)
    if frozen != recorded.blocks:
        keep = (
            f"--trainable last-blocks --trainable-blocks {n_layer - recorded.blocks}"
            + (" (or --trainable lora)" if recorded.blocks == 0 else "")
            if recorded.blocks < n_layer
            else "nothing trainable, which no run can be"
        )
        this = "nothing" if frozen is None else f"the embeddings and the first {frozen} blocks"
        raise ValueError(
            f"--prefix-from {path!r} froze the embeddings and the first {recorded.blocks} of its {n_layer} blocks; a "
            f"sibling must leave exactly those frozen: {keep} (this run would freeze {this})"
        )
    max_tokens, block_size = config.base.max_tokens, checkpoint.model.config.block_size
    if max_tokens is not None and max_tokens > block_size:
        raise ValueError(f"max_tokens must lie in 1..{block_size} for --prefix-from {path!r}, got {max_tokens!r}")
    return checkpoint


def recorded_sha256(path: str | Path) -> str | None:
    """The prefix fingerprint's sha256 that the checkpoint at `path` records, read from its config.json alone (what
    --skip-existing compares a sibling against); None when it records none or cannot be read."""
    try:
        prefix = json.loads((Path(path) / CONFIG_FILE).read_text()).get("prefix")
        return prefix.get("sha256") if isinstance(prefix, dict) else None
    except (OSError, ValueError, AttributeError):
        return None


def sibling_model(source: Checkpoint, n_labels: int, seed: int) -> GPTClassifier:
    """A classifier of `source`'s architecture with n_labels labels: every weight `source`'s but the head, which is
    initialised from `seed`."""
    torch.manual_seed(seed)
    model = GPTClassifier(replace(source.model.config, n_labels=n_labels))
    kept = {k: v for k, v in source.model.state_dict().items() if not k.startswith("score.")}
    missing, unexpected = model.load_state_dict(kept, strict=False)
    assert not unexpected and all(k.startswith("score.") for k in missing), (missing, unexpected)
    return model


def recorded_prefix(model: GPTClassifier, tokenizer_dir: Path, config: FinetuneConfig) -> PrefixFingerprint | None:
    """The fingerprint of what `config` left frozen in the trained `model` (None: nothing was frozen)."""
    blocks = frozen_prefix(config.train, model.config.n_layer)
    return None if blocks is None else fingerprint(model.state_dict(), model.config, bpe_hashes(tokenizer_dir), blocks)
