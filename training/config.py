"""The arguments of a fine-tuning or evaluation run: frozen dataclasses that validate in `__post_init__` and
raise ValueError with the bad value shown (litgpt's argument groups). Groups compose: a fine-tuning run holds
its data, base model and training configs. Each field's default and help text are the command line's
(training.cli); a run's arguments are recorded flat in the checkpoint's config.json under "training"."""

import os
import typing
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

from training.finetune.base import HF_REPOS
from training.finetune.data import BALANCING, ROLES, is_sms_spam
from training.runtime.device import DEVICE_HELP, require_available, resolve_device
from training.runtime.model import PRESETS, GPTConfig
from training.runtime.options import ClassifierOptions, opt
from training.runtime.precision import (
    TRAINING_PRECISION_HELP,
    TRAINING_PRECISIONS,
)
from training.runtime.record import from_flat as from_flat

TRAINABLE = ("last-blocks", "all", "lora")
MAX_TOKENS = 256  # the default token budget of a text, where the model has that many positions
THRESHOLD_OBJECTIVES = ("fpr", "f1")
FEEDBACK_WEIGHT = 10  # the default --feedback-weight, measured in docs/feedback.md


def group(title: str) -> dict:
    """The metadata of a field that holds an argument group, with the heading the command line shows."""
    return {"group": title}


@dataclass(frozen=True)
class DataConfig:
    """Which labelled texts: "sms" or a file, and the columns of a table."""

    data: str = opt(
        "sms",
        '"sms" (the UCI SMS Spam Collection, packaged with spamgpt), a SMSSpamCollection, .csv, .tsv, .jsonl, or a '
        "directory of mail: a folder (message files or a Maildir) or a <label>.mbox file per label, e.g. spam/ ham/",
    )
    text_column: str = opt("text", "column of the texts in a .csv / .tsv / .jsonl")
    label_column: str = opt("label", "column of the labels in a .csv / .tsv / .jsonl")


@dataclass(frozen=True)
class BaseModelConfig:
    """The model fine-tuning starts from, and the token budget of a text in training and serving."""

    preset: str = opt("gpt2", "model size", tuple(PRESETS))
    base: str | None = opt(
        None,
        "any GPT-2-family base instead of --preset: a Hugging Face repo id (or gpt2, gpt2-medium, gpt2-large, "
        "gpt2-xl, distilgpt2) or a local directory with config.json and model.safetensors (or a sharded "
        "model.safetensors.index.json); its config.json gives the sizes",
    )
    init: str = opt("pretrained", "start from OpenAI's GPT-2 weights, or from random weights", ("pretrained", "random"))
    weights: str | None = opt(None, "local GPT-2 model.safetensors (or its directory) instead of downloading")
    tokenizer_dir: str | None = opt(
        None, "directory with GPT-2's vocab.bpe and encoder.json instead of the copy packaged with spamgpt"
    )
    max_tokens: int | None = opt(
        None,
        f"texts are truncated to this many tokens, in training and in serving; when not given, min({MAX_TOKENS}, the "
        "model's positions): 256 for gpt2, 64 for tiny, a --base's n_positions where fewer, --prefix-from's own; the "
        "card records it",
    )
    prefix_from: str | None = opt(
        None,
        "a checkpoint directory to train a sibling of: its architecture, tokenizer and frozen prefix (embeddings and "
        "frozen blocks) are kept as they are, so the two share them when served together; the trainable blocks "
        "start from its own, the head afresh. --trainable must leave the same blocks frozen; --preset and --init are "
        "not read",
    )

    def __post_init__(self):
        if self.prefix_from is not None:
            names = ("base", "weights", "tokenizer_dir")
            given = [f"--{name.replace('_', '-')}" for name in names if getattr(self, name) is not None]
            if given:
                raise ValueError(f"--prefix-from {self.prefix_from!r} brings its weights and tokenizer: drop {given}")
            if self.max_tokens is not None and self.max_tokens < 1:  # the checkpoint's block_size bounds it later
                raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens!r}")
            return
        if self.preset not in PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}; choose one of {sorted(PRESETS)}")
        if self.init not in ("pretrained", "random"):
            raise ValueError(f"init must be 'pretrained' or 'random', got {self.init!r}")
        if self.weights is not None and self.init == "random":
            raise ValueError(f"--weights {self.weights!r} has no use with --init random")
        if self.init == "pretrained" and self.base is None and self.weights is None and self.preset not in HF_REPOS:
            raise ValueError(
                f"preset {self.preset!r} has no pretrained weights: add --init random --trainable all (./run.sh: "
                f"SPAMGPT_INIT=random SPAMGPT_TRAINABLE=all), or pick a preset of {sorted(HF_REPOS)}"
            )
        if self.base is not None:
            if self.weights is not None:
                raise ValueError(f"--weights {self.weights!r} and --base {self.base!r}: give one")
            if self.max_tokens is not None and self.max_tokens < 1:  # the base's n_positions bounds it later
                raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens!r}")
            return
        block_size = GPTConfig.from_preset(self.preset).block_size
        if self.max_tokens is not None and not 1 <= self.max_tokens <= block_size:
            raise ValueError(
                f"max_tokens must lie in 1..{block_size} for preset {self.preset!r}, got {self.max_tokens!r}"
            )

    def resolved_max_tokens(self, block_size: int) -> int:
        """max_tokens as given, or for None min(MAX_TOKENS, `block_size`: the model's positions)."""
        return min(MAX_TOKENS, block_size) if self.max_tokens is None else self.max_tokens


