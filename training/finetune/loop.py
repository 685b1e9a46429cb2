"""The fine-tuning loop: which parameters train, the frozen-prefix cache, sorted batches, best epoch by validation.

It knows nothing about files, tokenizers or checkpoints (minGPT's trainer): it takes a GPTClassifier and token id
rows with label indices, and leaves the model holding the weights of the epoch with the lowest validation loss.
After each epoch it can hand its whole state (TrainState) to a callback, and it can start from such a state, so
that a caller can save it and resume an interrupted run (training.finetune.resume). Over several processes (a
training.finetune.distributed.Group) every rank runs the same loop on its share of every global batch.
"""

import contextlib
import copy
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from training.config import TrainConfig
from training.finetune.distributed import SINGLE, Group
from training.finetune.lora import add_lora, merge_lora
from training.runtime import precision
from training.runtime.device import resolve_device
from training.runtime.inference import PAD_ID, length_sorted_batches, pad_right
from training.runtime.model import GPTClassifier, Packing

PREFIX_BATCH_SIZE = 32  # the frozen prefix and validation run without gradients, so they afford larger batches
FUSED_ADAMW_DEVICES = ("cpu", "cuda")  # where adamw uses torch's fused kernel (torch has it on both)


@dataclass
class Examples:
    rows: list[list[int]]  # token ids, already truncated to max_tokens
    targets: list[int]  # label indices

    def __post_init__(self):
        assert len(self.rows) == len(self.targets), "one target per row"


@dataclass(frozen=True)
class EpochMetrics:
    """One epoch's losses (mean cross-entropy per row, weighed by class_weights when given) and accuracies."""

    epoch: int  # 1-based
    train_loss: float  # over the epoch's optimizer steps, as the weights moved
    train_accuracy: float
    val_loss: float  # after the epoch
    val_accuracy: float


@dataclass
class History:
    """What a run did, epoch by epoch. In metrics.json and the resume state: to_json()."""

    epochs: list[EpochMetrics] = field(default_factory=list)
    best_epoch: int = 0  # 1-based; its weights are the ones the model holds after train()
    step_losses: list[float] = field(default_factory=list)  # each optimizer step's mean loss over its global batch

    def to_json(self) -> dict:
        """{"epochs": [{"epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy"}, ...], "best_epoch"}."""
        return {"epochs": [asdict(e) for e in self.epochs], "best_epoch": self.best_epoch}

    @classmethod
    def from_json(cls, record: dict, step_losses: list[float]) -> "History":
        """The History to_json() wrote, with the step losses kept beside it. Raises KeyError or TypeError for a
        record of another shape."""
        return cls([EpochMetrics(**e) for e in record["epochs"]], record["best_epoch"], step_losses)


@dataclass
class TrainState:
    """Everything the loop needs to continue after a completed epoch as if it had never stopped; tensors on the CPU.

    The frozen weights are not here: they come again from the same base model and seed, and the frozen-prefix
    cache is recomputed from them. There is no learning-rate scheduler (constant AdamW rate), so no scheduler state.
    """

    epoch: int  # completed epochs, 1-based
    weights: dict[str, torch.Tensor]  # the trainable parameters by name (LoRA adapters unmerged)
    optimizer: dict  # torch.optim.AdamW.state_dict(): "state" by parameter index, "param_groups"
    rng: dict[str, torch.Tensor]  # uint8 generator states: "torch" (CPU), "batch_order", "cuda" when on CUDA
    best_loss: float  # the lowest validation loss so far
    best_weights: dict[str, torch.Tensor]  # the trainable parameters of history.best_epoch
    history: History


def frozen_prefix(config: TrainConfig, n_layer: int) -> int | None:
    """The leading blocks that `config` leaves frozen in a model of n_layer blocks, the embeddings frozen with them:
    n_layer - trainable_blocks for last-blocks; 0 for lora (every block changes, only the embeddings stay); None
    for all (nothing stays). Raises ValueError for more trainable blocks than the model has."""
    if config.trainable == "all":
        return None
    if config.trainable == "lora":
        return 0
    if config.trainable_blocks > n_layer:
        raise ValueError(f"trainable_blocks {config.trainable_blocks!r} exceeds the model's {n_layer} blocks")
    return n_layer - config.trainable_blocks


