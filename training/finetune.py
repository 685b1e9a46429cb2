"""The fine-tuning loop: which parameters train, the frozen-prefix cache, sorted batches, best epoch by validation.

It knows nothing about files, tokenizers or checkpoints (minGPT's trainer): it takes a GPTClassifier and token id
rows with label indices, and leaves the model holding the weights of the epoch with the lowest validation loss.
"""

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from tqdm import tqdm

from training.config import TrainConfig
from training.device import resolve_device
from training.inference import PAD_ID, length_sorted_batches, pad_right
from training.lora import add_lora, merge_lora
from training.model import GPTClassifier, Packing

PREFIX_BATCH_SIZE = 32  # the frozen prefix and validation run without gradients, so they afford larger batches


@dataclass
class Examples:
    rows: list[list[int]]  # token ids, already truncated to max_tokens
    targets: list[int]  # label indices

    def __post_init__(self):
        assert len(self.rows) == len(self.targets), "one target per row"


@dataclass
class History:
    epochs: list[dict] = field(default_factory=list)  # epoch, train_loss, train_accuracy, val_loss, val_accuracy
    best_epoch: int = 0  # 1-based; its weights are the ones the model holds after train()
    step_losses: list[float] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"epochs": self.epochs, "best_epoch": self.best_epoch}


def prepare_trainable(model: GPTClassifier, config: TrainConfig) -> int:
    """Freeze what the config leaves frozen (adding LoRA adapters if asked); returns the frozen leading blocks."""
    n_layer = model.config.n_layer
    if config.trainable == "all":
        model.requires_grad_(True)
        return 0
    model.requires_grad_(False)
    if config.trainable == "lora":
        add_lora(model, config.lora_rank, config.lora_alpha)  # new adapter parameters require grad
        n_frozen = 0  # every block changes, so only the embeddings stay frozen: nothing worth caching
    else:
        if config.trainable_blocks > n_layer:
            raise ValueError(f"trainable_blocks {config.trainable_blocks!r} exceeds the model's {n_layer} blocks")
        n_frozen = n_layer - config.trainable_blocks
        model.transformer.h[n_frozen:].requires_grad_(True)
    model.transformer.ln_f.requires_grad_(True)
    model.score.requires_grad_(True)
    return n_frozen


@torch.inference_mode()
def prefix_cache(
    model: GPTClassifier, rows: list[list[int]], n_blocks: int, device: torch.device, desc: str
) -> list[torch.Tensor]:
    """Each row's (T_i, C) float32 residual stream after the first n_blocks, in row order."""
    cache: list[torch.Tensor] = [torch.empty(0)] * len(rows)
    batches = length_sorted_batches([len(r) for r in rows], PREFIX_BATCH_SIZE)
    for batch in tqdm(batches, desc=desc, unit="batch"):
        idx, lengths = pad_right([rows[i] for i in batch], PAD_ID, device)
        x = model.prefix(idx, Packing(lengths, device), n_blocks).float()  # (N, C)
        for i, row in zip(batch, x.split([len(rows[i]) for i in batch]), strict=True):
            cache[i] = row.clone()  # clone: keep the row, not the whole batch
    return cache


def tail_forward(
    model: GPTClassifier, rows: list[list[int]], n_frozen: int, cached: bool, device: torch.device, desc: str
) -> Callable[[list[int]], torch.Tensor]:
    """A function from a batch of row indices to (B, n_labels) logits, through the cache when asked."""
    lengths = torch.tensor([len(r) for r in rows])  # on the CPU, where Packing reads them
    if not cached:

        def run(batch: list[int]) -> torch.Tensor:
            return model(*pad_right([rows[i] for i in batch], PAD_ID, device))

        return run
    cache = prefix_cache(model, rows, n_frozen, device, desc)

    def run(batch: list[int]) -> torch.Tensor:
        return model.suffix(torch.cat([cache[i] for i in batch]), Packing(lengths[batch], device), n_frozen)

    return run


