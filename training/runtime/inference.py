"""The one path from token ids to probabilities and labels, shared by evaluation, the serving engine and the
benchmarks: length-sorted batches, right padding, last-real-token pooling (in the model), float32 softmax; then
the decision rule (argmax, or a binary threshold chosen on held-out rows).

Calibration lives in the head: the served logits are the trained ones divided by a temperature and shifted by
the log ratio of the deployment prior to the training prior (calibrate_logits), and fold_calibration writes that
into the score layer's weight and bias, so every consumer of the model (evaluation, serving, file scoring, the
Hugging Face and ONNX exports) gives the calibrated probabilities without knowing about it. A deployment prior
chosen when serving (Readout) is not folded: decisions stay on the checkpoint's own logits.
"""

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from training.runtime.model import GPTClassifier

PAD_ID = 0  # right padding is never read by the model, so any valid token id will do


@dataclass(frozen=True)
class Threshold:
    """A binary model's decision rule: `label` wins wherever its probability is at least `value` (in 0..1).
    In config.json, metrics.json and /info it is `{"label": ..., "value": ...}`."""

    label: str
    value: float


@dataclass(frozen=True)
class Calibration:
    """How a checkpoint's head was calibrated (already folded into its weights, see fold_calibration).

    Served logits = trained logits / temperature + log(prior / training_prior), per label: temperature scaling
    (Guo et al. 2017, "On Calibration of Modern Neural Networks") fitted on validation, then Bayes' rule moving
    the probabilities from the label distribution training saw to the one expected in deployment (Saerens et al.
    2002, "Adjusting the Outputs of a Classifier to New a Priori Probabilities"). Priors are {label: rate}, rates
    positive and summing to 1. In config.json: {"temperature": T, "training_prior": {...}, "prior": {...}}.
    """

    temperature: float
    training_prior: dict[str, float]  # what the loss saw: the train split's rates, uniform when class-weighted
    prior: dict[str, float]  # the deployment prior: in config.json the weights'; when served, the one in force

    def with_prior(self, prior: dict[str, float]) -> "Calibration":
        """The same calibration at another deployment prior."""
        return Calibration(self.temperature, self.training_prior, prior)


def positive_label(label_names: list[str] | tuple[str, ...]) -> str | None:
    """The label a binary threshold and a single prior rate apply to: "spam" if present, else the second label;
    None beyond 2 labels."""
    if len(label_names) != 2:
        return None
    return "spam" if "spam" in label_names else label_names[1]


def check_prior(prior: dict[str, float], labels: list[str] | tuple[str, ...]) -> dict[str, float]:
    """`prior` if it gives every label of `labels` (and no other) a rate in (0, 1), the rates summing to 1 (within
    1e-6); else ValueError showing it."""
    rates = list(prior.values())
    if set(prior) != set(labels) or not all(0 < p < 1 for p in rates) or abs(sum(rates) - 1) > 1e-6:
        raise ValueError(f"a prior must give each of {list(labels)} a rate in (0, 1), summing to 1; got {prior!r}")
    return prior


def binary_prior(rate: float, labels: list[str] | tuple[str, ...]) -> dict[str, float]:
    """{positive_label: rate, the other label: 1 - rate} for a binary model; ValueError for a rate outside
    (0, 1) or a model that is not binary."""
    positive = positive_label(labels)
    if positive is None:
        raise ValueError(f"a single prior rate needs a binary model; this one has labels {list(labels)}")
    rates = {positive: rate, labels[1 - labels.index(positive)]: 1.0 - rate}
    return check_prior({label: rates[label] for label in labels}, labels)  # in label order, as the card's priors


def shift_threshold(threshold: Threshold, shift: torch.Tensor, labels: list[str] | tuple[str, ...]) -> Threshold:
    """The threshold that makes, on logits + shift (prior_shift), the decisions `threshold` makes on the logits:
    its log-odds move by the shift's difference between its label and the other. A threshold of 0 or 1 stays."""
    positive = labels.index(threshold.label)
    t = threshold.value
    if t in (0.0, 1.0):
        return threshold
    log_odds = math.log(t / (1 - t)) + float(shift[positive] - shift[1 - positive])
    return Threshold(threshold.label, 1 / (1 + math.exp(-log_odds)))


