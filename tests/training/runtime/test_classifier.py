"""The classifier every consumer loads: its load sequence, tokenizing, batch-independent probabilities and the
precisions it runs in."""

import pytest
import torch
from torch.testing import assert_close

from tests.helpers import pretend_cpu
from training.runtime.checkpoint import load_checkpoint
from training.runtime.classifier import Classifier
from training.runtime.inference import predict_probabilities
from training.runtime.options import ClassifierOptions

TEXTS = [
    "Free entry in 2 a wkly comp to win FA Cup final tkts",
    "ok",
    "see you at the station at 5? " * 9,
    "é😀 <|endoftext|>",
]


def load(checkpoint, **options) -> Classifier:
    return Classifier.load(checkpoint, ClassifierOptions(**{"device": "cpu", **options}))


def test_classifier_equals_training_predict_probabilities(tiny_checkpoint):
    classifier = load(tiny_checkpoint)
    rows, _ = classifier.tokenize(TEXTS)
    checkpoint = load_checkpoint(tiny_checkpoint)
    assert_close(classifier.predict(rows, max_batch_size=2), predict_probabilities(checkpoint.model, rows, 32))


def test_tokenize_truncates_to_the_checkpoints_max_tokens(tiny_checkpoint):
    classifier = load(tiny_checkpoint)
    rows, truncated = classifier.tokenize(TEXTS)
    assert truncated == [False, False, True, False]
    assert len(rows[2]) == classifier.card.max_tokens
    assert max(len(r) for r in rows[:2] + rows[3:]) < classifier.card.max_tokens


def test_a_row_scores_the_same_alone_and_in_a_padded_batch(tiny_checkpoint):
    classifier = load(tiny_checkpoint)
    rows, _ = classifier.tokenize(TEXTS)
    together = classifier.predict(rows)
    alone = torch.cat([classifier.predict([row]) for row in rows])
    assert_close(together, alone, rtol=0, atol=1e-5)
    assert_close(together.sum(dim=1), torch.ones(len(rows)))


def test_int8_quantization_stays_close_to_float32(tiny_checkpoint):
    float32 = load(tiny_checkpoint)
    int8 = load(tiny_checkpoint, quantize_int8=True)
    assert int8.quantization == "int8-dynamic" and float32.quantization is None
    assert not any(isinstance(m, torch.nn.Linear) for m in int8.checkpoint.model.modules())  # every Linear swapped
    assert int8.parameter_count == float32.parameter_count
    rows, _ = float32.tokenize(TEXTS)
    assert_close(int8.predict(rows), float32.predict(rows), rtol=0, atol=2e-2)


def test_bfloat16_on_a_cpu_with_native_bfloat16_runs_the_model_in_bfloat16(monkeypatch, tiny_checkpoint):
    pretend_cpu(monkeypatch, "avx512_bf16")  # the path runs on any CPU; only its speed needs the real feature
    bf16 = load(tiny_checkpoint, dtype="bfloat16")
    float32 = load(tiny_checkpoint)
    assert {p.dtype for p in bf16.checkpoint.model.parameters()} == {torch.bfloat16}
    rows, _ = float32.tokenize(TEXTS)
    probs = bf16.predict(rows)
    assert probs.dtype == torch.float32  # softmax in float32 whatever the model's dtype
    assert not torch.equal(probs, float32.predict(rows))  # computed in bfloat16, not float32
    assert_close(probs, float32.predict(rows), rtol=0, atol=2e-2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_on_cuda_stays_close_to_float32_on_cpu(tiny_checkpoint, dtype):
    cuda = load(tiny_checkpoint, device="cuda", dtype=dtype)
    cpu = load(tiny_checkpoint)
    assert (cuda.device.type, str(cuda.dtype)) == ("cuda", f"torch.{dtype}")
    rows, _ = cpu.tokenize(TEXTS)
    probs = cuda.predict(rows)
    assert probs.dtype == torch.float32  # softmax in float32 whatever the model's dtype
    assert_close(probs, cpu.predict(rows), rtol=0, atol=2e-2)
