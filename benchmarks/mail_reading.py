"""What a mail classifier should read, measured on the SpamAssassin public corpus: which header fields go into the
text (training.runtime.mail.Extraction.headers), and how a message longer than max_tokens is read (the window rules,
training.runtime.mail.WINDOW_RULES), with what each costs in time.

    python -m benchmarks.mail_reading                    # tiny preset, 3 header choices, 5 epochs: ~30 min
    python -m benchmarks.mail_reading --epochs 8 --choices subject subject+from

Results go to benchmarks/results/mail_reading.json.

One fixed split for every choice: the messages (../shared/data/spamassassin-public-corpus/{ham,spam}, 2,750 ham of
which 250 hard ham, 500 spam) are read under every header choice, and a message is kept only when its text shows
something under each and is no near duplicate (training.runtime.text.near_duplicate_key) of a kept one under any;
finetune's own deduplication then drops nothing, so its seeded partition puts the same messages in the same roles
for every choice (the run checks it). Each choice trains the tiny preset from random weights, every block
trainable, through the product's CLI (one CSV per choice, seed 123, the default balancing: undersampled, the rows
left out held out for threshold selection and evaluation; batch 16, learning rate 2e-3).
Then the checkpoint scores its validation rows and its evaluation rows (the test split plus held-out rows) with
each window rule, through training.runtime.classifier.Classifier's message calls, as serving does: accuracy, spam
recall and false-positive rate on ham and on hard ham at the checkpoint's threshold (chosen on its selection rows
from first-window scores), with 95% Wilson intervals; ROC-AUC, which no threshold moves; and the seconds each
rule's scoring took (the rules interleaved, each timed over the same messages).
"""

import argparse
import csv
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from benchmarks.common import BPE_DIR, ROOT, SHARED_DATA, count, print_table, write_result
from training.finetune.data import Dataset, select_split
from training.finetune.evaluate import roc_auc, wilson_interval
from training.runtime.checkpoint import SPLIT_FILE
from training.runtime.classifier import Classifier
from training.runtime.inference import require_finite
from training.runtime.mail import DEFAULT_EXTRACTION, WINDOW_RULES, Extraction, read_message
from training.runtime.options import ClassifierOptions
from training.runtime.text import has_visible_characters, near_duplicate_key

CORPUS = SHARED_DATA / "spamassassin-public-corpus"
WORK = ROOT / "benchmarks" / "checkpoints" / "mail_reading"
CHOICES = {"none": (), "subject": ("Subject",), "subject+from": ("Subject", "From")}
SEED = "123"


def corpus() -> list[tuple[str, str, bytes]]:
    """(path relative to the corpus, label, raw bytes) of every message, ham then spam, sorted by name."""
    messages = []
    for label in ("ham", "spam"):
        for path in sorted((CORPUS / label).iterdir()):
            messages.append((f"{label}/{path.name}", label, path.read_bytes()))
    return messages


def texts_by_choice(messages, choices: list[str]) -> tuple[dict[str, list[str]], list[int], dict]:
    """Each choice's texts of the kept messages, the kept messages' indices, and what was dropped and why."""
    read = {c: [read_message(raw, Extraction(headers=CHOICES[c])).text for _, _, raw in messages] for c in choices}
    seen = {c: set() for c in choices}
    kept, unreadable, duplicates = [], 0, 0
    for i in range(len(messages)):
        if not all(has_visible_characters(read[c][i]) for c in choices):
            unreadable += 1
            continue
        keys = {c: near_duplicate_key(read[c][i]) for c in choices}
        if any(keys[c] in seen[c] for c in choices):
            duplicates += 1
            continue
        for c in choices:
            seen[c].add(keys[c])
        kept.append(i)
    return {c: [read[c][i] for i in kept] for c in choices}, kept, {"unreadable": unreadable, "duplicates": duplicates}


def train(choice: str, texts: list[str], labels: list[str], epochs: int) -> tuple[Path, float]:
    """A tiny model trained from random weights on one choice's texts through the CLI; its directory and seconds."""
    data = WORK / f"{choice}.csv"
    data.parent.mkdir(parents=True, exist_ok=True)
    with data.open("w", newline="", encoding="utf-8") as file:
        writer = csv.writer(file)
        writer.writerow(["text", "label"])
        writer.writerows(zip(texts, labels, strict=True))
    out = WORK / choice
    command = [
        *(sys.executable, "-m", "training", "finetune", "--data", str(data), "--tokenizer-dir", str(BPE_DIR)),
        *("--preset", "tiny", "--init", "random", "--trainable", "all", "--lr", "2e-3", "--seed", SEED),
        *("--epochs", str(epochs), "--batch-size", "16", "--out", str(out), "--no-save-state"),
        "--overwrite",
    ]
    started = time.perf_counter()
    subprocess.run(command, check=True, cwd=ROOT)
    return out, time.perf_counter() - started