def prepare_trainable(model: GPTClassifier, config: TrainConfig) -> int:
    """Freeze what the config leaves frozen (frozen_prefix; adding LoRA adapters if asked); returns the frozen
    leading blocks."""
    n_frozen = frozen_prefix(config, model.config.n_layer)
    if n_frozen is None:
        model.requires_grad_(True)
        return 0
    model.requires_grad_(False)
    if config.trainable == "lora":
        add_lora(model, config.lora_rank, config.lora_alpha)  # new adapter parameters require grad
    else:
        model.transformer.h[n_frozen:].requires_grad_(True)
    model.transformer.ln_f.requires_grad_(True)
    model.score.requires_grad_(True)
    return n_frozen


@torch.inference_mode()
def prefix_cache(
    model: GPTClassifier,
    rows: list[list[int]],
    n_blocks: int,
    device: torch.device,
    desc: str,
    *,
    only: list[int] | None = None,
    progress: bool = True,
    compute: str = "float32",
) -> list[torch.Tensor]:
    """Each row's (T_i, C) float32 residual stream after the first n_blocks, in row order; with `only`, just
    those rows' (the others hold empty tensors). Computed in `compute` (a precision.training_precision), stored in
    float32; in bfloat16, the frozen linear layers' weights are cast once for the whole pass (frozen_linears_cast)."""
    cache: list[torch.Tensor] = [torch.empty(0)] * len(rows)
    wanted = list(range(len(rows))) if only is None else only
    batches = length_sorted_batches([len(rows[i]) for i in wanted], PREFIX_BATCH_SIZE)
    cast_once = (
        frozen_linears_cast(model.transformer.h[:n_blocks], torch.bfloat16)
        if compute == "bfloat16"
        else contextlib.nullcontext()
    )
    with cast_once:
        for batch in tqdm([[wanted[j] for j in b] for b in batches], desc=desc, unit="batch", disable=not progress):
            idx, lengths = pad_right([rows[i] for i in batch], PAD_ID, device)
            with precision.training_autocast(device, compute):
                x = model.prefix(idx, Packing(lengths, device), n_blocks).float()  # (N, C)
            for i, row in zip(batch, x.split([len(rows[i]) for i in batch]), strict=True):
                cache[i] = row.clone()  # clone: keep the row, not the whole batch
    return cache


@contextlib.contextmanager
def frozen_linears_cast(module: nn.Module, dtype: torch.dtype):
    """For the duration, every frozen nn.Linear in `module` holds its weight and bias cast to `dtype`; after, its own
    parameters again (the same objects, untouched). Under autocast to `dtype` the products are the same bit for bit:
    autocast casts a linear layer's weight and bias to `dtype` itself, but again at every call, since its cast cache
    keeps only tensors that require grad. Costs the cast copies' memory (2 bytes a weight in bfloat16)."""
    frozen = [m for m in module.modules() if isinstance(m, nn.Linear) and not m.weight.requires_grad]
    originals = [(m.weight, m.bias) for m in frozen]
    try:
        for m, (weight, bias) in zip(frozen, originals, strict=True):
            m.weight = nn.Parameter(weight.detach().to(dtype), requires_grad=False)
            if bias is not None:
                m.bias = nn.Parameter(bias.detach().to(dtype), requires_grad=False)
        yield
    finally:
        for m, (weight, bias) in zip(frozen, originals, strict=True):
            m.weight, m.bias = weight, bias


class RowLogits(nn.Module):
    """Row indices -> (B, n_labels) float32 logits of those rows, through the frozen-prefix cache when there is
    one; computed in `compute` (a precision.training_precision).

    An nn.Module (holding the model) so that DistributedDataParallel can wrap the forward pass training runs.
    """

    def __init__(
        self,
        model: GPTClassifier,
        rows: list[list[int]],
        n_frozen: int,
        cache: list[torch.Tensor] | None,
        device: torch.device,
        compute: str = "float32",
    ):
        super().__init__()
        self.model, self.rows, self.n_frozen, self.cache, self.run_device = model, rows, n_frozen, cache, device
        self.compute = compute
        self.lengths = torch.tensor([len(r) for r in rows])  # on the CPU, where Packing reads them

    def forward(self, batch: list[int]) -> torch.Tensor:
        with precision.training_autocast(self.run_device, self.compute):
            return self.logits(batch).float()  # the loss and its gradient start in float32

    def logits(self, batch: list[int]) -> torch.Tensor:
        if self.cache is None:
            return self.model(*pad_right([self.rows[i] for i in batch], PAD_ID, self.run_device))
        x = torch.cat([self.cache[i] for i in batch])  # (N, C) the batch's real tokens, row after row
        return self.model.suffix(x, Packing(self.lengths[batch], self.run_device), self.n_frozen)


