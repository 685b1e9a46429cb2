"""The inference engine: owns the checkpoint's model on its device; loads, warms up and predicts.

Every step is the training package's own code (tokenizer, training.runtime.inference.predict_logits), so serving
cannot drift from evaluation. The engine is synchronous: callers run it on the service's model thread.
"""

import re

import torch

from app.settings import Settings
from training.runtime import precision
from training.runtime.checkpoint import Checkpoint, ModelCard, load_checkpoint
from training.runtime.inference import Readout, nonfinite_rows, predict_logits, probabilities
from training.runtime.tokenizer import encode_batch


class Engine:
    """A loaded checkpoint on one device and dtype, optionally int8-quantized (CPU); float32 on CPU runs on packed
    weights (training.runtime.precision.prepare_for_inference)."""

    def __init__(self, checkpoint: Checkpoint, quantize_int8: bool = False):
        self.checkpoint = checkpoint
        # counted before int8 or packing replaces the linear layers, whose weights are then no parameters
        self.parameter_count = sum(p.numel() for p in checkpoint.model.parameters())
        first = next(checkpoint.model.parameters())
        self.device, self.dtype = first.device, first.dtype
        self.quantization = "int8-dynamic" if quantize_int8 else None
        precision.prepare_for_inference(checkpoint.model, quantize_int8)

    @property
    def card(self) -> ModelCard:
        """The checkpoint's model card: labels, max_tokens, threshold, provenance."""
        return self.checkpoint.card

    @property
    def readout(self) -> Readout:
        """How the routes turn predict_logits' logits into reported scores and labels (the checkpoint's Readout)."""
        return self.checkpoint.readout

    @classmethod
    def load(cls, settings: Settings) -> "Engine":
        """Load the checkpoint onto the configured device and dtype, quantize if asked, and warm up.

        Raises training.runtime.checkpoint.CheckpointError for a checkpoint that cannot be served, ValueError for a
        prior
        it cannot take (load_checkpoint) or an LRU_CACHE_CAPACITY oneDNN would crash on
        (precision.bound_onednn_cache), RuntimeError for a device that is not there or a warm-up that fails.
        """
        if settings.torch_threads:
            torch.set_num_threads(settings.torch_threads)
        device = settings.torch_device
        if device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(f"device {settings.device!r} requested but CUDA is not available")
        checkpoint = load_checkpoint(settings.checkpoint_dir, device, settings.torch_dtype, settings.prior)
        engine = cls(checkpoint, settings.quantize_int8)
        engine.warm_up()
        return engine

    def tokenize(self, texts: list[str]) -> tuple[list[list[int]], list[bool]]:
        """Token ids truncated to the card's max_tokens, and whether each text was truncated."""
        return encode_batch(self.checkpoint.tokenizer, texts, self.card.max_tokens)

    def predict(
        self, rows: list[list[int]], max_batch_size: int | None = None, max_batch_tokens: int | None = None
    ) -> torch.Tensor:
        """Rows of token ids -> (N, n_labels) float32 probabilities on the CPU, in row order; run in length-sorted
        batches within the given limits (None: as one forward pass, for a batch the micro-batcher formed).

        The model computes on real tokens only (training.runtime.model.Packing), so a batch in arrival order, its
        lengths mixed, costs about what the same rows sorted by length would, and each row's result is the
        same whatever it is batched with. A row whose logits are not finite is NaN (the caller refuses it). The
        probabilities are at the checkpoint's own prior (the routes report at the deployment prior: readout).
        """
        return probabilities(self.predict_logits(rows, max_batch_size, max_batch_tokens))

    def predict_logits(
        self, rows: list[list[int]], max_batch_size: int | None = None, max_batch_tokens: int | None = None
    ) -> torch.Tensor:
        """predict's rows -> (N, n_labels) float32 logits on the CPU: what the micro-batcher runs, so that the
        routes can give probabilities (training.runtime.inference.probabilities) or, as TEI's raw_scores, the logits."""
        return predict_logits(self.checkpoint.model, rows, max_batch_size, max_batch_tokens)

    def warm_up(self) -> None:
        """One forward at the longest length, so the first request pays no lazy initialisation and a
        model that cannot run on this device fails at startup rather than on a request."""
        longest = [[self.checkpoint.tokenizer.eot_token] * self.card.max_tokens]
        # not self.predict_logits: that is the batches' seam
        if nonfinite_rows(predict_logits(self.checkpoint.model, longest)):
            raise RuntimeError(f"warm-up forward on {self.device} ({self.dtype}) gave non-finite logits")


def model_name(base_model: str, parameter_count: int) -> str:
    """ "spamgpt-gpt2-124m" from the card's base model ("gpt2" or "openai-community/gpt2") and the parameter count."""
    base = re.sub(r"[^a-z0-9.]+", "-", base_model.rsplit("/", 1)[-1].lower()).strip("-")
    for scale, suffix in ((1e9, "b"), (1e6, "m"), (1e3, "k")):
        if parameter_count >= scale:
            return f"spamgpt-{base}-{parameter_count / scale:.3g}{suffix}"
    return f"spamgpt-{base}-{parameter_count}"
