"""The batching helpers on their own: length-sorted batches under a row and a padded-token limit, right padding."""

import random

import pytest
import torch

from training.runtime.inference import (
    NonFiniteLogits,
    Threshold,
    decide,
    length_sorted_batches,
    nonfinite_rows,
    pad_right,
    probabilities,
    require_finite,
)


@pytest.mark.parametrize(
    ("lengths", "max_batch", "max_batch_tokens", "expected"),
    [
        pytest.param([5, 1, 3, 1, 4, 2], 2, None, [[1, 3], [5, 2], [4, 0]], id="sorted-ties-in-input-order"),
        pytest.param([5, 1, 3, 1, 4, 2], 4, None, [[1, 3, 5, 2], [4, 0]], id="max-batch"),
        pytest.param([5, 1, 3, 1, 4, 2], 10, None, [[1, 3, 5, 2, 4, 0]], id="all-in-one"),
        # padded to the longest row: 3 x 2 = 6 fits; 4 x 3 = 12 does not, 2 x 3 = 6 does; 3 x 8 does not
        pytest.param([2, 2, 2, 3, 3, 8], 10, 6, [[0, 1, 2], [3, 4], [5]], id="token-budget"),
        pytest.param([2, 2, 2, 3, 3, 8], 2, 6, [[0, 1], [2, 3], [4], [5]], id="rows-and-tokens"),
        pytest.param([1, 100, 1], 4, 10, [[0, 2], [1]], id="over-budget-row-alone"),
        pytest.param([100], 4, 10, [[0]], id="single-row-over-budget"),
        pytest.param([], 4, 10, [], id="empty"),
    ],
)
def test_length_sorted_batches(lengths, max_batch, max_batch_tokens, expected):
    assert length_sorted_batches(lengths, max_batch, max_batch_tokens) == expected


@pytest.mark.parametrize("seed", range(5))
def test_length_sorted_batches_keeps_every_index_once_within_both_limits(seed):
    rng = random.Random(seed)
    lengths = [rng.randint(1, 40) for _ in range(rng.randint(1, 60))]
    batches = length_sorted_batches(lengths, max_batch=8, max_batch_tokens=64)
    order = [i for batch in batches for i in batch]
    assert sorted(order) == list(range(len(lengths)))
    assert [lengths[i] for i in order] == sorted(lengths)
    for batch in batches:
        assert 1 <= len(batch) <= 8
        assert len(batch) == 1 or len(batch) * max(lengths[i] for i in batch) <= 64


def test_pad_right_shapes_lengths_and_padding():
    idx, lengths = pad_right([[5, 6, 7], [8], [9, 10]], pad_id=50256)
    assert torch.equal(idx, torch.tensor([[5, 6, 7], [8, 50256, 50256], [9, 10, 50256]]))
    assert torch.equal(lengths, torch.tensor([3, 1, 2]))
    assert (idx.dtype, lengths.dtype) == (torch.long, torch.long)
    assert (idx.device.type, lengths.device.type) == ("cpu", "cpu")


def test_pad_right_of_equal_rows_adds_no_padding():
    idx, lengths = pad_right([[1, 2], [3, 4]], pad_id=0)
    assert torch.equal(idx, torch.tensor([[1, 2], [3, 4]]))
    assert torch.equal(lengths, torch.tensor([2, 2]))


def test_decide_by_argmax_or_threshold():
    probs = torch.tensor([[0.9, 0.1], [0.4, 0.6], [0.25, 0.75]])
    assert decide(probs, ["ham", "spam"], None) == ["ham", "spam", "spam"]
    assert decide(probs, ["ham", "spam"], Threshold("spam", 0.7)) == ["ham", "ham", "spam"]
    assert decide(probs, ["ham", "spam"], Threshold("ham", 0.3)) == ["ham", "ham", "spam"]


def test_non_finite_logits_give_a_nan_row_never_a_made_up_distribution():
    inf, nan = float("inf"), float("nan")
    logits = torch.tensor([[2.0, 0.0], [nan, 1.0], [inf, 3.0], [0.0, -inf], [-1.0, 1.0]], dtype=torch.float16)
    probs = probabilities(logits)
    assert probs.dtype == torch.float32
    assert torch.isnan(probs[1:4]).all()  # not [0.5, 0.5] for NaN (0 for NaN), nor [1, 0] for inf
    torch.testing.assert_close(probs[[0, 4]], torch.softmax(logits[[0, 4]].float(), dim=1))
    assert nonfinite_rows(probs) == [1, 2, 3]
    message = r"non-finite logits \(NaN or inf\) for 3 of the rows: 1, 2, 3;"
    with pytest.raises(NonFiniteLogits, match=message) as caught:
        require_finite(probs)
    assert caught.value.rows == [1, 2, 3]
    assert require_finite(probs[[0, 4]]) is not None
