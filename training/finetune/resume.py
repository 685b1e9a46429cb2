"""The state of an interrupted fine-tune, kept beside its output so that `--resume` continues it.

    .<out>.resume/state.json              the commit record: epoch, history, best loss, optimizer layout, RNG keys,
                                          the run's arguments and data fingerprint, and which tensor file is current
    .<out>.resume/epoch-NNNN.safetensors  trainable weights, best weights, optimizer moments, RNG states (uint8)

Tensors in safetensors, everything else in JSON: nothing here unpickles. Each epoch writes a new tensor file, then
replaces state.json (write, fsync, rename): a process killed at any moment leaves the previous epoch's state or the
new one, never a mix. The loop (training.finetune.loop) produces and consumes TrainState; this module only stores it.
"""

import json
import os
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from training.config import changed_options
from training.finetune.loop import History, TrainState
from training.runtime.tokenizer import file_problem

STATE_FORMAT = 1
STATE_FILE = "state.json"


class ResumeError(ValueError):
    """Saved state that this run cannot continue from; the message says which file and why."""


def state_dir(out: str | Path) -> Path:
    """Where the resume state of a run writing `out` lives: `.<name>.resume` beside it."""
    out = Path(out)
    return out.with_name(f".{out.name}.resume")


def save_state(directory: Path, state: TrainState, record: dict) -> None:
    """Store `state` in `directory` (created if needed), atomically, with `record` (the run's arguments and data,
    JSON values) for load_state to compare; the previous epoch's tensor file is removed once replaced."""
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {f"weights.{k}": v for k, v in state.weights.items()}
    best_is_current = state.history.best_epoch == state.epoch  # then the best weights are the weights
    if not best_is_current:
        tensors |= {f"best.{k}": v for k, v in state.best_weights.items()}
    tensors |= {f"rng.{k}": v for k, v in state.rng.items()}
    optimizer_state = {}
    for index, values in state.optimizer["state"].items():
        optimizer_state[str(index)] = {}
        for key, value in values.items():
            if torch.is_tensor(value):
                name = f"optimizer.{index}.{key}"
                tensors[name] = value
                value = {"tensor": name}
            optimizer_state[str(index)][key] = value
    tensor_file = f"epoch-{state.epoch:04d}.safetensors"
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    _write_atomically(directory / tensor_file, lambda tmp: save_file(tensors, tmp))
    meta = {
        "format": STATE_FORMAT,
        "epoch": state.epoch,
        "tensors": tensor_file,
        "record": record,
        "best_loss": state.best_loss,
        "best_is_current": best_is_current,
        "history": state.history.to_json(),
        "step_losses": state.history.step_losses,
        "optimizer": {"state": optimizer_state, "param_groups": state.optimizer["param_groups"]},
        "rng": sorted(state.rng),
    }
    _write_atomically(directory / STATE_FILE, lambda tmp: tmp.write_text(json.dumps(meta, indent=1) + "\n"))
    for old in directory.glob("epoch-*.safetensors"):
        if old.name != tensor_file:
            old.unlink()


def load_state(directory: Path, record: dict) -> TrainState | None:
    """The state saved in `directory`, or None when there is none.

    Raises ResumeError when it was saved by a run with other arguments or data than `record` (naming them), or
    when its files are unreadable or inconsistent.
    """
    file = directory / STATE_FILE
    if not file.is_file():
        return None
    try:
        meta = json.loads(file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ResumeError(f"{file}: not valid JSON ({exc})") from exc
    if not isinstance(meta, dict) or meta.get("format") != STATE_FORMAT:
        raise ResumeError(f"{file}: not a resume state this spamgpt reads (format {STATE_FORMAT})")
    recorded = meta["record"]
    changed = changed_options(record["arguments"], recorded["arguments"])
    if changed:
        was = ", ".join(f"{k} {recorded['arguments'].get(k)!r} -> {record['arguments'].get(k)!r}" for k in changed)
        raise ResumeError(
            f"{directory} holds the state of a run with other arguments ({was}); resume with the same arguments, "
            "or pass --overwrite without --resume to start over"
        )
    if recorded["data"] != record["data"]:
        raise ResumeError(
            f"{directory} holds the state of a run on other data (sha256 {recorded['data'].get('sha256')}, this "
            f"data {record['data'].get('sha256')}); resume on the same data, or pass --overwrite without --resume "
            "to start over"
        )
    tensor_file = directory / meta["tensors"]
    if problem := file_problem(tensor_file):  # a FIFO would block the read until something wrote to it
        raise ResumeError(f"{tensor_file}: {problem}")
    try:
        tensors = load_file(tensor_file)
    except Exception as exc:  # safetensors raises its own error types for truncation and bad headers
        raise ResumeError(f"{tensor_file}: not a readable safetensors file ({exc})") from exc

    def group(prefix: str) -> dict[str, torch.Tensor]:
        return {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)}

    try:
        optimizer_state = {
            int(index): {k: tensors[v["tensor"]] if isinstance(v, dict) else v for k, v in values.items()}
            for index, values in meta["optimizer"]["state"].items()
        }
        rng = {name: tensors[f"rng.{name}"] for name in meta["rng"]}
    except KeyError as exc:
        raise ResumeError(f"{tensor_file}: missing tensor {exc.args[0]!r} that {file} names") from exc
    weights = group("weights.")
    try:
        history = History.from_json(meta["history"], meta["step_losses"])
    except (KeyError, TypeError) as exc:
        raise ResumeError(f"{file}: the history is not a spamgpt training history ({exc!r})") from exc
    return TrainState(
        epoch=meta["epoch"],
        weights=weights,
        optimizer={"state": optimizer_state, "param_groups": meta["optimizer"]["param_groups"]},
        rng=rng,
        best_loss=meta["best_loss"],
        best_weights=weights if meta["best_is_current"] else group("best."),
        history=history,
    )


def _write_atomically(file: Path, write: Callable[[Path], object]) -> None:
    """Write `file` through a temporary file beside it, flushed to disk, then renamed over it."""
    tmp = file.with_name(f".{file.name}.tmp")
    write(tmp)
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, file)
    directory = os.open(file.parent, os.O_RDONLY)
    try:
        os.fsync(directory)  # the rename itself survives a power cut
    finally:
        os.close(directory)
