"""Batching and probabilities, shared by evaluation and the serving engine."""

import tiktoken
import torch

from training.model import GPTClassifier
from training.tokenizer import encode_batch


def pad_right(
    rows: list[list[int]], pad_id: int, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token id lists -> (B, T) right-padded ids and (B,) lengths. The pad id is never read by the model."""
    lengths = torch.tensor([len(row) for row in rows], dtype=torch.long)
    idx = torch.full((len(rows), int(lengths.max())), pad_id, dtype=torch.long)
    for i, row in enumerate(rows):
        idx[i, : len(row)] = torch.tensor(row, dtype=torch.long)
    return idx.to(device), lengths.to(device)


def length_sorted_batches(lengths: list[int], max_batch: int, max_batch_tokens: int | None = None) -> list[list[int]]:
    """Indices grouped into batches of similar length, so that little compute goes to padding.

    A batch holds at most max_batch rows and, padded to its longest row, at most max_batch_tokens tokens
    (a single row longer than the budget still gets a batch of its own).
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


def probabilities(logits: torch.Tensor) -> torch.Tensor:
    """float32 softmax that stays finite even when low-precision logits overflowed to +-inf."""
    logits = logits.float()
    finfo = torch.finfo(torch.float32)
    return torch.softmax(logits.nan_to_num(nan=0.0, posinf=finfo.max, neginf=finfo.min), dim=-1)


@torch.inference_mode()
def predict_proba(
    model: GPTClassifier,
    enc: tiktoken.Encoding,
    texts: list[str],
    max_tokens: int,
    batch_size: int = 32,
) -> torch.Tensor:
    """(N, n_labels) float32 probabilities for `texts`, in input order."""
    device = next(model.parameters()).device
    rows, _ = encode_batch(enc, texts, max_tokens)
    out = torch.empty(len(texts), model.config.n_labels)
    for batch in length_sorted_batches([len(r) for r in rows], batch_size):
        idx, lengths = pad_right([rows[i] for i in batch], enc.eot_token, device)
        out[batch] = probabilities(model(idx, lengths)).cpu()
    return out
