"""A checkpoint loaded to classify texts: the one load sequence and the one scoring call of every consumer.

The server (app.service), file scoring (training.scoring.files) and Ray Data (training.scoring.ray_data) all load
with Classifier.load and turn logits into answers with Classifier.read_rows and .predictions, so a text gets the same
label and bit-identical probabilities from each of them. The server runs the forward pass through its micro-batcher
(Classifier.predict_logits on batches it forms); the others call Classifier.classify, which runs it in
length-sorted batches within the options' limits.

Raw e-mail goes through the same calls: read_messages turns each message into its text
(training.runtime.mail.read_message, by the card's extraction) and its windows of token ids, the windows run as rows,
and message_predictions combines each message's windows (training.runtime.mail.combine_windows) before the same
readout; classify_messages does all of it for file scoring and training's mail data.
"""

from dataclasses import dataclass
from pathlib import Path

import torch

from training.runtime import precision
from training.runtime.checkpoint import Checkpoint, ModelCard, load_checkpoint
from training.runtime.device import require_available
from training.runtime.inference import (
    nonfinite_rows,
    positive_label,
    predict_logits,
    probabilities,
    require_finite,
)
from training.runtime.mail import DEFAULT_EXTRACTION, MailText, combine_windows, read_message, windows
from training.runtime.options import ClassifierOptions
from training.runtime.text import NO_VISIBLE_CHARACTERS, has_visible_characters
from training.runtime.tokenizer import encode_batch


@dataclass(slots=True)  # not frozen: a frozen dataclass's __init__ would double what serving spends building answers
class Prediction:
    """One text's answer: what /classify returns for it and what file scoring writes as its row's columns."""

    label: str  # the card's decision rule (threshold or argmax) applied to the probabilities
    probabilities: dict[str, float]  # by label in the card's order: float32 softmax, in 0..1, summing to 1
    tokens: int  # token ids the model read, after truncation
    truncated: bool  # the text was longer than the card's max_tokens (a message: than the windows read)


@dataclass(slots=True)
class Reading:
    """One row of logits read out (Classifier.read_rows): its (n_labels,) float32 logits, and when they are all
    finite its label and its probabilities by label in the card's order (float32 softmax at the deployment prior);
    label and probabilities are None for a row the model failed on."""

    logits: torch.Tensor
    label: str | None
    probabilities: dict[str, float] | None

    @property
    def finite(self) -> bool:
        """The model gave finite logits: the row has an answer."""
        return self.label is not None


