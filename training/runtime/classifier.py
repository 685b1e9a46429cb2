"""A checkpoint loaded to classify texts: the one load sequence and the one scoring call of every consumer.

The server (app.service), file scoring (training.scoring.files) and Ray Data (training.scoring.ray_data) all load
with Classifier.load and turn logits into answers with Classifier.predictions, so a text gets the same label and
bit-identical probabilities from each of them. The server runs the forward pass through its micro-batcher
(Classifier.predict_logits on batches it forms); the others call Classifier.classify, which runs it in
length-sorted batches within the options' limits.
"""

from dataclasses import dataclass
from pathlib import Path

import torch

from training.runtime import precision
from training.runtime.checkpoint import Checkpoint, ModelCard, load_checkpoint
from training.runtime.device import require_available
from training.runtime.inference import nonfinite_rows, predict_logits, probabilities, require_finite
from training.runtime.options import ClassifierOptions
from training.runtime.tokenizer import encode_batch


@dataclass(slots=True)  # not frozen: a frozen dataclass's __init__ would double what serving spends building answers
class Prediction:
    """One text's answer: what /classify returns for it and what file scoring writes as its row's columns."""

    label: str  # the card's decision rule (threshold or argmax) applied to the probabilities
    probabilities: dict[str, float]  # by label in the card's order: float32 softmax, in 0..1, summing to 1
    tokens: int  # token ids the model read, after truncation
    truncated: bool  # the text was longer than the card's max_tokens


class Classifier:
    """A loaded checkpoint on one device and dtype, made ready to serve (training.runtime.precision
    .prepare_for_inference: int8 when asked, packed float32 weights on CPU), with its tokenizer and card."""

    def __init__(self, checkpoint: Checkpoint, options: ClassifierOptions):
        self.checkpoint, self.options = checkpoint, options
        # counted before int8 or packing replaces the linear layers, whose weights are then no parameters
        self.parameter_count = sum(p.numel() for p in checkpoint.model.parameters())
        first = next(checkpoint.model.parameters())
        self.device, self.dtype = first.device, first.dtype
        self.quantization = "int8-dynamic" if options.quantize_int8 else None
        precision.prepare_for_inference(checkpoint.model, options.quantize_int8)

    @classmethod
    def load(cls, path: str | Path, options: ClassifierOptions) -> "Classifier":
        """Set torch's threads, check the device is there, load and check the checkpoint
        (training.runtime.checkpoint.load_checkpoint) in the options' dtype at their prior, prepare it for inference
        and warm up.

        Raises CheckpointError for a checkpoint that cannot be loaded; ValueError for a prior it cannot take
        (load_checkpoint) or an LRU_CACHE_CAPACITY oneDNN would crash on (precision.bound_onednn_cache);
        RuntimeError for a device that is not there or a warm-up that fails.
        """
        if options.threads:
            torch.set_num_threads(options.threads)
        device = options.torch_device
        require_available(device)
        checkpoint = load_checkpoint(path, device, precision.resolve_dtype(options.dtype, device), options.prior)
        classifier = cls(checkpoint, options)
        classifier.warm_up()
        return classifier

    @property
    def card(self) -> ModelCard:
        """The checkpoint's model card: labels, max_tokens, threshold, provenance."""
        return self.checkpoint.card

    def tokenize(self, texts: list[str]) -> tuple[list[list[int]], list[bool]]:
        """Token ids truncated to the card's max_tokens, and whether each text was truncated."""
        return encode_batch(self.checkpoint.tokenizer, texts, self.card.max_tokens)

    def predict_logits(
        self, rows: list[list[int]], max_batch_size: int | None = None, max_batch_tokens: int | None = None
    ) -> torch.Tensor:
        """Rows of token ids -> (N, n_labels) float32 logits on the CPU, in row order; run in length-sorted batches
        within the given limits (None: as one forward pass, for a batch the server's micro-batcher formed).

        The model computes on real tokens only (training.runtime.model.Packing), so a batch in arrival order, its
        lengths mixed, costs about what the same rows sorted by length would, and each row's result is the same
        whatever it is batched with. A row's logits may be non-finite (see predictions).
        """
        return predict_logits(self.checkpoint.model, rows, max_batch_size, max_batch_tokens)

    def predict(
        self, rows: list[list[int]], max_batch_size: int | None = None, max_batch_tokens: int | None = None
    ) -> torch.Tensor:
        """predict_logits' rows -> (N, n_labels) float32 probabilities on the CPU, at the checkpoint's own prior
        (predictions reports at the deployment prior); a row whose logits are not finite is NaN."""
        return probabilities(self.predict_logits(rows, max_batch_size, max_batch_tokens))

    def predictions(self, rows: list[list[int]], truncated: list[bool], logits: torch.Tensor) -> list[Prediction]:
        """N texts' token rows, truncation flags and (N, n_labels) logits -> their Predictions, in order: float32
        softmax at the deployment prior, labels by the checkpoint's decision rule at its own prior
        (training.runtime.inference.Readout: a deployment prior never moves a label).

        The logits must be finite: callers refuse the texts whose rows are not first (nonfinite_rows,
        require_finite), since no probability is made up for them.
        """
        probs, labels = self.checkpoint.readout.read(logits)
        card = self.card
        return [
            Prediction(label, dict(zip(card.labels, p, strict=True)), len(ids), cut)
            for label, p, ids, cut in zip(labels, probs.tolist(), rows, truncated, strict=True)
        ]

    def classify(self, texts: list[str]) -> list[Prediction]:
        """One Prediction per text, in order: tokenized, run in length-sorted batches within the options'
        batch_size and max_batch_tokens (a text's result does not depend on the others), then predictions.

        Raises training.runtime.inference.NonFiniteLogits naming the texts (by index) the model gave non-finite
        logits for.
        """
        rows, truncated = self.tokenize(texts)
        logits = require_finite(self.predict_logits(rows, self.options.batch_size, self.options.max_batch_tokens))
        return self.predictions(rows, truncated, logits)

    def warm_up(self) -> None:
        """One forward at the longest length, so the first text pays no lazy initialisation and a model that
        cannot run on this device fails at load rather than on a text.

        Raises RuntimeError when that forward gives non-finite logits.
        """
        longest = [[self.checkpoint.tokenizer.eot_token] * self.card.max_tokens]
        # the module's predict_logits, not self.predict_logits: that is the server's batches' seam
        if nonfinite_rows(predict_logits(self.checkpoint.model, longest)):
            raise RuntimeError(f"warm-up forward on {self.device} ({self.dtype}) gave non-finite logits")
