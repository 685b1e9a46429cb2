"""The one path from token ids to probabilities and labels, shared by evaluation, the serving engine and the
benchmarks: length-sorted batches, right padding, last-real-token pooling (in the model), float32 softmax; then
the decision rule (argmax, or a binary threshold chosen on validation)."""

from dataclasses import dataclass

import torch

from training.model import GPTClassifier

PAD_ID = 0  # right padding is never read by the model, so any valid token id will do


@dataclass(frozen=True)
class Threshold:
    """A binary model's decision rule: `label` wins wherever its probability is at least `value` (in 0..1).
    In config.json, metrics.json and /info it is `{"label": ..., "value": ...}`."""

    label: str
    value: float


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
) -> torch.Tensor:
    """Rows of token ids (already truncated to the model's max_tokens) -> (N, n_labels) float32 logits on the
    CPU, in input order (the model's own, maybe +-inf in a low-precision dtype: see probabilities).

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
