"""How far a row's probabilities move with the shapes it is computed in (the README's batch-independence bound).

    python -m benchmarks.batch_independence                      # tiny preset, 400 SMS texts: about a minute
    python -m benchmarks.batch_independence --preset gpt2 --texts 300   # the 124M architecture: about 6 minutes

Results go to benchmarks/results/batch_independence_<preset>.json.

Random weights (the head scaled so that logits are of unit size and P(spam) spreads over 0..1), the real SMS texts
and GPT-2's tokenizer, float32 on the CPU through training.runtime.classifier.Classifier, as `predict` scores. The
baseline is each text alone: a batch of one, no padding. Against it: the texts as `predict` scores one chunk (default
batch limits), in two chunks cut at three places (a resume whose chunk boundary fell elsewhere), and in batches of 8.
Reported: how many rows differ from the baseline at all, the largest |difference| of P(spam) over every pair of
shapes, and the time of scoring alone against batched (what bitwise independence by scoring alone would cost).
"""

import argparse
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import BPE_DIR, SMS_FILE, count, print_table, require_shared_data, write_result
from training.finetune.data import load_sms_spam
from training.runtime.checkpoint import ModelCard, save_checkpoint
from training.runtime.classifier import Classifier, Prediction
from training.runtime.model import GPTClassifier, GPTConfig
from training.runtime.options import ClassifierOptions


def random_checkpoint(directory: Path, preset: str) -> Path:
    """A randomly initialised classifier of `preset` with GPT-2's vocabulary, truncating at 256 tokens at most."""
    torch.manual_seed(0)
    config = GPTConfig.from_preset(preset, vocab_size=50257)
    model = GPTClassifier(config)
    with torch.no_grad():
        model.score.weight.normal_(0.0, config.n_embd**-0.5)
    card = ModelCard(("ham", "spam"), min(config.block_size, 256), None, f"random init ({preset})")
    return save_checkpoint(directory, model, BPE_DIR, card)


def p_spam(predictions: list[Prediction]) -> torch.Tensor:
    return torch.tensor([p.probabilities["spam"] for p in predictions], dtype=torch.float64)


def measure(preset: str, n: int) -> dict:
    texts = load_sms_spam(SMS_FILE).texts[:n]
    with tempfile.TemporaryDirectory() as tmp:
        classifier = Classifier.load(random_checkpoint(Path(tmp) / "ckpt", preset), ClassifierOptions(device="cpu"))
        start = time.perf_counter()
        alone = p_spam([classifier.classify([text])[0] for text in texts])
        alone_s, start = time.perf_counter() - start, time.perf_counter()
        shapes = {"one chunk, default batches": p_spam(classifier.classify(texts))}
        batched_s = time.perf_counter() - start
        for cut in (n // 7, n // 3, n // 2):
            shapes[f"two chunks, cut at row {cut}"] = p_spam(
                classifier.classify(texts[:cut]) + classifier.classify(texts[cut:])
            )
        classifier.options = ClassifierOptions(device="cpu", batch_size=8)
        shapes["batches of 8"] = p_spam(classifier.classify(texts))
    every = [alone, *shapes.values()]
    return {
        "preset": preset,
        "texts": n,
        "shapes": [
            {
                "shape": name,
                "rows_differing_from_alone": int((p != alone).sum()),
                "max_abs_diff": (p - alone).abs().max().item(),
            }
            for name, p in shapes.items()
        ],
        "max_abs_diff_any_two_shapes": max((a - b).abs().max().item() for a in every for b in every),
        "p_spam_range": [alone.min().item(), alone.max().item()],
        "alone_seconds": round(alone_s, 2),
        "batched_seconds": round(batched_s, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="tiny", help="training.runtime.model preset")
    parser.add_argument("--texts", type=count, default=400, help="the first N texts of the SMS Spam Collection")
    args = parser.parse_args()
    require_shared_data()
    result = measure(args.preset, args.texts)
    print_table(result["shapes"])
    print(f"max over any two shapes: {result['max_abs_diff_any_two_shapes']:.3g}; alone {result['alone_seconds']} s, "
          f"batched {result['batched_seconds']} s")  # fmt: skip
    print(write_result(f"batch_independence_{args.preset}", result))


if __name__ == "__main__":
    main()