def tail_forward(
    model: GPTClassifier,
    rows: list[list[int]],
    n_frozen: int,
    cached: bool,
    device: torch.device,
    desc: str,
    *,
    only: list[int] | None = None,
    progress: bool = True,
    compute: str = "float32",
) -> RowLogits:
    """A module from a batch of row indices to (B, n_labels) logits, through the cache when asked; with `only`,
    the cache holds (and the module takes) just those rows. compute: "float32" or "bfloat16" (autocast), as
    precision.training_precision resolved it."""
    cache = (
        prefix_cache(model, rows, n_frozen, device, desc, only=only, progress=progress, compute=compute)
        if cached
        else None
    )
    return RowLogits(model, rows, n_frozen, cache, device, compute)


def validation_share(data: Examples, group: Group) -> list[int]:
    """The validation rows this rank evaluates: its share of the rows in length order."""
    return group.share(sorted(range(len(data.rows)), key=lambda i: len(data.rows[i])))


@dataclass
class Loop:
    """A run's live state on its training device: the model and what of it trains, the optimizer, the generator
    that orders each epoch's batches, and what the epochs so far gave (the best epoch's weights among them).
    snapshot() and restore() carry it to and from a TrainState."""

    model: GPTClassifier
    trainable: dict[str, nn.Parameter]  # by name, the parameters that require grad
    optimizer: torch.optim.Optimizer
    generator: torch.Generator  # orders the batches of each epoch
    device: torch.device
    group: Group
    class_weights: torch.Tensor | None  # (n_labels,) float32 on device: each row's loss weighs its label's weight
    epoch: int = 0  # completed epochs
    best_loss: float = math.inf  # the lowest validation loss so far
    best_weights: dict[str, torch.Tensor] = field(default_factory=dict)  # on device, of history.best_epoch
    history: History = field(default_factory=History)

    @classmethod
    def start(
        cls, model: GPTClassifier, config: TrainConfig, device: torch.device, group: Group, weights: torch.Tensor | None
    ) -> "Loop":
        """A loop before its first epoch over `model`'s trainable parameters (prepare_trainable set them)."""
        trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
        optimizer = adamw(list(trainable.values()), config.lr, config.weight_decay)
        generator = torch.Generator().manual_seed(config.seed)
        weights = None if weights is None else weights.to(device, torch.float32)
        return cls(model, trainable, optimizer, generator, device, group, weights)

    def end_epoch(self, metrics: EpochMetrics) -> None:
        """Record a finished epoch; keep a copy of the weights when its validation loss is the lowest yet."""
        self.epoch = metrics.epoch
        self.history.epochs.append(metrics)
        if metrics.val_loss < self.best_loss:
            self.best_loss, self.history.best_epoch = metrics.val_loss, metrics.epoch
            self.best_weights = {name: p.detach().clone() for name, p in self.trainable.items()}

    def keep_best(self) -> None:
        """Put the best epoch's weights into the model."""
        with torch.no_grad():
            for name, p in self.trainable.items():
                p.copy_(self.best_weights[name])

    def snapshot(self) -> TrainState:
        """CPU copies of the state after the last epoch (the optimizer's state tensors too: it keeps updating
        its own)."""

        def cpu(tensors: dict) -> dict:
            return {k: v.detach().to("cpu", copy=True) if torch.is_tensor(v) else v for k, v in tensors.items()}

        optimizer_state = self.optimizer.state_dict()
        rng = {"torch": torch.get_rng_state(), "batch_order": self.generator.get_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        return TrainState(
            epoch=self.epoch,
            weights=cpu(self.trainable),
            optimizer={
                "state": {i: cpu(s) for i, s in optimizer_state["state"].items()},
                "param_groups": copy.deepcopy(optimizer_state["param_groups"]),
            },
            rng=rng,
            best_loss=self.best_loss,
            best_weights=cpu(self.best_weights),
            history=copy.deepcopy(self.history),
        )

    def restore(self, state: TrainState) -> None:
        """Continue from `state`: its weights, optimizer, generators, history and best epoch.

        Raises ValueError when the state's parameter names or shapes are not the trainable parameters'.
        """
        for what, tensors in (("weights", state.weights), ("best weights", state.best_weights)):
            if set(tensors) != set(self.trainable):
                differ = sorted(set(tensors) ^ set(self.trainable))
                raise ValueError(f"the saved {what} are for other trainable parameters, e.g. {differ[0]!r}")
            for name, p in self.trainable.items():
                if tensors[name].shape != p.shape:
                    shapes = f"{tuple(tensors[name].shape)}, the model's {tuple(p.shape)}"
                    raise ValueError(f"saved {name!r} has shape {shapes}")
        with torch.no_grad():
            for name, p in self.trainable.items():
                p.copy_(state.weights[name])
        self.optimizer.load_state_dict(state.optimizer)
        torch.set_rng_state(state.rng["torch"])
        self.generator.set_state(state.rng["batch_order"])
        if self.device.type == "cuda" and "cuda" in state.rng:
            torch.cuda.set_rng_state(state.rng["cuda"], self.device)
        self.epoch, self.best_loss, self.history = state.epoch, state.best_loss, copy.deepcopy(state.history)
        self.best_weights = {name: t.to(self.device) for name, t in state.best_weights.items()}

    def train_epoch(
        self, forward: Callable[[list[int]], torch.Tensor], batches: list[list[int]], targets: torch.Tensor, desc: str
    ) -> tuple[float, float]:
        """One optimizer step per global batch of row indices, in the given order; returns the epoch's mean loss
        and accuracy. forward: row indices -> (B, n_labels) float32 logits; targets: (N,) every row's label index.

        This rank computes its share of each batch; its loss is the sum of its rows' cross-entropy over the global
        batch's size, so that gradients summed over ranks are the global batch's mean-loss gradient. A rank whose
        share of a batch is empty runs one of its own rows at weight 0, so that it still joins the gradient sum.
        """
        self.model.train()
        stand_in = next(share for share in map(self.group.share, batches) if share)[:1]
        loss_sum, correct, n = 0.0, 0, 0
        bar = tqdm(batches, desc=desc, unit="batch", disable=not self.group.is_main)
        for batch in bar:
            rows, real = self.group.share(batch), 1.0
            if not rows:
                rows, real = stand_in, 0.0
            batch_loss, batch_correct = self.step(forward, rows, torch.full((len(rows),), real), targets, len(batch))
            self.history.step_losses.append(batch_loss / len(batch))
            loss_sum, correct, n = loss_sum + batch_loss, correct + round(batch_correct), n + len(batch)
            bar.set_postfix(loss=f"{self.history.step_losses[-1]:.4f}", refresh=False)  # redrawn at tqdm's pace
        return loss_sum / n, correct / n

    def step(
        self,
        forward: Callable[[list[int]], torch.Tensor],
        rows: list[int],
        weight: torch.Tensor,
        targets: torch.Tensor,
        batch_size: int,
    ) -> tuple[float, float]:
        """One optimizer step on this rank's `rows` of a global batch of batch_size rows, each row's loss times
        its (B_rank,) `weight` (1, or 0 for a stand-in); returns the global batch's loss sum and correct rows."""
        weight = weight.to(targets.device)
        logits = forward(rows)
        losses = F.cross_entropy(logits, targets[rows], weight=self.class_weights, reduction="none") * weight
        self.optimizer.zero_grad(set_to_none=True)
        (losses.sum() / batch_size).backward()
        self.optimizer.step()
        hits = (logits.argmax(dim=1) == targets[rows]).double() @ weight.double()
        return self.group.sum(torch.stack([losses.detach().double().sum(), hits])).tolist()


def adamw(params: list[nn.Parameter], lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW that decays only the weight matrices and embeddings (p.dim() >= 2), nanoGPT's configure_optimizers:
    biases and LayerNorm gains are not pulled toward zero. Parameter groups: the decayed, then the others, each in
    the order given (the order a resume state indexes them by).

    On CPU and CUDA, torch's fused kernel (fused=True): one pass over each tensor, where torch's default on CPU, a
    loop of per-tensor operations, allocates several temporaries the size of each parameter at every step. For the
    last block, ln_f and head of GPT-2 124M (7.1M parameters, 2 cores): 5 ms a step against 29 to 72 ms, which was
    most of an epoch's time with the frozen prefix cached (docs/performance.md, "Training speed")."""
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    fused = all(p.device.type in FUSED_ADAMW_DEVICES for p in params)
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, fused=fused)


def train(
    model: GPTClassifier,
    train_data: Examples,
    val_data: Examples,
    config: TrainConfig,
    *,
    resume_from: TrainState | None = None,
    on_epoch_end: Callable[[TrainState], None] | None = None,
    group: Group = SINGLE,
    class_weights: torch.Tensor | None = None,
) -> History:
    """Fine-tune `model` in place and leave it in eval mode with the best epoch's weights (LoRA merged).

    resume_from: the state after some epoch (from on_epoch_end of an earlier run with the same model, data and
    config); training continues with the next epoch and ends where that run would have, bit for bit on the
    same device and thread count. on_epoch_end: called after every epoch with the state after it (CPU copies).
    group: this process's share of a multi-process run (training.finetune.distributed); every rank calls train alike.
    class_weights: (n_labels,) each row's loss, training and validation, is weighed by its label's weight.

    Raises ValueError for empty data, a batch size below the number of processes, a precision the device cannot
    compute natively (precision.training_precision), or a resume_from whose parameters are not this model's
    trainable ones.
    """
    check_sizes(train_data, val_data, config, group)
    device = group.place(resolve_device(config.device))
    compute = precision.training_precision(config.precision, device)
    torch.manual_seed(config.seed)
    model.to(device)
    n_frozen = prepare_trainable(model, config)
    cached = config.cache_prefix and n_frozen > 0
    # Batches hold rows of similar length (little padding); their order is shuffled each epoch.
    batches = length_sorted_batches([len(r) for r in train_data.rows], config.batch_size)
    train_rows = sorted(i for batch in batches for i in group.share(batch))
    forwards = [
        tail_forward(
            model,
            data.rows,
            n_frozen,
            cached,
            device,
            f"prefix ({name})",
            only=rows,
            progress=group.is_main,
            compute=compute,
        )
        for name, data, rows in (
            ("train", train_data, train_rows),
            ("validation", val_data, validation_share(val_data, group)),
        )
    ]
    loop = Loop.start(model, config, device, group, class_weights)
    if resume_from is not None:
        loop.restore(resume_from)
    group.check_same(loop.epoch, "the epoch to resume after (is the saved state on a filesystem every rank shares?)")
    run_epochs(loop, group.wrap(forwards[0], device), forwards[1], batches, train_data, val_data, config, on_epoch_end)
    loop.keep_best()
    merge_lora(model)
    return loop.history


def check_sizes(train_data: Examples, val_data: Examples, config: TrainConfig, group: Group) -> None:
    """Raise ValueError for empty data, or a batch size that leaves some process without a share."""
    if not train_data.rows or not val_data.rows:
        raise ValueError(f"need training and validation examples, got {len(train_data.rows)} and {len(val_data.rows)}")
    if config.batch_size < group.world_size:
        raise ValueError(
            f"batch_size {config.batch_size!r} is below the {group.world_size} processes: each needs a share of "
            "every batch"
        )


def run_epochs(
    loop: Loop,
    forward: Callable[[list[int]], torch.Tensor],
    run_val: Callable[[list[int]], torch.Tensor],
    batches: list[list[int]],
    train_data: Examples,
    val_data: Examples,
    config: TrainConfig,
    on_epoch_end: Callable[[TrainState], None] | None,
) -> None:
    """The epochs after loop.epoch up to config.epochs: train on the batches in a fresh order, validate, record."""
    targets = torch.tensor(train_data.targets, device=loop.device)
    for epoch in range(loop.epoch + 1, config.epochs + 1):
        order = torch.randperm(len(batches), generator=loop.generator).tolist()
        train_loss, train_accuracy = loop.train_epoch(
            forward, [batches[i] for i in order], targets, f"epoch {epoch}/{config.epochs}"
        )
        val_loss, val_accuracy = evaluate_loss(
            loop.model, run_val, val_data, loop.device, loop.group, loop.class_weights
        )
        loop.end_epoch(EpochMetrics(epoch, train_loss, train_accuracy, val_loss, val_accuracy))
        if on_epoch_end is not None:
            on_epoch_end(loop.snapshot())
        if loop.group.is_main:
            print(
                f"epoch {epoch}: train loss {train_loss:.4f}, validation loss {val_loss:.4f}, "
                f"accuracy {val_accuracy:.4f}",
                flush=True,
            )


@torch.inference_mode()
def evaluate_loss(
    model: GPTClassifier,
    run: Callable[[list[int]], torch.Tensor],
    data: Examples,
    device: torch.device,
    group: Group = SINGLE,
    class_weights: torch.Tensor | None = None,
) -> tuple[float, float]:
    """Mean cross-entropy (each row's weighed by class_weights[label] when given) and accuracy over `data`; each
    rank computes its validation_share, summed over ranks."""
    model.eval()
    targets = torch.tensor(data.targets, device=device)
    mine = validation_share(data, group)
    sums = torch.zeros(2, dtype=torch.float64, device=device)  # loss, correct
    for batch in length_sorted_batches([len(data.rows[i]) for i in mine], PREFIX_BATCH_SIZE):
        rows = [mine[j] for j in batch]
        logits = run(rows)
        sums[0] += F.cross_entropy(logits, targets[rows], weight=class_weights, reduction="sum").double()
        sums[1] += (logits.argmax(dim=1) == targets[rows]).sum()
    loss_sum, correct = group.sum(sums).tolist()
    return loss_sum / len(data.rows), correct / len(data.rows)
