"""The arguments of a fine-tuning or evaluation run: frozen dataclasses that validate in `__post_init__` and
raise ValueError with the bad value shown (litgpt's argument groups). Groups compose: a fine-tuning run holds
its data, base model and training configs. Each field's default and help text are the command line's
(training.cli); a run's arguments are recorded flat in the checkpoint's config.json under "training"."""

import typing
from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from typing import Any

from training.data import DEFAULT_CACHE, SPLITS
from training.device import DEVICE_HELP, resolve_device
from training.model import PRESETS, GPTConfig

TRAINABLE = ("last-blocks", "all", "lora")


def opt(default=MISSING, help: str = "", choices: tuple | None = None, positional: bool = False):
    """A dataclass field whose help text and choices the command line shows; positional: an argument, not --name."""
    return field(default=default, metadata={"help": help, "choices": choices, "positional": positional})


GROUP = {"group": True}  # the metadata of a field that holds an argument group


@dataclass(frozen=True)
class DataConfig:
    data: str = opt("sms", '"sms" (the UCI SMS Spam Collection, downloaded) or a SMSSpamCollection, .csv, .tsv, .jsonl')
    text_column: str = opt("text", "column of the texts in a .csv / .tsv / .jsonl")
    label_column: str = opt("label", "column of the labels in a .csv / .tsv / .jsonl")


@dataclass(frozen=True)
class BaseModelConfig:
    preset: str = opt("gpt2", "model size", tuple(PRESETS))
    base: str | None = opt(
        None,
        "any GPT-2-family base instead of --preset: a Hugging Face repo id (or gpt2, gpt2-medium, gpt2-large, "
        "gpt2-xl, distilgpt2) or a local directory with config.json and model.safetensors (or a sharded "
        "model.safetensors.index.json); its config.json gives the sizes",
    )
    init: str = opt("pretrained", "start from OpenAI's GPT-2 weights, or from random weights", ("pretrained", "random"))
    weights: str | None = opt(None, "local GPT-2 model.safetensors (or its directory) instead of downloading")
    tokenizer_dir: str | None = opt(None, "directory with GPT-2's vocab.bpe and encoder.json instead of downloading")
    max_tokens: int = opt(256, "texts are truncated to this many tokens, in training and in serving")

    def __post_init__(self):
        if self.preset not in PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}; choose one of {sorted(PRESETS)}")
        if self.init not in ("pretrained", "random"):
            raise ValueError(f"init must be 'pretrained' or 'random', got {self.init!r}")
        if self.weights is not None and self.init == "random":
            raise ValueError(f"--weights {self.weights!r} has no use with --init random")
        if self.base is not None:
            if self.weights is not None:
                raise ValueError(f"--weights {self.weights!r} and --base {self.base!r}: give one")
            if self.max_tokens < 1:  # the base's n_positions bounds it once its config.json is read
                raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens!r}")
            return
        block_size = GPTConfig.from_preset(self.preset).block_size
        if not 1 <= self.max_tokens <= block_size:
            raise ValueError(
                f"max_tokens must lie in 1..{block_size} for preset {self.preset!r}, got {self.max_tokens!r}"
            )


@dataclass(frozen=True)
class TrainConfig:
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
    weight_decay: float = opt(0.1, "AdamW weight decay")
    seed: int = opt(123, "seeds the data split, the model's initialisation and the order of batches")
    device: str = opt("auto", DEVICE_HELP)
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
        resolve_device(self.device)


@dataclass(frozen=True)
class FinetuneConfig:
    """Everything `finetune` needs: data, base model, training, and where the checkpoint goes."""

    data: DataConfig = field(default_factory=DataConfig, metadata=GROUP)
    base: BaseModelConfig = field(default_factory=BaseModelConfig, metadata=GROUP)
    train: TrainConfig = field(default_factory=TrainConfig, metadata=GROUP)
    balance: bool = opt(True, "undersample every label to the rarest label's count, as the reference does")
    cache_dir: str = opt(str(DEFAULT_CACHE), "where downloads are kept (env SPAMGPT_CACHE)")
    out: str = opt("checkpoints/spamgpt", "checkpoint directory to write (replaced whole at the end)")
    skip_existing: bool = opt(False, "exit at once when --out holds a checkpoint of these arguments and data")


@dataclass(frozen=True)
class EvaluateConfig:
    """Everything `evaluate` needs: the checkpoint, the data and which of its rows."""

    checkpoint: str = opt(help="checkpoint directory written by `finetune`")
    data: DataConfig = field(default_factory=DataConfig, metadata=GROUP)
    split: str = opt(
        "all", "all rows, or only those of one of the checkpoint's splits (report/split.json)", ("all", *SPLITS)
    )
    cache_dir: str = opt(str(DEFAULT_CACHE), "where downloads are kept (env SPAMGPT_CACHE)")
    device: str = opt("auto", DEVICE_HELP)
    out: str | None = opt(None, "also write the metrics to this JSON file")

    def __post_init__(self):
        resolve_device(self.device)
        if self.split not in ("all", *SPLITS):
            raise ValueError(f"split must be one of {('all', *SPLITS)}, got {self.split!r}")


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


def from_flat(cls: type, values: dict[str, Any]) -> Any:
    """Build `cls` and its groups from a flat dict; names it lacks keep their defaults, unknown names are ignored.

    Raises ValueError from a group's validation, or TypeError for values of the wrong type.
    """
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in fields(cls):
        if f.metadata.get("group"):
            kwargs[f.name] = from_flat(hints[f.name], values)
        elif f.name in values:
            kwargs[f.name] = values[f.name]
    return cls(**kwargs)


def option_fields(cls: type) -> list[tuple[Any, type, str | None]]:
    """(field, its type, its group's name or None) for every option of `cls`, groups flattened in order."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in fields(cls):
        if f.metadata.get("group"):
            assert is_dataclass(hints[f.name])
            out += [(inner, kind, f.name) for inner, kind, _ in option_fields(hints[f.name])]
        else:
            out.append((f, hints[f.name], None))
    return out
