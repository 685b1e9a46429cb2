"""Balancing options side by side on the real SMS data: undersample (the reference's), class-weighted, none.

    python -m benchmarks.balance                         # small GPT-2 (2 blocks, 128 wide), 1 epoch: about 30 min
    python -m benchmarks.balance --epochs 3 --options undersample
    python -m benchmarks.balance --size gpt2 --epochs 5  # the 124M architecture, the README's accuracy run (hours)

Results go to benchmarks/results/balance_<size>_<epochs>epochs.json, written after each option.

Every option trains from random weights (OpenAI's weights are not available here; with them, add
`--init pretrained` to COMMAND's options), all parameters trainable, seed 123, through the product's own CLI. The
evaluation rows (the balanced test split plus the held-out rows neither training nor threshold selection saw) are
the same for every option: report/split.json's "evaluation" ids are compared. For each option: the false-positive
rate (ham flagged as spam) and spam recall on the evaluation rows at argmax and at the stored threshold (the
default objective: the highest recall whose FPR on the selection rows is at most the default --target-fpr), with
95% Wilson intervals; calibration error before and after; the run's wall time (training and evaluation).
"""

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import BPE_DIR, ROOT, SMS_FILE, count, print_table, require_shared_data, write_result
from training.finetune.data import BALANCING, deduplicate, load_sms_spam, select_split
from training.finetune.evaluate import Predictions, Rate, choose_threshold, predict, split_metrics
from training.runtime.checkpoint import REPORT_DIR, SPLIT_FILE, load_checkpoint
from training.runtime.inference import Threshold, prior_shift, probabilities
from training.runtime.tokenizer import encode_batch

CHECKPOINTS = ROOT / "benchmarks" / "checkpoints"
# A GPT-2 small enough to train three times on a shared 2-core machine within the hour: GPT-2's tokenizer,
# embeddings and blocks, 2 blocks of width 128 (6.8M parameters, 6.4M of them the token embeddings).
SMALL = {"model_type": "gpt2", "n_layer": 2, "n_head": 2, "n_embd": 128, "n_positions": 1024, "vocab_size": 50257}
LR = {"small": "1e-3", "gpt2": "5e-5"}  # the small model learns from random weights in 3 epochs at 1e-3


def command(size: str, balance: str, epochs: int, out: Path, base_dir: Path) -> list[str]:
    """The finetune command line of one option."""
    model = ("--base", str(base_dir)) if size == "small" else ("--preset", "gpt2")
    return [
        *("python", "-m", "training", "finetune", "--data", str(SMS_FILE), "--tokenizer-dir", str(BPE_DIR)),
        *("--init", "random", *model, "--trainable", "all", "--seed", "123", "--lr", LR[size]),
        *("--epochs", str(epochs), "--balance", balance, "--out", str(out), "--no-save-state"),
    ]


def rates(per_class: dict) -> dict:
    """The spam class's FPR and recall (value, count, of, ci95) from a report's per-class metrics."""
    spam = per_class["spam"]["rates"]
    return {name: spam[name] for name in ("false_positive_rate", "recall", "precision")}


TARGETS = (0.0025, 0.005, 0.01, 0.02, 0.05)  # false-positive rates --target-fpr could ask for


def held_out_decisions(checkpoint: Path) -> dict:
    """What the checkpoint decides on its evaluation rows under each rule.

    "target_sweep": for each target FPR, the threshold --threshold-objective fpr would choose on the selection
    rows, and the FPR and spam recall it gives: what the default target trades. "previous_rule": the decisions of
    the rule before held-out selection and calibration, for the same model: argmax at the training prior (the
    calibration's prior shift taken back off; temperature moves no argmax) and the best-F1 threshold chosen on the
    balanced validation split (the same decisions on calibrated or uncalibrated scores: the fold is monotone).
    """
    loaded = load_checkpoint(checkpoint)
    source = deduplicate(load_sms_spam(SMS_FILE))
    scored = {}
    for role in ("validation", "selection", "evaluation"):
        ds = select_split(source, checkpoint / SPLIT_FILE, role)
        rows, _ = encode_batch(loaded.tokenizer, ds.texts, loaded.card.max_tokens)
        scored[role] = predict(loaded.model, rows, ds.labels, list(loaded.card.labels))
    labels = list(loaded.card.labels)
    spam, selection, evaluation, sweep = labels.index("spam"), scored["selection"], scored["evaluation"], []
    for target in TARGETS:
        value = choose_threshold(selection.probs[:, spam], selection.targets == spam, "fpr", target)
        metrics = split_metrics(evaluation, labels, Threshold("spam", value)).to_json()["threshold"]
        sweep.append({"target_fpr": target, "threshold": value} | rates(metrics["per_class"]))
    validation = scored["validation"]
    f1 = Threshold("spam", choose_threshold(validation.probs[:, spam], validation.targets == spam, "f1"))
    calibration = loaded.card.calibration
    shift = prior_shift(calibration.training_prior, calibration.prior, labels)
    at_training_prior = probabilities((evaluation.probs.double().clamp_min(1e-300).log() - shift).float())
    previous = {
        "argmax_at_training_prior": split_metrics(
            Predictions(at_training_prior, evaluation.targets), labels, None
        ).to_json()["argmax"],
        "f1_threshold_on_validation": split_metrics(evaluation, labels, f1).to_json()["threshold"],
    }
    return {
        "target_sweep": sweep,
        "previous_rule": {rule: rates(metrics["per_class"]) for rule, metrics in previous.items()},
    }