def rates(decided_spam: list[bool], labels: list[str], hard: list[bool], spam_scores: list[float]) -> dict:
    """Accuracy, spam recall, FPR on ham and on hard ham (value, count, of, 95% Wilson interval) and ROC-AUC."""

    def rate(hits: int, n: int) -> dict:
        return {"value": hits / n if n else None, "count": hits, "of": n, "ci95": wilson_interval(hits, n)}

    is_spam = [label == "spam" for label in labels]
    right = sum(d == s for d, s in zip(decided_spam, is_spam, strict=True))
    spam = [d for d, s in zip(decided_spam, is_spam, strict=True) if s]
    ham = [d for d, s in zip(decided_spam, is_spam, strict=True) if not s]
    hard_ham = [d for d, s, h in zip(decided_spam, is_spam, hard, strict=True) if h and not s]
    return {
        "accuracy": rate(right, len(labels)),
        "spam_recall": rate(sum(spam), len(spam)),
        "fpr_ham": rate(sum(ham), len(ham)),
        "fpr_hard_ham": rate(sum(hard_ham), len(hard_ham)),
        "roc_auc": roc_auc(torch.tensor(spam_scores), torch.tensor(is_spam)),
    }


def score(checkpoint: Path, raws: list[bytes], labels: list[str], hard: list[bool], extraction: Extraction) -> dict:
    """Each window rule's rates on these messages and its scoring seconds (reading, tokenizing, forward)."""
    results, seconds = {}, dict.fromkeys(WINDOW_RULES, 0.0)
    classifiers = {
        rule: Classifier.load(checkpoint, ClassifierOptions(device="cpu", mail_windows=rule)) for rule in WINDOW_RULES
    }
    for classifier in classifiers.values():  # trained from a CSV, its card records no extraction: the choice's
        classifier.extraction = extraction
    scores = {rule: [] for rule in WINDOW_RULES}
    decided = {rule: [] for rule in WINDOW_RULES}
    chunk = 64
    for start in range(0, len(raws), chunk):  # the rules interleaved, chunk by chunk, so load hits them alike
        for rule, classifier in classifiers.items():
            began = time.perf_counter()
            messages = classifier.read_messages(raws[start : start + chunk])
            rows = [row for m in messages for row in m.rows]
            logits = require_finite(classifier.predict_logits(rows, 32, 16384))
            predictions = classifier.message_predictions(messages, logits)
            seconds[rule] += time.perf_counter() - began
            scores[rule] += [p.probabilities["spam"] for p in predictions]
            decided[rule] += [p.label == "spam" for p in predictions]
    for rule in WINDOW_RULES:
        results[rule] = {**rates(decided[rule], labels, hard, scores[rule]), "seconds": seconds[rule]}
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--choices", nargs="+", default=list(CHOICES), choices=list(CHOICES))
    parser.add_argument("--epochs", type=count, default=5)
    args = parser.parse_args()
    if not CORPUS.is_dir() or not (BPE_DIR / "vocab.bpe").is_file():
        sys.exit(f"needs the SpamAssassin corpus and GPT-2 BPE files under {SHARED_DATA} (SPAMGPT_SHARED_DATA)")
    messages = corpus()
    began = time.perf_counter()
    texts, kept, dropped = texts_by_choice(messages, args.choices)
    read_seconds = (time.perf_counter() - began) / (len(messages) * len(args.choices))
    labels = [messages[i][1] for i in kept]
    print(f"{len(messages)} messages, {len(kept)} kept ({dropped}); reading: {1000 * read_seconds:.2f} ms a message")
    result = {
        "corpus": str(CORPUS),
        "messages": len(messages),
        "kept": len(kept),
        "dropped": dropped,
        "read_ms_per_message": 1000 * read_seconds,
        "epochs": args.epochs,
        "choices": {},
    }
    by_text_path = {}
    splits = {}
    rows = []
    for choice in args.choices:
        checkpoint, train_seconds = train(choice, texts[choice], labels, args.epochs)
        index = {text: k for k, text in enumerate(texts[choice])}
        source = Dataset(texts[choice], labels)
        entry = {"headers": list(CHOICES[choice]), "train_seconds": train_seconds}
        for role in ("validation", "evaluation"):
            selected = [index[t] for t in select_split(source, checkpoint / SPLIT_FILE, role).texts]
            splits.setdefault(role, selected)
            assert splits[role] == selected, f"{choice}: the {role} split differs from the first choice's"
            paths = [messages[kept[k]][0] for k in selected]
            by_text_path[role] = paths
            extraction = replace(DEFAULT_EXTRACTION, headers=CHOICES[choice])
            scored = score(
                checkpoint,
                [messages[kept[k]][2] for k in selected],
                [labels[k] for k in selected],
                [Path(p).name.startswith("hard-ham") for p in paths],
                extraction,
            )
            entry[role] = scored
            for rule, r in scored.items():
                rows.append(
                    {
                        "headers": choice,
                        "rows": role,
                        "windows": rule,
                        "accuracy": r["accuracy"]["value"],
                        "spam_recall": r["spam_recall"]["value"],
                        "fpr_ham": r["fpr_ham"]["value"],
                        "fpr_hard_ham": r["fpr_hard_ham"]["value"],
                        "roc_auc": r["roc_auc"],
                        "seconds": r["seconds"],
                    }
                )
        result["choices"][choice] = entry
        result["split"] = {role: by_text_path[role] for role in by_text_path}
        print(f"wrote {write_result('mail_reading', result)}")
    print_table(rows)


if __name__ == "__main__":
    main()
