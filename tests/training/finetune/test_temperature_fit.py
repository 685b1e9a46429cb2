"""The temperature fit training runs on the validation rows."""

import pytest
import torch

from training.finetune.calibration import TEMPERATURE_BOUNDS, fit_temperature


@pytest.mark.parametrize("true_temperature", [0.5, 2.0, 4.0])
def test_fit_temperature_recovers_the_temperature_of_the_data(true_temperature):
    """Labels drawn from softmax(z / T): the NLL's minimum lies at T (within sampling error)."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(20_000, 2, generator=g) * 4
    targets = torch.multinomial(torch.softmax(logits / true_temperature, 1), 1, generator=g).squeeze(1)
    assert fit_temperature(logits, targets) == pytest.approx(true_temperature, rel=0.05)


def test_fit_temperature_weighs_the_classes():
    """Validation rows at 9:1 weighed back to 1:1 fit as the 1:1 rows they stand for."""
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(20_000, 2, generator=g) * 3
    targets = torch.multinomial(torch.softmax(logits / 2.0, 1), 1, generator=g).squeeze(1)
    ham, spam = (targets == 0).nonzero().flatten(), (targets == 1).nonzero().flatten()
    keep = torch.cat([ham, spam[: len(ham) // 9]])  # spam made rare
    weights = torch.tensor([1.0, len(ham) / (len(ham) // 9)])
    assert fit_temperature(logits[keep], targets[keep], weights) == pytest.approx(2.0, rel=0.1)


def test_separable_rows_do_not_collapse_the_temperature():
    """12 rows of each label, every one on its side: hard targets drove T towards 0 (served probabilities exactly 0
    or 1); with Platt's targets the minimum lies where the confidence, averaged with the rows' margins as weights,
    is what 12 rows can show: (12 + 1) / (12 + 2)."""
    g = torch.Generator().manual_seed(0)
    targets = torch.arange(24) % 2
    margins = (torch.rand(24, generator=g) * 4 + 1) * (2 * targets - 1)
    logits = torch.stack([-margins / 2, margins / 2], 1)
    temperature = fit_temperature(logits, targets)
    confidence = torch.softmax(logits / temperature, 1).gather(1, targets[:, None])
    weighted = (margins.abs() * confidence.squeeze(1)).sum() / margins.abs().sum()
    assert weighted.item() == pytest.approx(13 / 14, abs=1e-4)
    served = torch.softmax(logits.float() / temperature, 1)
    assert ((served > 0) & (served < 1)).all()


@pytest.mark.parametrize(
    ("margin", "bound"),
    [
        pytest.param(1e-3, TEMPERATURE_BOUNDS[0], id="tiny-margins-floor"),
        pytest.param(-5.0, TEMPERATURE_BOUNDS[1], id="every-row-wrong-ceiling"),
    ],
)
def test_the_temperature_stays_within_its_bounds(margin, bound):
    targets = torch.arange(40) % 2
    logits = torch.stack([torch.zeros(40), margin * (2 * targets - 1)], 1)
    assert fit_temperature(logits, targets) == pytest.approx(bound, rel=1e-4)
