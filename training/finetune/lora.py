"""Low-rank adapters (LoRA) on the transformer's linear layers, merged back into plain weights for export.

While training, each nn.Linear of the blocks computes W x + (alpha / rank) B A x with W frozen. Merging adds
(alpha / rank) B A into W and puts the plain nn.Linear back, so the exported state dict is exactly
GPTClassifier's and serving never knows LoRA was used.
"""

import math

import torch
from torch import nn

from training.runtime.model import GPTClassifier


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.scale = alpha / rank
        # B starts at zero so training starts from the base model exactly (the LoRA paper's init).
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=base.weight.device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=base.weight.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The side path never forms the (out, in) update, so its gradient costs only rank-sized matmuls.
        return self.base(x) + (x @ self.lora_A.T @ self.lora_B.T) * self.scale

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        self.base.weight += (self.lora_B @ self.lora_A) * self.scale
        return self.base


def add_lora(model: GPTClassifier, rank: int, alpha: float) -> None:
    """Wrap every nn.Linear inside the transformer blocks (attention and MLP) in a LoRALinear, in place."""
    for block in model.transformer.h:
        for parent in list(block.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear):
                    setattr(parent, name, LoRALinear(child, rank, alpha))


def merge_lora(model: GPTClassifier) -> None:
    """Fold every LoRALinear into its base weight and put the plain nn.Linear back, in place."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, LoRALinear):
                setattr(parent, name, child.merged())