def prior_shift(
    from_prior: dict[str, float], to_prior: dict[str, float], labels: list[str] | tuple[str, ...]
) -> torch.Tensor:
    """(n_labels,) float64 log(to_prior / from_prior) in label order: added to logits, it moves the softmax from
    one label distribution to another (Bayes' rule: the likelihoods stay, the priors change)."""
    return torch.tensor([math.log(to_prior[label] / from_prior[label]) for label in labels], dtype=torch.float64)


def calibrate_logits(logits: torch.Tensor, temperature: float, shift: torch.Tensor) -> torch.Tensor:
    """(N, n_labels) logits -> logits / temperature + shift, float32: what fold_calibration makes the model give."""
    return (logits.double() / temperature + shift).float()


@torch.no_grad()
def fold_calibration(model: GPTClassifier, temperature: float, shift: torch.Tensor) -> None:
    """Make `model` give calibrate_logits of its logits, by rewriting its score layer in place (computed in
    float64): weight / temperature, bias / temperature + shift. Exact up to float rounding, since the head is
    linear; the Hugging Face export then folds that bias on as it folds any (training.export.fold_score_bias)."""
    score = model.score
    score.weight.copy_(score.weight.double() / temperature)
    score.bias.copy_(score.bias.double() / temperature + shift.to(score.bias.device))


