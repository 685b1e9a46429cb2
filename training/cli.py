"""`python -m training finetune | evaluate`: from data to an exported checkpoint directory, and back to metrics.

Each command is one function taking one validated dataclass; the dataclass fields are the options, their
defaults and help text.
"""

import argparse
import json
import shutil
import sys
import typing
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path

import tiktoken
import torch

from training.checkpoint import CONFIG_FILE, REPORT_DIR, CheckpointError, load_checkpoint, save_checkpoint
from training.data import (
    DEFAULT_CACHE,
    Dataset,
    balance,
    deduplicate,
    fingerprint,
    load_dataset,
    stratified_split,
    text_id,
)
from training.download import DownloadError
from training.evaluate import evaluation_report, predict, split_metrics, summary, write_report
from training.finetune import Examples, TrainConfig, opt, resolve_device, train
from training.model import PRESETS, GPTClassifier, GPTConfig, WeightsError, pretrained_classifier
from training.tokenizer import TokenizerError, encode_batch, fetch_gpt2_bpe, load_tokenizer

# Arguments that change where or how fast a run happens, not what it produces: --skip-existing ignores them.
NOT_COMPARED = ("out", "device", "skip_existing", "cache_dir", "cache_prefix")
SPLITS = ("train", "validation", "test")


@dataclass(frozen=True)
class FinetuneArgs(TrainConfig):
    data: str = opt("sms", '"sms" (the UCI SMS Spam Collection, downloaded) or a SMSSpamCollection, .csv, .tsv, .jsonl')
    text_column: str = opt("text", "column of the texts in a .csv / .tsv / .jsonl")
    label_column: str = opt("label", "column of the labels in a .csv / .tsv / .jsonl")
    balance: bool = opt(True, "undersample every label to the rarest label's count, as the reference does")
    preset: str = opt("gpt2", "model size", tuple(PRESETS))
    init: str = opt("pretrained", "start from OpenAI's GPT-2 weights, or from random weights", ("pretrained", "random"))
    weights: str | None = opt(None, "local GPT-2 model.safetensors (or its directory) instead of downloading")
    tokenizer_dir: str | None = opt(None, "directory with GPT-2's vocab.bpe and encoder.json instead of downloading")
    max_tokens: int = opt(256, "texts are truncated to this many tokens, in training and in serving")
    cache_dir: str = opt(str(DEFAULT_CACHE), "where downloads are kept (env SPAMGPT_CACHE)")
    out: str = opt("checkpoints/spamgpt", "checkpoint directory to write (replaced whole at the end)")
    skip_existing: bool = opt(False, "exit at once when --out holds a checkpoint of these arguments and data")

    def __post_init__(self):
        super().__post_init__()
        if self.preset not in PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}; choose one of {sorted(PRESETS)}")
        if self.init not in ("pretrained", "random"):
            raise ValueError(f"init must be 'pretrained' or 'random', got {self.init!r}")
        if self.weights is not None and self.init == "random":
            raise ValueError(f"--weights {self.weights!r} has no use with --init random")
        block_size = GPTConfig.from_preset(self.preset).block_size
        if not 1 <= self.max_tokens <= block_size:
            raise ValueError(
                f"max_tokens must lie in 1..{block_size} for preset {self.preset!r}, got {self.max_tokens!r}"
            )


@dataclass(frozen=True)
class EvaluateArgs:
    checkpoint: str = opt(help="checkpoint directory written by `finetune`")
    data: str = opt("sms", '"sms" or a local SMSSpamCollection, .csv, .tsv, .jsonl')
    split: str = opt(
        "all", "all rows, or only those of one of the checkpoint's splits (report/split.json)", ("all", *SPLITS)
    )
    text_column: str = opt("text", "column of the texts in a .csv / .tsv / .jsonl")
    label_column: str = opt("label", "column of the labels in a .csv / .tsv / .jsonl")
    cache_dir: str = opt(str(DEFAULT_CACHE), "where downloads are kept (env SPAMGPT_CACHE)")
    device: str = opt("auto", "auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps")
    out: str | None = opt(None, "also write the metrics to this JSON file")

    def __post_init__(self):
        resolve_device(self.device)
        if self.split not in ("all", *SPLITS):
            raise ValueError(f"split must be one of {('all', *SPLITS)}, got {self.split!r}")


# --- finetune ------------------------------------------------------------------------------------