@dataclass(frozen=True)
class TrainConfig:
    """The fine-tuning loop's settings (training.finetune.train); defaults are the reference's, chapter 6."""

    trainable: str = opt(
        "last-blocks",
        "last-blocks: those blocks + final norm + head; all; lora: adapters + final norm + head",
        TRAINABLE,
    )
    trainable_blocks: int = opt(1, "how many final blocks train with --trainable last-blocks")
    lora_rank: int = opt(8, "rank of each LoRA adapter: trainable size against capacity")
    lora_alpha: float = opt(16.0, "LoRA adapters' output is scaled by alpha / rank")
    epochs: int = opt(5, "passes over the training split")
    batch_size: int = opt(8, "training examples per optimizer step")
    lr: float = opt(5e-5, "AdamW learning rate")
    weight_decay: float = opt(0.1, "AdamW weight decay of the weight matrices and embeddings (biases and norms: none)")
    seed: int = opt(123, "seeds the data split, the model's initialisation and the order of batches")
    device: str = opt("auto", DEVICE_HELP)
    precision: str = opt("auto", TRAINING_PRECISION_HELP, TRAINING_PRECISIONS)
    cache_prefix: bool = opt(True, "run the frozen blocks once and cache their output (off: same losses, slower)")

    def __post_init__(self):
        if self.trainable not in TRAINABLE:
            raise ValueError(f"trainable must be one of {TRAINABLE}, got {self.trainable!r}")
        for name in ("trainable_blocks", "lora_rank", "epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)!r}")
        for name in ("lora_alpha", "lr"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)!r}")
        if not self.weight_decay >= 0:
            raise ValueError(f"weight_decay must not be negative, got {self.weight_decay!r}")
        if self.precision not in TRAINING_PRECISIONS:
            raise ValueError(f"precision must be one of {TRAINING_PRECISIONS}, got {self.precision!r}")
        require_available(resolve_device(self.device))  # a device this machine lacks is a bad option


