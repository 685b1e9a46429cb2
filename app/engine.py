"""The inference engine: owns the model on its device; token ids in, float32 probabilities out.

Every step is the training package's own code (tokenizer, padding, batching, softmax, threshold), so
serving cannot drift from evaluation. The engine is synchronous: callers run it in a worker thread.
"""

import re
import warnings

import torch
from torch import nn

from app.settings import Settings
from training.checkpoint import Checkpoint, decide_labels, load_checkpoint
from training.inference import length_sorted_batches, pad_right, probabilities
from training.tokenizer import encode_batch


class Engine:
    def __init__(self, checkpoint: Checkpoint, quantize_int8: bool = False):
        self.card = checkpoint.card
        self.tokenizer = checkpoint.tokenizer
        self.labels = checkpoint.labels
        self.max_tokens = checkpoint.max_tokens
        self.threshold = checkpoint.threshold
        self.parameters = sum(p.numel() for p in checkpoint.model.parameters())  # before int8 packs them away
        first = next(checkpoint.model.parameters())
        self.device, self.dtype = first.device, first.dtype
        self.quantization = "int8-dynamic" if quantize_int8 else None
        if quantize_int8:
            with warnings.catch_warnings():
                # torch marks its eager quantization deprecated in favour of torchao, which we do not depend on
                warnings.filterwarnings("ignore", message=r"(?s).*deprecated")
                torch.ao.quantization.quantize_dynamic(checkpoint.model, {nn.Linear}, dtype=torch.qint8, inplace=True)
        self.model = checkpoint.model

    @classmethod
    def load(cls, settings: Settings) -> "Engine":
        """Load the checkpoint onto the configured device and dtype, quantize if asked, and warm up.

        Raises training.checkpoint.CheckpointError for a checkpoint that cannot be served.
        """
        if settings.torch_threads:
            torch.set_num_threads(settings.torch_threads)
        device = settings.torch_device
        if device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(f"device {settings.device!r} requested but CUDA is not available")
        engine = cls(load_checkpoint(settings.checkpoint_dir, device, settings.torch_dtype), settings.quantize_int8)
        engine.warm_up()
        return engine

    def tokenize(self, texts: list[str]) -> tuple[list[list[int]], list[bool]]:
        """Token ids truncated to the checkpoint's max_tokens, and whether each text was truncated."""
        return encode_batch(self.tokenizer, texts, self.max_tokens)

    @torch.inference_mode()
    def predict(self, rows: list[list[int]]) -> torch.Tensor:
        """One batch of token id lists -> (B, n_labels) float32 probabilities on the CPU, in row order.

        The model computes on real tokens only (training.model.Packing), so a batch in arrival order, its
        lengths mixed, costs about what the same rows sorted by length would, and each row's result is the
        same whatever it is batched with.
        """
        idx, lengths = pad_right(rows, self.tokenizer.eot_token, self.device)
        return probabilities(self.model(idx, lengths)).cpu()

    def decide(self, probs: torch.Tensor) -> list[str]:
        return decide_labels(probs, self.labels, self.threshold)

    def score(self, rows: list[list[int]]) -> list[tuple[str, list[float]]]:
        """(label, probabilities) per row: what the micro-batcher hands back to each request."""
        probs = self.predict(rows)
        return list(zip(self.decide(probs), probs.tolist(), strict=True))

    def classify(
        self, texts: list[str], max_batch_size: int = 32, max_batch_tokens: int | None = None
    ) -> tuple[torch.Tensor, list[str]]:
        """The whole path without HTTP: tokenize, length-sorted batches, forward, softmax, labels, in input order."""
        rows, _ = self.tokenize(texts)
        probs = torch.empty(len(rows), len(self.labels))
        for batch in length_sorted_batches([len(r) for r in rows], max_batch_size, max_batch_tokens):
            probs[batch] = self.predict([rows[i] for i in batch])
        return probs, self.decide(probs)

    def warm_up(self) -> None:
        """One forward at the longest length, so the first request pays no lazy initialisation and a
        model that cannot run on this device fails at startup rather than on a request."""
        probs = self.predict([[self.tokenizer.eot_token] * self.max_tokens])
        if not torch.isfinite(probs).all():
            raise RuntimeError(f"warm-up forward on {self.device} ({self.dtype}) gave non-finite probabilities")


def model_name(base_model: object, parameters: int) -> str:
    """ "spamgpt-gpt2-124m" from the card's base model ("gpt2" or "openai-community/gpt2") and the parameter count."""
    base = re.sub(r"[^a-z0-9.]+", "-", str(base_model).rsplit("/", 1)[-1].lower()).strip("-")
    for scale, suffix in ((1e9, "b"), (1e6, "m"), (1e3, "k")):
        if parameters >= scale:
            return f"spamgpt-{base}-{parameters / scale:.3g}{suffix}"
    return f"spamgpt-{base}-{parameters}"