def pad_right(
    rows: list[list[int]], pad_id: int = PAD_ID, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token id lists -> (B, T) right-padded ids and (B,) lengths. The pad id is never read by the model."""
    lengths = torch.tensor([len(row) for row in rows], dtype=torch.long)
    idx = torch.full((len(rows), int(lengths.max())), pad_id, dtype=torch.long)
    for i, row in enumerate(rows):
        idx[i, : len(row)] = torch.tensor(row, dtype=torch.long)
    return idx.to(device), lengths.to(device)


def length_sorted_batches(
    lengths: list[int], max_batch: int | None = None, max_batch_tokens: int | None = None
) -> list[list[int]]:
    """Indices grouped into batches of similar length, so that little compute goes to padding.

    A batch holds at most max_batch rows (None: no row limit) and, padded to its longest row, at most
    max_batch_tokens tokens (None: no budget; a single row longer than the budget still gets a batch of its own).
    """
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    batches, current = [], []
    for i in order:
        # sorted ascending, so the row being added is the batch's longest
        too_many_tokens = max_batch_tokens is not None and (len(current) + 1) * lengths[i] > max_batch_tokens
        if current and (len(current) == max_batch or too_many_tokens):
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


class NonFiniteLogits(RuntimeError):
    """The model gave non-finite logits (NaN or +-inf) for some rows: a fault of the model (weights that overflow
    on some tokens, float16 overflow), not of the input. `rows` are the rows' indices in the caller's input."""

    def __init__(self, rows: list[int]):
        self.rows = rows
        shown = ", ".join(map(str, rows[:20])) + (f" and {len(rows) - 20} more" if len(rows) > 20 else "")
        super().__init__(
            f"the model gave non-finite logits (NaN or inf) for {len(rows)} of the rows: {shown}; "
            "no probability is reported for them (a fault of the model, e.g. overflow, not of the data)"
        )


def probabilities(logits: torch.Tensor) -> torch.Tensor:
    """(B, n_labels) logits of any float dtype -> (B, n_labels) float32 softmax. A row whose logits are not all
    finite (NaN, or +-inf from overflow) is NaN throughout: no probability is made up for it (see nonfinite_rows)."""
    logits = logits.float()
    finite = torch.isfinite(logits).all(dim=-1, keepdim=True)
    return torch.softmax(logits, dim=-1).masked_fill(~finite, float("nan"))


def nonfinite_rows(probs: torch.Tensor) -> list[int]:
    """Indices of the rows of (N, n_labels) logits or probabilities that are not all finite: the model failed on
    them."""
    return (~torch.isfinite(probs).all(dim=1)).nonzero().flatten().tolist()


def require_finite(probs: torch.Tensor) -> torch.Tensor:
    """`probs` unchanged when every row is finite; raises NonFiniteLogits naming the rows that are not."""
    bad = nonfinite_rows(probs)
    if bad:
        raise NonFiniteLogits(bad)
    return probs


@torch.inference_mode()
def predict_logits(
    model: GPTClassifier,
    rows: list[list[int]],
    max_batch_size: int | None = None,
    max_batch_tokens: int | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """Rows of token ids (already truncated to the model's max_tokens) -> (N, n_labels) float32 logits on the
    CPU, in input order (the model's own, maybe +-inf in a low-precision dtype: see probabilities). `on_batch` is
    told each batch's row count once it is done (a progress bar's update).

    Rows run in length-sorted batches of at most max_batch_size rows and max_batch_tokens padded tokens (None: no
    limit, so a batch the caller already bounded runs as one forward pass). A row's result does not depend on
    its batch-mates: right padding with causal attention, pooled at each row's last real token. A row whose
    logits are not finite is refused by callers with nonfinite_rows or require_finite (probabilities makes it NaN).
    """
    device = model.transformer.wte.weight.device
    out = torch.empty(len(rows), model.config.n_labels)
    for batch in length_sorted_batches([len(r) for r in rows], max_batch_size, max_batch_tokens):
        idx, lengths = pad_right([rows[i] for i in batch], PAD_ID, device)
        out[batch] = model(idx, lengths).float().cpu()
        if on_batch is not None:
            on_batch(len(batch))
    return out


def predict_probabilities(
    model: GPTClassifier,
    rows: list[list[int]],
    max_batch_size: int | None = None,
    max_batch_tokens: int | None = None,
) -> torch.Tensor:
    """predict_logits' rows -> (N, n_labels) float32 probabilities on the CPU, in input order."""
    return probabilities(predict_logits(model, rows, max_batch_size, max_batch_tokens))


def decide(probs: torch.Tensor, labels: list[str] | tuple[str, ...], threshold: Threshold | None) -> list[str]:
    """Labels for (B, n_labels) probabilities: argmax, or for a binary model with a threshold, `threshold.label`
    wherever its probability is at least `threshold.value` and the other label elsewhere."""
    if threshold is None:
        return [labels[i] for i in probs.argmax(dim=1).tolist()]
    positive = labels.index(threshold.label)
    other = labels[1 - positive]
    return [labels[positive] if p >= threshold.value else other for p in probs[:, positive].tolist()]


@dataclass(frozen=True)
class Readout:
    """How every consumer (the server's routes, file scoring, Ray) turns a checkpoint's logits into what it reports:
    probabilities at the deployment prior, labels decided at the checkpoint's own.

    The model's weights are the checkpoint's, unshifted: a label is decide() on softmax(logits) against the
    threshold the checkpoint chose on those same probabilities, so it is the same number compared with the same
    number whatever the deployment prior, and a prior cannot move a decision, not even by rounding. The reported
    logits are logits + shift (Bayes' rule, Saerens et al. 2002), their softmax the reported probabilities.
    """

    labels: tuple[str, ...]
    threshold: Threshold | None  # the checkpoint's decision rule, on softmax(logits); None: argmax of those
    # (n_labels,) float64 prior_shift from the checkpoint's prior to the deployment's; None: served at the checkpoint's
    shift: torch.Tensor | None = None

    @property
    def threshold_in_force(self) -> Threshold | None:
        """The threshold on the reported probabilities that makes the same decisions, up to float rounding (what
        /info states); None for argmax."""
        if self.threshold is None or self.shift is None:
            return self.threshold
        return shift_threshold(self.threshold, self.shift, self.labels)

    def scores(self, logits: torch.Tensor) -> torch.Tensor:
        """(N, n_labels) float32 logits -> (N, n_labels) float32 logits at the deployment prior (TEI's raw scores)."""
        return logits if self.shift is None else calibrate_logits(logits, 1.0, self.shift)

    def read(self, logits: torch.Tensor) -> tuple[torch.Tensor, list[str]]:
        """(N, n_labels) finite float32 logits -> ((N, n_labels) float32 probabilities at the deployment prior,
        N labels decided on softmax(logits) by the checkpoint's threshold or argmax)."""
        return probabilities(self.scores(logits)), decide(probabilities(logits), self.labels, self.threshold)