@dataclass(frozen=True)
class FinetuneConfig:
    """Everything `finetune` needs: data, base model, training, and where the checkpoint goes."""

    data: DataConfig = field(default_factory=DataConfig, metadata=group("data"))
    base: BaseModelConfig = field(default_factory=BaseModelConfig, metadata=group("base model"))
    train: TrainConfig = field(default_factory=TrainConfig, metadata=group("training"))
    balance: str = opt(
        "undersample",
        "undersample: every label to the rarest label's count, as the reference does (the rows left out are "
        "held out for threshold selection and evaluation); class-weighted: all rows, each label's loss weighed "
        "inversely to its count; none: all rows, unweighted",
        BALANCING,
    )
    threshold_objective: str = opt(
        "fpr",
        "fpr: the threshold with the highest recall of the positive label (spam) whose false-positive rate on the "
        "selection rows is at most --target-fpr; f1: the threshold with the best F1 there",
        THRESHOLD_OBJECTIVES,
    )
    target_fpr: float = opt(0.01, "the false-positive rate (share of ham flagged) --threshold-objective fpr allows")
    out: str = opt(
        "checkpoints/spamgpt",
        "checkpoint directory to write (replaced whole at the end); one there trained with other arguments or data "
        "is replaced only with --overwrite or --skip-existing",
    )
    skip_existing: bool = opt(
        False,
        "exit at once when --out holds a checkpoint of these arguments and data; otherwise train and replace it",
    )
    overwrite: bool = opt(
        False,
        "replace a checkpoint in --out trained with other arguments or data, and discard the state an interrupted "
        "run saved beside it (without --resume); refused otherwise",
    )
    resume: bool = opt(
        False, "continue an interrupted run from the state saved beside --out after its last completed epoch"
    )
    save_state: bool = opt(
        True, "after each epoch, save what --resume needs beside --out (.<out>.resume/; removed after the export)"
    )
    feedback: str | None = opt(
        None,
        "a feedback store (the server's SPAMGPT_FEEDBACK_PATH; docs/feedback.md): its corrections join the training "
        "rows and replace any row of --data they relabel; --data may also name the store itself, to train on it alone",
    )
    feedback_weight: int = opt(
        FEEDBACK_WEIGHT,
        "each correction counts this many times among the training rows (a few dozen corrections "
        "among thousands of rows are otherwise barely learned; docs/feedback.md measures it)",
    )
    compare_with: str | None = opt(
        None,
        "the serving checkpoint: the new one is refused when worse on the evaluation rows beyond its 95 percent "
        "interval; "
        "default for a run that learns from feedback: the checkpoint in --out",
    )
    force: bool = opt(False, "export the new checkpoint even when it is worse than --compare-with")

    def __post_init__(self):
        if self.balance not in BALANCING:
            raise ValueError(f"balance must be one of {BALANCING}, got {self.balance!r}")
        if self.threshold_objective not in THRESHOLD_OBJECTIVES:
            raise ValueError(
                f"threshold_objective must be one of {THRESHOLD_OBJECTIVES}, got {self.threshold_objective!r}"
            )
        if not 0 <= self.target_fpr < 1:
            raise ValueError(f"target_fpr must lie in [0, 1), got {self.target_fpr!r}")
        if self.feedback_weight < 1:
            raise ValueError(f"feedback_weight must be at least 1, got {self.feedback_weight!r}")


@dataclass(frozen=True)
class EvaluateConfig:
    """Everything `evaluate` needs: the checkpoint, the data and which of its rows."""

    checkpoint: str = opt(help="checkpoint directory written by `finetune`")
    data: DataConfig = field(default_factory=DataConfig, metadata=group("data"))
    split: str = opt(
        "all",
        "all rows, or only those the checkpoint used in one role (report/split.json): evaluation is the test split "
        "and the held-out rows neither training nor threshold selection saw",
        ("all", *ROLES),
    )
    device: str = opt("auto", DEVICE_HELP)
    out: str | None = opt(None, "also write the metrics to this JSON file")

    def __post_init__(self):
        require_available(resolve_device(self.device))  # a device this machine lacks is a bad option
        if self.split not in ("all", *ROLES):
            raise ValueError(f"split must be one of {('all', *ROLES)}, got {self.split!r}")


# sms: the SMS Spam Collection's label<TAB>text lines; mail: a directory of mail or one message (.eml); mbox
INPUT_FORMATS = ("csv", "tsv", "jsonl", "lines", "sms", "mail", "mbox")
OUTPUT_FORMATS = ("csv", "tsv", "jsonl")
BAD_ROWS_SUFFIX, SUMMARY_SUFFIX = ".bad-rows.jsonl", ".summary.json"  # files written beside predict's --out


def file_format(path: str, given: str, formats: tuple[str, ...], default: str | None = None) -> str:
    """`given`, or for "auto" the one of `formats` that the path's suffix names (else `default`).

    Raises ValueError for a format not in `formats`, or "auto" on a suffix that names none and no default.
    """
    if given != "auto":
        if given not in formats:
            raise ValueError(f"format must be one of {('auto', *formats)}, got {given!r}")
        return given
    suffix = Path(path).suffix.lower().removeprefix(".")
    if suffix in formats:
        return suffix
    if default is None:
        raise ValueError(f"{path}: cannot tell the format from the suffix {suffix!r}; name one of {formats}")
    return default