@dataclass(slots=True)
class MessageRows:
    """One raw message as the model reads it: its text and the windows of token ids cut from it."""

    mail: MailText
    rows: list[list[int]]  # windows of at most the card's max_tokens ids, in order; one for the "first" rule
    truncated: bool  # tokens were left unread beyond the windows

    @property
    def tokens(self) -> int:
        """Token ids the model reads, over all windows."""
        return sum(map(len, self.rows))

    @property
    def readable(self) -> bool:
        """Whether its text shows anything (training.runtime.text.has_visible_characters): a message without a
        readable part or subject is refused, as an empty text is."""
        return has_visible_characters(self.mail.text)


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
        # messages are read as the checkpoint's training read them; a checkpoint trained on plain texts by the default
        self.extraction = checkpoint.card.extraction or DEFAULT_EXTRACTION
        precision.prepare_for_inference(checkpoint.model, options.quantize_int8)

    @classmethod
    def load(cls, path: str | Path, options: ClassifierOptions) -> "Classifier":
        """Set torch's threads, check the device is there, load and check the checkpoint
        (training.runtime.checkpoint.load_checkpoint) in the options' dtype at their prior, prepare it for inference
        and warm up.

        Raises CheckpointError for a checkpoint that cannot be loaded; ValueError for a prior it cannot take
        (load_checkpoint) or an LRU_CACHE_CAPACITY oneDNN would crash on (precision.bound_onednn_cache);
        training.runtime.device.DeviceUnavailable (a ValueError) for a device that is not there; RuntimeError for a
        warm-up that fails.
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

    def read_rows(self, logits: torch.Tensor) -> list[Reading]:
        """(N, n_labels) float32 logits -> each row's Reading, in order: float32 softmax at the deployment prior,
        the label by the checkpoint's decision rule at its own prior (training.runtime.inference.Readout: a
        deployment prior never moves a label). A row whose logits are not all finite gets no label and no
        probabilities: none is made up for it (callers refuse it).

        The readout runs once on the whole tensor: the server reads each batch's rows on its model thread, so that
        a request's answers cost its event loop no tensor work (app.models.ModelRegistry.run_batch)."""
        probs, labels = self.checkpoint.readout.read(logits)
        names = self.card.labels
        return [
            Reading(row, label, dict(zip(names, p, strict=True))) if finite else Reading(row, None, None)
            for row, label, p, finite in zip(
                logits.unbind(), labels, probs.tolist(), torch.isfinite(logits).all(dim=1).tolist(), strict=True
            )
        ]

    def predictions(self, rows: list[list[int]], truncated: list[bool], readings: list[Reading]) -> list[Prediction]:
        """N texts' token rows, truncation flags and Readings (read_rows) -> their Predictions, in order.

        Every reading must be finite: callers refuse the texts whose rows are not first (Reading.finite,
        require_finite), since no probability is made up for them.
        """
        return self._answers([len(ids) for ids in rows], truncated, readings)

    @staticmethod
    def _answers(tokens: list[int], truncated: list[bool], readings: list[Reading]) -> list[Prediction]:
        return [
            Prediction(r.label, r.probabilities, n, cut) for r, n, cut in zip(readings, tokens, truncated, strict=True)
        ]

    def read_messages(self, raws: list[bytes]) -> list[MessageRows]:
        """Raw RFC 5322 messages -> their text by the card's extraction (training.runtime.mail.read_message, which
        never raises) and their windows of token ids: the first max_tokens for the options' mail_windows "first",
        else up to mail_max_windows windows of max_tokens. Check `readable` before scoring."""
        return [self.message_rows(read_message(raw, self.extraction)) for raw in raws]

    def message_rows(self, mail: MailText) -> MessageRows:
        """A message already read (by the card's extraction: self.extraction) and its windows of token ids, as
        read_messages cuts them; for callers that read the message themselves (file scoring reads mail folders)."""
        max_windows = 1 if self.options.mail_windows == "first" else self.options.mail_max_windows
        ids = self.checkpoint.tokenizer.encode_ordinary(mail.text) or [self.checkpoint.tokenizer.eot_token]
        rows, truncated = windows(ids, self.card.max_tokens, max_windows)
        return MessageRows(mail, rows, truncated)

    def message_predictions(self, messages: list[MessageRows], logits: torch.Tensor) -> list[Prediction]:
        """Messages and the (total windows, n_labels) logits of their windows, in order (every row finite) -> one
        Prediction per message: its windows' logits combined by the options' mail_windows rule, then read out as
        predictions does; `tokens` counts every window's."""
        positive = positive_label(self.card.labels)
        combined = combine_windows(
            logits,
            [len(m.rows) for m in messages],
            self.options.mail_windows,
            None if positive is None else self.card.labels.index(positive),
        )
        return self._answers([m.tokens for m in messages], [m.truncated for m in messages], self.read_rows(combined))

    def classify_messages(self, raws: list[bytes]) -> list[tuple[MailText, Prediction]]:
        """What each raw message was read as, and its Prediction, in order: read_messages, the windows run in
        length-sorted batches within the options' limits, then message_predictions.

        Raises ValueError naming (by index) the messages with nothing readable; NonFiniteLogits naming the windows
        (by row) the model gave non-finite logits for.
        """
        messages = self.read_messages(raws)
        unreadable = [i for i, m in enumerate(messages) if not m.readable]
        if unreadable:
            raise ValueError(f"messages {unreadable}: {NO_VISIBLE_CHARACTERS}")
        rows = [row for m in messages for row in m.rows]
        logits = require_finite(self.predict_logits(rows, self.options.batch_size, self.options.max_batch_tokens))
        return [(m.mail, p) for m, p in zip(messages, self.message_predictions(messages, logits), strict=True)]

    def classify(self, texts: list[str]) -> list[Prediction]:
        """One Prediction per text, in order: tokenized, run in length-sorted batches within the options'
        batch_size and max_batch_tokens (a text's result does not depend on the others), then predictions.

        Raises training.runtime.inference.NonFiniteLogits naming the texts (by index) the model gave non-finite
        logits for.
        """
        rows, truncated = self.tokenize(texts)
        logits = require_finite(self.predict_logits(rows, self.options.batch_size, self.options.max_batch_tokens))
        return self.predictions(rows, truncated, self.read_rows(logits))

    def warm_up(self) -> None:
        """One forward at the longest length, so the first text pays no lazy initialisation and a model that
        cannot run on this device fails at load rather than on a text.

        Raises RuntimeError when that forward gives non-finite logits.
        """
        longest = [[self.checkpoint.tokenizer.eot_token] * self.card.max_tokens]
        # the module's predict_logits, not self.predict_logits: that is the server's batches' seam
        if nonfinite_rows(predict_logits(self.checkpoint.model, longest)):
            raise RuntimeError(f"warm-up forward on {self.device} ({self.dtype}) gave non-finite logits")