def option_result(checkpoint: Path, argv: list[str], wall_seconds: float) -> dict:
    card = load_checkpoint(checkpoint).card
    report = json.loads((checkpoint / REPORT_DIR / "metrics.json").read_text())
    return {
        "command": shlex.join(argv),
        "checkpoint": str(checkpoint),
        "wall_seconds": wall_seconds,
        "split": card.data.split,
        "threshold": report["threshold"],
        "threshold_rule": report["threshold_rule"],
        "calibration": report["calibration"] | {"temperature": card.calibration.temperature},
        "prior": card.calibration.prior,
        "training_prior": card.calibration.training_prior,
        "best_epoch": report["history"]["best_epoch"],
        "evaluation": {decision: rates(m["per_class"]) for decision, m in report["evaluation"].items()},
        "test": {decision: rates(m["per_class"]) for decision, m in report["test"].items()},
        "evaluation_roc_auc": report["evaluation"]["argmax"]["roc_auc"],
    } | held_out_decisions(checkpoint)


def row(option: str, result: dict) -> dict:
    ev = result["evaluation"]
    return {
        "balance": option,
        "FPR argmax": Rate(**ev["argmax"]["false_positive_rate"]).describe(),
        "FPR threshold": Rate(**ev["threshold"]["false_positive_rate"]).describe(),
        "recall threshold": Rate(**ev["threshold"]["recall"]).describe(),
        "ECE before/after": f"{result['calibration']['ece_before']:.4f}/{result['calibration']['ece_after']:.4f}",
        "minutes": f"{result['wall_seconds'] / 60:.1f}",
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.balance", description=__doc__.split("\n")[0])
    parser.add_argument("--size", choices=("small", "gpt2"), default="small")
    parser.add_argument("--epochs", type=count, default=1)
    parser.add_argument("--options", nargs="+", choices=BALANCING, default=list(BALANCING))
    args = parser.parse_args(argv)
    require_shared_data()
    results = {}
    base_dir = CHECKPOINTS / "balance-small-base"  # the small model's config.json, for --base
    base_dir.mkdir(parents=True, exist_ok=True)
    (base_dir / "config.json").write_text(json.dumps(SMALL) + "\n")
    name = f"balance_{args.size}_{args.epochs}epochs"
    for option in args.options:
        out = CHECKPOINTS / f"balance-{args.size}-{args.epochs}epochs-{option}"
        argv_ = command(args.size, option, args.epochs, out, base_dir)
        start = time.perf_counter()
        subprocess.run([sys.executable, *argv_[1:]], check=True, cwd=ROOT)
        results[option] = option_result(out, argv_, time.perf_counter() - start)
        path = write_result(name, summarise(args, results))  # after each option: a long run keeps what it has
    print_table(summarise(args, results)["table"])
    print(f"same evaluation rows for every option: {summarise(args, results)['same_evaluation_rows']}")
    print(f"written to {path}")


def summarise(args: argparse.Namespace, results: dict) -> dict:
    """The JSON of the options run so far, with their table and whether their evaluation rows are the same."""
    evaluation_ids = {
        json.dumps(sorted(json.loads((Path(r["checkpoint"]) / SPLIT_FILE).read_text())["evaluation"]))
        for r in results.values()
    }
    return {
        "model": "small GPT-2 (small_config), random init" if args.size == "small" else "gpt2 124M, random init",
        "small_config": SMALL if args.size == "small" else None,
        "epochs": args.epochs,
        "same_evaluation_rows": len(evaluation_ids) == 1,
        "options": results,
        "table": [row(option, result) for option, result in results.items()],
    }


if __name__ == "__main__":
    main()