@dataclass(frozen=True)
class PredictConfig:
    """Everything `predict` needs: the checkpoint, the file to score and where the results go."""

    checkpoint: str = opt(help="checkpoint directory written by `finetune`")
    data: str = opt(
        help="file to score: .csv / .tsv with a header row, .jsonl, a file named SMSSpamCollection (label<TAB>text "
        "lines, as `finetune` reads it), mail (a directory of message files, Maildirs, .mbox files or label folders; "
        "an .eml message; an .mbox file), or anything else: one text a line"
    )
    out: str = opt(help="results file, .csv, .tsv or .jsonl: the input's columns, then line, label, probabilities")
    text_column: str = opt("text", "column of the texts in a .csv / .tsv / .jsonl")
    input_format: str = opt(
        "auto",
        "auto: from --data's name (SMSSpamCollection: sms; a directory or .eml: mail) or suffix (csv, tsv, jsonl, "
        "mbox; any other: lines)",
        ("auto", *INPUT_FORMATS),
    )
    output_format: str = opt("auto", "auto: from --out's suffix", ("auto", *OUTPUT_FORMATS))
    output_prefix: str = opt("", "prefix of the added columns, when the input has columns of those names")
    scoring: ClassifierOptions = field(default_factory=ClassifierOptions, metadata=group("scoring"))
    chunk_rows: int = opt(1024, "rows read, scored and written at a time: memory stays bounded by one chunk")
    resume: bool = opt(
        True,
        "when --out exists, keep its rows and score only the input rows after them; refused unless the same input, "
        "checkpoint and record-changing options made it (OUT.summary.json records them)",
    )
    progress: bool = opt(True, "show a progress bar (rows and rows per second) on stderr")

    def __post_init__(self):
        self.formats()
        require_available(self.scoring.torch_device)  # a device this machine lacks is a bad option
        if self.chunk_rows < 1:
            raise ValueError(f"chunk_rows must be at least 1, got {self.chunk_rows!r}")
        for path in self.written_paths():
            if _same_file(path, Path(self.data)):
                raise ValueError(
                    f"--out {self.out!r} would write {str(path)!r}, which is the input file; pick another --out"
                )
            if Path(self.data).is_dir() and Path(self.data).resolve() in path.resolve().parents:
                raise ValueError(
                    f"--out {self.out!r} would write {str(path)!r} inside the input folder, where it would be read as "
                    "mail; pick another --out"
                )

    def formats(self) -> tuple[str, str]:
        """(the input's format, the output's): the named ones, or what the file names say.

        Raises ValueError for an unknown format, or an --out suffix that names none.
        """
        given = self.input_format
        if given == "auto" and is_sms_spam(self.data):
            given = "sms"
        elif given == "auto" and (Path(self.data).is_dir() or Path(self.data).suffix.lower() == ".eml"):
            given = "mail"
        return (
            file_format(self.data, given, INPUT_FORMATS, default="lines"),
            file_format(self.out, self.output_format, OUTPUT_FORMATS),
        )

    def written_paths(self) -> tuple[Path, Path, Path]:
        """The files a run writes: the results, the bad rows beside them and the summary beside them."""
        out = Path(self.out)
        return out, out.with_name(out.name + BAD_ROWS_SUFFIX), out.with_name(out.name + SUMMARY_SUFFIX)


def _same_file(a: Path, b: Path) -> bool:
    """Whether two paths name one file: the same path once symbolic links and ".." are resolved, or (both existing)
    the same inode, such as a hard link or the same directory mounted twice."""
    return a.resolve() == b.resolve() or (a.exists() and b.exists() and os.path.samefile(a, b))


@dataclass(frozen=True)
class ExportConfig:
    """Everything `export` needs: the checkpoint, the layout to write and where."""

    checkpoint: str = opt(help="checkpoint directory written by `finetune`", positional=True)
    format: str = opt(
        help="hf: transformers' GPT2ForSequenceClassification layout; onnx: model.onnx (needs the onnx extra)",
        choices=("hf", "onnx"),
    )
    out: str = opt(help="directory to write; must be new or empty")

    def __post_init__(self):
        if self.format not in ("hf", "onnx"):
            raise ValueError(f"format must be 'hf' or 'onnx', got {self.format!r}")


def flatten(config: Any) -> dict[str, Any]:
    """A config and its groups as one flat dict of option names to values (names are unique across groups)."""
    out = {}
    for f in fields(config):
        value = getattr(config, f.name)
        out.update(flatten(value) if f.metadata.get("group") else {f.name: value})
    return out


def changed_options(wanted: dict[str, Any], recorded: dict[str, Any]) -> list[str]:
    """The names, sorted, of the options whose values differ between two flat dicts (missing counts as None)."""
    return sorted(k for k in wanted.keys() | recorded.keys() if wanted.get(k) != recorded.get(k))


def option_fields(cls: type) -> list[tuple[Any, type, str | None]]:
    """(field, its type, its group's title or None) for every option of `cls`, groups flattened in order."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in fields(cls):
        if f.metadata.get("group"):
            assert is_dataclass(hints[f.name])
            out += [(inner, kind, f.metadata["group"]) for inner, kind, _ in option_fields(hints[f.name])]
        else:
            out.append((f, hints[f.name], None))
    return out
