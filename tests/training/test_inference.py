import torch

from training.inference import Threshold, decide


def test_decide_by_argmax_or_threshold():
    probs = torch.tensor([[0.9, 0.1], [0.4, 0.6], [0.25, 0.75]])
    assert decide(probs, ["ham", "spam"], None) == ["ham", "spam", "spam"]
    assert decide(probs, ["ham", "spam"], Threshold("spam", 0.7)) == ["ham", "ham", "spam"]
    assert decide(probs, ["ham", "spam"], Threshold("ham", 0.3)) == ["ham", "ham", "spam"]