def finetune(args: FinetuneArgs) -> Path:
    """Fine-tune GPT-2 into a classifier and export a checkpoint directory (the reference's settings by default)."""
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not (out / CONFIG_FILE).is_file():
        raise ValueError(f"--out {str(out)!r} holds files but no checkpoint; refusing to replace it")
    source = load_dataset(args.data, args.cache_dir, args.text_column, args.label_column)
    if args.skip_existing and matching_checkpoint(out, args, fingerprint(source)):
        print(f"skip: {out} already holds a checkpoint trained with these arguments on this data")
        return out
    tokenizer_dir = Path(args.tokenizer_dir) if args.tokenizer_dir else fetch_gpt2_bpe(args.cache_dir)
    enc = load_tokenizer(tokenizer_dir)
    prepared = balance(deduplicate(source), args.seed) if args.balance else deduplicate(source)
    split = stratified_split(prepared, args.seed)
    label_names = prepared.label_names()
    model = base_model(args, GPTConfig.from_preset(args.preset, vocab_size=enc.n_vocab, n_labels=len(label_names)))
    train_data, val_data = (encode(enc, ds, label_names, args.max_tokens) for ds in (split.train, split.validation))
    history = train(model, train_data, val_data, args)

    validation, test = (
        predict(model, enc, ds.texts, ds.labels, label_names, args.max_tokens) for ds in (split.validation, split.test)
    )
    report = evaluation_report(label_names, validation, test)
    card = {
        "labels": label_names,
        "max_tokens": args.max_tokens,
        "threshold": report["threshold"],
        "base_model": args.preset if args.init == "pretrained" else f"{args.preset} (random init)",
        "metrics": {**summary(report), "best_epoch": history.best_epoch},
        "training": asdict(args),
        "data": {
            "source": args.data,
            "fingerprint": fingerprint(source),
            "rows_after_dedup_and_balance": len(prepared.texts),
            "split": {name: len(getattr(split, name).texts) for name in SPLITS},
        },
    }
    with staged(out) as staging:
        save_checkpoint(staging, model, tokenizer_dir, card)
        write_report(staging / REPORT_DIR, report, test, history.to_dict())
        split_ids = {name: [text_id(text) for text in getattr(split, name).texts] for name in SPLITS}
        (staging / REPORT_DIR / "split.json").write_text(json.dumps(split_ids) + "\n")
    print(f"{headline(card['metrics'], card['threshold'])}; checkpoint exported to {out}")
    return out


def base_model(args: FinetuneArgs, config: GPTConfig) -> GPTClassifier:
    torch.manual_seed(args.seed)  # the head (and everything, with --init random) starts from the seed
    if args.init == "random":
        return GPTClassifier(config)
    return pretrained_classifier(config, args.preset, source=args.weights)


def encode(enc: tiktoken.Encoding, ds: Dataset, label_names: list[str], max_tokens: int) -> Examples:
    rows, _ = encode_batch(enc, ds.texts, max_tokens)
    return Examples(rows, [label_names.index(label) for label in ds.labels])


def matching_checkpoint(out: Path, args: FinetuneArgs, data_fingerprint: dict) -> bool:
    """Whether `out` holds a valid checkpoint whose arguments and data are this run's; prints why not."""
    if not (out / CONFIG_FILE).is_file():
        print(f"no checkpoint at {out} yet; training one")
        return False
    try:
        card = load_checkpoint(out).card
    except CheckpointError as exc:
        print(f"{out} holds no usable checkpoint ({exc}); training a new one")
        return False
    wanted = {k: v for k, v in json.loads(json.dumps(asdict(args))).items() if k not in NOT_COMPARED}
    recorded = {k: v for k, v in card["training"].items() if k not in NOT_COMPARED}
    changed = sorted(k for k in wanted.keys() | recorded.keys() if wanted.get(k) != recorded.get(k))
    if changed:
        print(f"{out} was trained with other arguments ({', '.join(changed)}); training a new one")
        return False
    if card["data"].get("fingerprint") != data_fingerprint:
        print(f"{out} was trained on other data; training a new one")
        return False
    return True


@contextmanager
def staged(target: Path) -> Iterator[Path]:
    """A directory beside `target` that replaces it only once everything inside is written, so that a crash
    never leaves a half checkpoint where serving would look."""
    staging, old = target.with_name(f".{target.name}.staging"), target.with_name(f".{target.name}.old")
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(staging, ignore_errors=True)  # a crashed run's leftovers
    staging.mkdir()
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        target.rename(old)  # a directory cannot be renamed over a non-empty one
    staging.rename(target)
    shutil.rmtree(old, ignore_errors=True)


