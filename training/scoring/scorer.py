"""Texts -> labels and probabilities outside the server: the checkpoint loaded once, then the same functions the
serving engine calls (training.runtime.tokenizer.encode_batch, training.runtime.inference.predict_logits, the
checkpoint's Readout), so a text scored here gets what `POST /classify` answers for it. Used by
`python -m training predict` (training.scoring.files) and by Ray Data workers (training.scoring.ray_data)."""

import torch

from training.config import ScoringConfig
from training.runtime import precision
from training.runtime.checkpoint import Checkpoint, load_checkpoint
from training.runtime.device import resolve_device
from training.runtime.inference import predict_logits, require_finite
from training.runtime.text import has_visible_characters
from training.runtime.tokenizer import encode_batch


def usable_text(value) -> bool:
    """Whether a value can be scored: a string with a visible character (training.runtime.text.has_visible_characters,
    the rule training and the server apply)."""
    return isinstance(value, str) and has_visible_characters(value)


class Scorer:
    """A loaded checkpoint that turns texts into result records, one per text, in order."""

    def __init__(self, checkpoint: Checkpoint, config: ScoringConfig):
        self.checkpoint, self.config = checkpoint, config
        precision.prepare_for_inference(checkpoint.model, config.quantize_int8)

    @classmethod
    def load(cls, path: str, config: ScoringConfig) -> "Scorer":
        """Load and check the checkpoint (training.runtime.checkpoint.load_checkpoint) onto the config's device and
        dtype.

        Raises CheckpointError for a checkpoint that cannot be loaded, ValueError for a device torch does not
        know, precision options the device cannot run, a prior the checkpoint cannot take (load_checkpoint), or an
        LRU_CACHE_CAPACITY oneDNN would crash on (precision.bound_onednn_cache).
        """
        if config.threads:
            torch.set_num_threads(config.threads)
        device = resolve_device(config.device)
        return cls(load_checkpoint(path, device, precision.resolve_dtype(config.dtype, device), config.prior), config)

    @property
    def labels(self) -> tuple[str, ...]:
        return self.checkpoint.card.labels

    def columns(self) -> list[str]:
        """The names of a result record's fields, in order: label, probability_<label> for each of the model's
        labels, tokens (after truncation), truncated."""
        return ["label", *(f"probability_{label}" for label in self.labels), "tokens", "truncated"]

    def score(self, texts: list[str]) -> list[dict]:
        """One record per text, in order: {"label", "probability_<label>": float in 0..1 (float32 softmax; they
        sum to 1; at the deployment prior), "tokens": int, "truncated": bool}; label is the checkpoint's decision rule
        (threshold or argmax, at its own prior: training.runtime.inference.Readout).

        Texts run in length-sorted batches within the config's limits; a text's result does not depend on the
        others (training.runtime.inference.predict_probabilities).

        Raises training.runtime.inference.NonFiniteLogits naming the texts (by index) the model gave non-finite logits
        for: no probability is made up for them.
        """
        if not texts:
            return []
        card = self.checkpoint.card
        rows, truncated = encode_batch(self.checkpoint.tokenizer, texts, card.max_tokens)
        o = self.config
        logits = require_finite(predict_logits(self.checkpoint.model, rows, o.batch_size, o.max_batch_tokens))
        probs, labels = self.checkpoint.readout.read(logits)
        names = [f"probability_{label}" for label in card.labels]
        return [
            {"label": label, **dict(zip(names, p, strict=True)), "tokens": len(ids), "truncated": cut}
            for label, p, ids, cut in zip(labels, probs.tolist(), rows, truncated, strict=True)
        ]
