"""The calibration fit training runs on the validation rows: the temperature that the head is divided by
(training.runtime.inference.Calibration says how a checkpoint serves it; fold_calibration writes it into the head).
"""

import math

import torch

# The fitted temperature lies in [1/20, 20]. Below 1/20 the head's margins would be multiplied by more than 20, so a
# margin of 1 (73%) would serve as 20, a probability float32 rounds to exactly 1.0: that is not calibrating a trained
# head but extrapolating from validation rows that happen to be separable. Above 20 a margin of 10 (99.995%) would
# serve as 0.5 (62%): a head that overconfident should be retrained, not flattened into near-uniform answers. The
# bounds are symmetric in log T, so the fit starts at T = 1 in the middle.
TEMPERATURE_BOUNDS = (1 / 20, 20.0)


def fit_temperature(logits: torch.Tensor, targets: torch.Tensor, class_weights: torch.Tensor | None = None) -> float:
    """The temperature T in TEMPERATURE_BOUNDS minimising the (class-weighted) mean cross-entropy of
    softmax(logits / T) against Platt's targets (Guo et al. 2017's temperature scaling with Platt 1999's targets):
    (N, n_labels) logits of validation rows, (N,) label indices.

    Platt's targets: a row of a label with n validation rows aims at probability (n + 1) / (n + 2) for its label
    (Laplace's rule of succession), the rest shared by the other labels. With hard 0 / 1 targets, separable validation
    rows make the likelihood grow without end as T falls to 0, and every served probability becomes exactly 0 or 1;
    with these, n rows can claim no more certainty than n rows show, and the minimum is finite.

    class_weights (n_labels,): each row's loss weighs class_weights[target], so that validation rows in other
    proportions than training's are fitted at the training prior. Fitted by L-BFGS in float64 over an unbounded u
    with log T = log low + (log high - log low) * sigmoid(u), so T stays within the bounds; returns 1.0 when the loss
    cannot be lowered (e.g. every logit zero).
    """
    logits, targets = logits.double(), targets.long()
    n_labels = logits.shape[1]
    smoothing = 1 / (torch.bincount(targets, minlength=n_labels).double()[targets] + 2)  # (N,): 1 / (n + 2)
    soft = (smoothing / (n_labels - 1))[:, None].expand_as(logits).clone()
    soft[torch.arange(len(targets)), targets] = 1 - smoothing
    weight = torch.ones(len(targets), dtype=torch.float64) if class_weights is None else class_weights.double()[targets]
    low, high = (math.log(bound) for bound in TEMPERATURE_BOUNDS)
    u = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([u], lr=0.5, max_iter=100, line_search_fn="strong_wolfe")

    def temperature() -> torch.Tensor:
        return (low + (high - low) * torch.sigmoid(u)).exp()

    def loss() -> torch.Tensor:
        optimizer.zero_grad()
        cross_entropy = -(soft * torch.log_softmax(logits / temperature(), dim=1)).sum(dim=1)
        value = (weight * cross_entropy).sum() / weight.sum()
        value.backward()
        return value

    with torch.enable_grad():
        optimizer.step(loss)
    fitted = float(temperature().detach())
    return fitted if math.isfinite(fitted) else 1.0