def headline(metrics: dict, threshold: dict | None) -> str:
    def num(x):
        return "n/a" if x is None else f"{x:.4f}"

    line = (
        f"test accuracy {num(metrics['test_accuracy'])}, F1 ({metrics['f1_label']}) {num(metrics['test_f1'])}, "
        f"ROC-AUC {num(metrics['test_roc_auc'])}"
    )
    if threshold is not None:
        line += (
            f"; at threshold {threshold['label']} >= {threshold['value']:.3f}: accuracy "
            f"{num(metrics['test_accuracy_at_threshold'])}, F1 {num(metrics['test_f1_at_threshold'])}"
        )
    return line


# --- evaluate ------------------------------------------------------------------------------------


def evaluate(args: EvaluateArgs) -> dict:
    """Re-evaluate an exported checkpoint on a dataset, at argmax and at the checkpoint's threshold."""
    checkpoint = load_checkpoint(args.checkpoint, device=resolve_device(args.device))
    ds = deduplicate(load_dataset(args.data, args.cache_dir, args.text_column, args.label_column))
    if args.split != "all":
        split_file = checkpoint.path / REPORT_DIR / "split.json"
        if not split_file.is_file():
            raise CheckpointError(f"{split_file}: missing, so --split {args.split} cannot be selected")
        ids = set(json.loads(split_file.read_text())[args.split])
        keep = [i for i, text in enumerate(ds.texts) if text_id(text) in ids]
        if not keep:
            raise ValueError(f"none of {args.data!r} is in the checkpoint's {args.split} split")
        ds = Dataset([ds.texts[i] for i in keep], [ds.labels[i] for i in keep])
    predictions = predict(
        checkpoint.model, checkpoint.tokenizer, ds.texts, ds.labels, checkpoint.labels, checkpoint.max_tokens
    )
    result = {
        "checkpoint": str(checkpoint.path),
        "data": args.data,
        "split": args.split,
        "fingerprint": fingerprint(ds),
        "threshold": checkpoint.threshold,
        **split_metrics(predictions, checkpoint.labels, checkpoint.threshold),
    }
    for decision in ("argmax", "threshold"):
        if decision in result:
            m = result[decision]
            auc = "n/a" if m["roc_auc"] is None else f"{m['roc_auc']:.4f}"
            print(f"{decision}: n {m['n']}, accuracy {m['accuracy']:.4f}, macro F1 {m['macro_f1']:.4f}, ROC-AUC {auc}")
            print(f"  confusion matrix (rows true, columns predicted; {checkpoint.labels}): {m['confusion_matrix']}")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        print(f"metrics written to {args.out}")
    return result


# --- command line --------------------------------------------------------------------------------

COMMANDS = {"finetune": (finetune, FinetuneArgs), "evaluate": (evaluate, EvaluateArgs)}
WEIGHTS_HELP = (
    "Ways out: pass --weights PATH (a local GPT-2 model.safetensors, or a directory holding one), "
    "or --init random to train from random weights on purpose."
)


def add_options(parser: argparse.ArgumentParser, cls: type) -> None:
    """One option per dataclass field: --snake-case name, the field's type, default, help and choices."""
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        kind = hints[f.name]
        kwargs = dict(dest=f.name, help=f.metadata.get("help"))
        if f.default is MISSING:
            kwargs["required"] = True
        else:
            kwargs["default"] = f.default
        if kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = (
                next(t for t in typing.get_args(kind) if t is not type(None)) if typing.get_args(kind) else kind
            )
            kwargs["choices"] = f.metadata.get("choices")
        parser.add_argument("--" + f.name.replace("_", "-"), **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m training", description="Fine-tune GPT-2 into a text classifier.")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, (command, cls) in COMMANDS.items():
        sub = commands.add_parser(
            name,
            help=command.__doc__,
            description=command.__doc__,
            formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        )
        add_options(sub, cls)
        sub.set_defaults(subparser=sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    namespace = vars(build_parser().parse_args(argv))
    command, cls = COMMANDS[namespace.pop("command")]
    subparser = namespace.pop("subparser")
    try:
        args = cls(**namespace)
    except ValueError as exc:
        subparser.error(str(exc))  # exits with status 2 after the usage line
    try:
        command(args)
    except WeightsError as exc:
        print(f"error: could not get the base GPT-2 weights: {exc}\n{WEIGHTS_HELP}", file=sys.stderr)
        return 2
    except (CheckpointError, DownloadError, TokenizerError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0
