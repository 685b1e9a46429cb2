"""Test accuracy of a 124M GPT-2 fine-tuned on the real SMS data by the product's own CLI, beside the reference's.

    python -m benchmarks.train_accuracy                       # runs the CLI (about 30 min on 2 CPU cores), then reports
    python -m benchmarks.train_accuracy --from-checkpoint --wall-seconds S   # reports on a run already made

Random initialisation, all parameters trainable: OpenAI's GPT-2 weights are not available here, so the comparable
reference row is its random-init one. The checkpoint stays in benchmarks/checkpoints/ (git-ignored) for the serving
benchmarks.
"""

import argparse
import json
import shlex
import subprocess
import sys
import time

from benchmarks.common import BPE_DIR, ROOT, SMS_FILE, duration, require_shared_data, write_result
from training.runtime.checkpoint import REPORT_DIR, load_checkpoint

CHECKPOINT = ROOT / "benchmarks" / "checkpoints" / "random-init-all"
COMMAND = [
    *("python", "-m", "training", "finetune"),
    *("--data", str(SMS_FILE), "--tokenizer-dir", str(BPE_DIR)),
    *("--init", "random", "--preset", "gpt2", "--trainable", "all"),
    *("--out", str(CHECKPOINT), "--seed", "123"),
]
# "Build a Large Language Model (From Scratch)", chapter 6, GPT-2 small (124M), 5 epochs, balanced SMS data.
REFERENCE = {
    "pretrained_last_block_test_accuracy": 0.9567,  # the chapter's main notebook
    "random_init_all_layers_test_accuracy": 0.9367,  # ch06/02_bonus_additional-experiments, row 8
    "random_init_all_layers_training_minutes": 0.69,  # the same row, on an A100 GPU
    "test_examples": 300,  # its split keeps duplicate messages; ours removes them first
}


def accuracy_result(checkpoint_dir, wall_seconds: float, wall_source: str) -> dict:
    """The headline numbers of an exported checkpoint's config.json and report/metrics.json."""
    card = load_checkpoint(checkpoint_dir).card.to_json()
    report = json.loads((checkpoint_dir / REPORT_DIR / "metrics.json").read_text())
    test = report["test"]
    return {
        "model": "gpt2 124M, random init, no pretrained weights available here; all parameters trainable",
        "command": shlex.join(COMMAND),
        "checkpoint": str(checkpoint_dir),
        "wall_seconds": wall_seconds,
        "wall_seconds_source": wall_source,
        "data": card["data"],
        "training": card["training"],
        "best_epoch": report["history"]["best_epoch"],
        "history": report["history"]["epochs"],
        "threshold": report["threshold"],
        "selection_accuracy": report["selection"]["argmax"]["accuracy"],
        "test": {decision: _headline(metrics) for decision, metrics in test.items()},
        "reference": REFERENCE,
        "difference_vs_reference_random_init": test["argmax"]["accuracy"]
        - REFERENCE["random_init_all_layers_test_accuracy"],
    }


def _headline(metrics: dict) -> dict:
    return {
        "n": metrics["n"],
        "accuracy": metrics["accuracy"],
        "f1": {label: c["f1"] for label, c in metrics["per_class"].items()},
        "precision": {label: c["precision"] for label, c in metrics["per_class"].items()},
        "recall": {label: c["recall"] for label, c in metrics["per_class"].items()},
        "macro_f1": metrics["macro_f1"],
        "roc_auc": metrics["roc_auc"],
        "confusion_matrix": metrics["confusion_matrix"],
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.train_accuracy", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--from-checkpoint", action="store_true", help=f"report on {CHECKPOINT} as it is instead of training it"
    )
    parser.add_argument("--wall-seconds", type=duration, help="with --from-checkpoint: how long that run took")
    parser.add_argument(
        "--wall-source",
        default="given with --wall-seconds, measured outside this script",
        help="with --from-checkpoint: how --wall-seconds was measured, and on how busy a machine",
    )
    args = parser.parse_args(argv)
    require_shared_data()
    if args.from_checkpoint:
        if args.wall_seconds is None:
            parser.error("--from-checkpoint needs --wall-seconds, measured around the same command")
        wall, source = args.wall_seconds, args.wall_source
    else:
        start = time.perf_counter()
        subprocess.run([sys.executable, *COMMAND[1:]], cwd=ROOT, check=True)
        wall, source = time.perf_counter() - start, "measured by this script around the command"
    if not (CHECKPOINT / REPORT_DIR / "metrics.json").is_file():
        sys.exit(f"no report at {CHECKPOINT / REPORT_DIR / 'metrics.json'}: run the fine-tuning first")
    result = accuracy_result(CHECKPOINT, wall, source)
    path = write_result("train_accuracy", result)
    test = result["test"]["argmax"]
    f1 = ", ".join(f"{label} {value:.4f}" for label, value in test["f1"].items())
    print(
        f"test accuracy {test['accuracy']:.4f} (reference, random init: "
        f"{REFERENCE['random_init_all_layers_test_accuracy']:.4f}), F1 {f1}, ROC-AUC {test['roc_auc']:.4f}, "
        f"wall {wall / 60:.1f} min; written to {path}"
    )


if __name__ == "__main__":
    main()
