"""`python -m training finetune | evaluate | predict | export`: options in, a call to training.finetune.pipeline out.

Each command is one function taking one config (training.config); the config's fields, its argument groups
flattened, are the options with their defaults, help text and choices. `train` is another name for `finetune`:
`spamgpt` (app.cli) uses this same parser, so both commands have one definition of every option.
"""

import argparse
import re
import sys
import typing
from dataclasses import MISSING

from training.config import EvaluateConfig, ExportConfig, FinetuneConfig, PredictConfig, from_flat, option_fields
from training.export.formats import export
from training.finetune.base import UnsupportedBase
from training.finetune.pipeline import evaluate, finetune
from training.runtime.checkpoint import CheckpointError
from training.runtime.inference import NonFiniteLogits
from training.runtime.model import WeightsError
from training.runtime.tokenizer import TokenizerError
from training.scoring.files import predict

COMMANDS = {
    "finetune": (finetune, FinetuneConfig),  # also `train` (ALIASES)
    "evaluate": (evaluate, EvaluateConfig),
    "predict": (predict, PredictConfig),
    "export": (export, ExportConfig),
}
ALIASES = {"finetune": ["train"]}
WEIGHTS_HELP = (
    "Ways out: pass --weights PATH (a local GPT-2 model.safetensors, or a directory holding one), "
    "or --init random --trainable all to train every block from random weights on purpose "
    "(./run.sh: SPAMGPT_INIT=random SPAMGPT_TRAINABLE=all ./run.sh)."
)


def add_options(parser: argparse.ArgumentParser, cls: type) -> None:
    """One option per config field: --kebab-case name, the field's type, default, help and choices; the fields
    of an argument group under that group's heading."""
    groups = {}
    for f, kind, group in option_fields(cls):
        if group is not None and group not in groups:
            groups[group] = parser.add_argument_group(f"{group} options")
        target = parser if group is None else groups[group]
        kwargs = dict(dest=f.name, help=f.metadata.get("help"))
        if f.metadata.get("positional"):
            target.add_argument(f.name, help=kwargs["help"], type=kind)
            continue
        if f.default is MISSING:
            kwargs |= dict(required=True, default=argparse.SUPPRESS)  # no "(default: None)" in the help
        else:
            kwargs["default"] = f.default
        if kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = next((t for t in typing.get_args(kind) if t is not type(None)), kind)
            kwargs["choices"] = f.metadata.get("choices")
        target.add_argument("--" + f.name.replace("_", "-"), **kwargs)


# A quoted value in a message (Python's repr of a str or path): option names inside it are left as they are.
QUOTED = r"'(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\""
# What follows an option's name where a message speaks of the option: its value (quoted, a number, None, True or
# False), or a rule about it.
OPTION_FOLLOWER = re.compile(r" (?:['\"]|-?\d|None\b|True\b|False\b|must |should )")


def flag_names(message: str, cls: type) -> str:
    """`message` (a config's refusal, which names its fields) with the option fields of `cls` spelled as the command
    line takes them: quantize_int8 -> --quantize-int8, "dtype 'float16'" -> "--dtype 'float16'". A name is taken
    for the option where it has an underscore, is followed by a value or a rule (OPTION_FOLLOWER) or follows "use ";
    elsewhere it is a word of the sentence ("no pretrained weights"). Quoted values and paths are left alone."""
    names = "|".join(re.escape(f.name) for f, _, _ in option_fields(cls) if not f.metadata.get("positional"))
    word_or_quoted = re.compile(rf"({QUOTED})|(?<![-\w/.])({names})(?![-\w/.])")

    def spelled(m: re.Match) -> str:
        name = m.group(2)
        if name is None:
            return m.group(1)
        option = "_" in name or message[: m.start()].endswith("use ") or OPTION_FOLLOWER.match(message, m.end())
        return "--" + name.replace("_", "-") if option else name

    return word_or_quoted.sub(spelled, message)


def build_parser(
    prog: str = "python -m training",
    description: str = "Fine-tune GPT-2 into a text classifier.",
    listed: dict[str, str] | None = None,
) -> argparse.ArgumentParser:
    """`prog` with one subcommand per entry of COMMANDS; `listed`: {name: help} of commands the caller runs itself
    (spamgpt's serve), shown beside them."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    commands = parser.add_subparsers(dest="command", required=True)
    for name, (command, cls) in COMMANDS.items():
        sub = commands.add_parser(
            name,
            aliases=ALIASES.get(name, []),
            help=command.__doc__.split("\n\n")[0],
            description=command.__doc__.split("\n\n")[0],
            formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        )
        add_options(sub, cls)
        sub.set_defaults(subparser=sub, command=name)  # the name, whichever alias was typed
    for name, text in (listed or {}).items():
        commands.add_parser(name, help=text, add_help=False)
    return parser


def main(argv: list[str] | None = None, parser: argparse.ArgumentParser | None = None) -> int:
    """Parse `argv` with `parser` (build_parser()'s by default), run the command; the exit status: 0 done, 1 failed
    (the message on stderr), 2 bad arguments, base weights that cannot be had or a base our model cannot compute."""
    namespace = vars((parser or build_parser()).parse_args(argv))
    command, cls = COMMANDS[namespace.pop("command")]
    subparser = namespace.pop("subparser")
    try:
        config = from_flat(cls, namespace)
    except ValueError as exc:
        subparser.error(flag_names(str(exc), cls))  # exits with status 2 after the usage line
    try:
        command(config)
    except UnsupportedBase as exc:
        print(f"error: the base model is not supported: {exc}", file=sys.stderr)
        return 2
    except WeightsError as exc:
        print(f"error: could not get the base GPT-2 weights: {exc}\n{WEIGHTS_HELP}", file=sys.stderr)
        return 2
    except ValueError as exc:  # an option found wrong once the run looks: a base's positions, emulated bfloat16, ...
        print(f"error: {flag_names(str(exc), cls)}", file=sys.stderr)
        return 1
    except (CheckpointError, NonFiniteLogits, TokenizerError, OSError, ImportError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0
