"""The calibration fit training runs on the validation rows: the temperature that the head is divided by
(training.runtime.inference.Calibration says how a checkpoint serves it; fold_calibration writes it into the head).
"""

import math

import torch
import torch.nn.functional as F


def fit_temperature(logits: torch.Tensor, targets: torch.Tensor, class_weights: torch.Tensor | None = None) -> float:
    """The temperature T > 0 minimising the (class-weighted) mean negative log-likelihood of softmax(logits / T)
    against `targets` (Guo et al. 2017): (N, n_labels) logits of validation rows, (N,) label indices.

    class_weights (n_labels,): each row's NLL weighs class_weights[target], so that validation rows in other
    proportions than training's are fitted at the training prior. Fitted over log T (so T stays positive) by
    L-BFGS in float64; returns 1.0 when the NLL cannot be lowered (e.g. every logit zero).
    """
    logits, targets = logits.double(), targets.long()
    weight = None if class_weights is None else class_weights.double()
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.5, max_iter=100, line_search_fn="strong_wolfe")

    def nll() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(logits / log_t.exp(), targets, weight=weight)
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(nll)
    temperature = float(log_t.detach().exp())
    return temperature if math.isfinite(temperature) else 1.0
