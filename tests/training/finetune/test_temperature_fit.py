"""The temperature fit training runs on the validation rows."""

import pytest
import torch

from training.finetune.calibration import fit_temperature


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