def train(model: GPTClassifier, train_data: Examples, val_data: Examples, config: TrainConfig) -> History:
    """Fine-tune `model` in place and leave it in eval mode with the best epoch's weights (LoRA merged)."""
    if not train_data.rows or not val_data.rows:
        raise ValueError(f"need training and validation examples, got {len(train_data.rows)} and {len(val_data.rows)}")
    device = resolve_device(config.device)
    torch.manual_seed(config.seed)
    model.to(device)
    n_frozen = prepare_trainable(model, config)
    cached = config.cache_prefix and n_frozen > 0
    run_train = tail_forward(model, train_data.rows, n_frozen, cached, device, "prefix (train)")
    run_val = tail_forward(model, val_data.rows, n_frozen, cached, device, "prefix (validation)")
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW(trainable.values(), lr=config.lr, weight_decay=config.weight_decay)
    generator = torch.Generator().manual_seed(config.seed)
    # Batches hold rows of similar length (little padding); their order is shuffled each epoch.
    batches = length_sorted_batches([len(r) for r in train_data.rows], config.batch_size)
    targets = torch.tensor(train_data.targets, device=device)
    history, best_loss, best_state = History(), float("inf"), {}
    for epoch in range(1, config.epochs + 1):
        order = torch.randperm(len(batches), generator=generator).tolist()
        desc = f"epoch {epoch}/{config.epochs}"
        train_loss, train_accuracy = train_epoch(
            model, run_train, [batches[i] for i in order], targets, optimizer, history, desc
        )
        val_loss, val_accuracy = evaluate_loss(model, run_val, val_data, device)
        history.epochs.append(
            dict(
                epoch=epoch,
                train_loss=train_loss,
                train_accuracy=train_accuracy,
                val_loss=val_loss,
                val_accuracy=val_accuracy,
            )
        )
        print(
            f"epoch {epoch}: train loss {train_loss:.4f}, validation loss {val_loss:.4f}, accuracy {val_accuracy:.4f}"
        )
        if val_loss < best_loss:
            best_loss, history.best_epoch = val_loss, epoch
            best_state = {name: p.detach().clone() for name, p in trainable.items()}
    with torch.no_grad():
        for name, p in trainable.items():
            p.copy_(best_state[name])
    merge_lora(model)
    return history


def train_epoch(
    model: GPTClassifier,
    run: Callable[[list[int]], torch.Tensor],
    batches: list[list[int]],
    targets: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    history: History,
    desc: str,
) -> tuple[float, float]:
    """One optimizer step per batch, in the given order; returns the epoch's mean loss and accuracy."""
    model.train()
    loss_sum, correct, n = 0.0, 0, 0
    bar = tqdm(batches, desc=desc, unit="batch")
    for batch in bar:
        logits = run(batch)
        loss = F.cross_entropy(logits, targets[batch])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        history.step_losses.append(loss.item())
        loss_sum += history.step_losses[-1] * len(batch)
        correct += (logits.argmax(dim=1) == targets[batch]).sum().item()
        n += len(batch)
        bar.set_postfix(loss=f"{history.step_losses[-1]:.4f}", refresh=False)  # redrawn at tqdm's pace
    return loss_sum / n, correct / n


@torch.inference_mode()
def evaluate_loss(
    model: GPTClassifier, run: Callable[[list[int]], torch.Tensor], data: Examples, device: torch.device
) -> tuple[float, float]:
    """Mean cross-entropy and accuracy over `data`."""
    model.eval()
    targets = torch.tensor(data.targets, device=device)
    loss_sum, correct = 0.0, 0
    for batch in length_sorted_batches([len(r) for r in data.rows], PREFIX_BATCH_SIZE):
        logits = run(batch)
        loss_sum += F.cross_entropy(logits, targets[batch], reduction="sum").item()
        correct += (logits.argmax(dim=1) == targets[batch]).sum().item()
    return loss_sum / len(data.rows), correct / len(data.rows)
