"""Training over several processes with DistributedDataParallel, started by torchrun (gloo on CPU, NCCL on CUDA).

    torchrun --nproc-per-node 2 -m training finetune ...

Every process builds the same model and the same global batches in the same order (same seed); each takes its
share of every global batch (`Group.share`), so a run over N processes follows the single-process run: each rank's
loss is the sum of its rows' losses divided by the rows of the global batch, and the gradients are summed across
ranks (not averaged), which gives the global batch's mean-loss gradient whatever the shares' sizes.
One process is `Group()` (SINGLE): every method is then a no-op and nothing here touches torch.distributed.

Sources: PyTorch's "Getting Started with Distributed Data Parallel" and "DDP Communication Hooks" (the hook below
is default_hooks.allreduce_hook without its division by world_size); torchrun's environment variables.
"""

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from training.runtime.device import resolve_device

T = TypeVar("T")


@dataclass(frozen=True)
class Group:
    """This process's place among the training processes: rank in 0..world_size-1, local_rank on its machine."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Whether this process reports progress, evaluates and writes files (rank 0)."""
        return self.rank == 0

    def share(self, items: list[T]) -> list[T]:
        """This rank's share of `items`: every world_size-th item from its rank. Over length-sorted rows that
        gives every rank rows of similar lengths; shares differ in size by one at most and may be empty."""
        return items[self.rank :: self.world_size]

    def place(self, device: torch.device) -> torch.device:
        """The device this rank trains on: a CUDA device without an index becomes cuda:local_rank."""
        if self.world_size > 1 and device.type == "cuda" and device.index is None:
            return torch.device("cuda", self.local_rank)
        return device

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        """The element-wise sum of `values` (any shape, on the training device) over all ranks."""
        if self.world_size > 1:
            values = values.clone()
            dist.all_reduce(values, op=dist.ReduceOp.SUM)
        return values

    def check_same(self, value: int, what: str) -> None:
        """Raise ValueError unless every rank passes the same integer `value` (e.g. the epoch it resumes after)."""
        if self.world_size == 1:
            return
        bounds = torch.tensor([-value, value], dtype=torch.long, device=self._comm_device())
        dist.all_reduce(bounds, op=dist.ReduceOp.MAX)  # (-min, max)
        low, high = -bounds[0].item(), bounds[1].item()
        if low != high:
            raise ValueError(f"the processes disagree on {what}: from {low} to {high}")

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def wrap(self, module: nn.Module, device: torch.device) -> nn.Module:
        """`module` under DistributedDataParallel with gradients summed over ranks (see the module docstring);
        with one process, `module` itself."""
        if self.world_size == 1:
            return module
        wrapped = DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)
        wrapped.register_comm_hook(state=None, hook=_allreduce_sum)
        return wrapped

    def _comm_device(self) -> torch.device:
        return torch.device("cuda", self.local_rank) if dist.get_backend() == "nccl" else torch.device("cpu")


SINGLE = Group()


def _allreduce_sum(process_group, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP communication hook: sum a bucket of gradients over ranks (DDP's default divides by world_size)."""
    work = dist.all_reduce(bucket.buffer(), group=process_group, async_op=True)
    return work.get_future().then(lambda fut: fut.value()[0])


@contextmanager
def process_group(device: str) -> Iterator[Group]:
    """This process's Group, from the variables torchrun sets (WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR,
    MASTER_PORT): the process group is joined on entry (NCCL when `device` resolves to CUDA, else gloo) and left
    on exit. Without WORLD_SIZE, or with WORLD_SIZE=1, SINGLE and nothing to join.

    Raises ValueError for an MPS device, which torch.distributed does not support, or a CUDA device with an index
    (every process would take the same GPU).
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        yield SINGLE
        return
    resolved = resolve_device(device)
    if resolved.type not in ("cpu", "cuda"):
        raise ValueError(f"distributed training runs on cpu or cuda, not {resolved.type!r}")
    if resolved.index is not None:
        raise ValueError(
            f"--device {device!r} under torchrun: use cuda (or auto); each process takes its local rank's GPU"
        )
    group = Group(int(os.environ["RANK"]), world_size, int(os.environ.get("LOCAL_RANK", "0")))
    if resolved.type == "cuda":
        torch.cuda.set_device(group.place(resolved))
    joined = not dist.is_initialized()  # a caller that joined already keeps its group
    if joined:
        dist.init_process_group("nccl" if resolved.type == "cuda" else "gloo")
    try:
        yield group
    finally:
        if joined:
            dist.destroy_process_group()
