"""Typed records from JSON: a dataclass, and the dataclasses it groups, built from one flat dict with every value's
type checked as JSON carries it. The checkpoint's card reads its records with it; fine-tuning reads a run's
arguments (training.config) with it."""

import types
import typing
from dataclasses import fields
from typing import Any


def from_flat(cls: type, values: dict[str, Any]) -> Any:
    """Build `cls` and its groups from a flat dict, such as a checkpoint's record of a run. Names it lacks keep
    their defaults (options added after the record was written); unknown names are ignored.

    Raises TypeError naming a value of the wrong type or a required name that is missing, ValueError from a
    group's validation.
    """
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in fields(cls):
        if f.metadata.get("group"):
            kwargs[f.name] = from_flat(hints[f.name], values)
        elif f.name in values:
            kwargs[f.name] = check_type(f.name, values[f.name], hints[f.name])
    return cls(**kwargs)


def check_type(name: str, value: Any, kind: Any) -> Any:
    """`value` if it is of type `kind` as JSON would carry it (an int passes as a float; a bool never passes as a
    number; `dict[str, int]` is checked as a dict); else TypeError naming `name`."""
    allowed = typing.get_args(kind) if isinstance(kind, types.UnionType) else (kind,)
    for t in (typing.get_origin(t) or t for t in allowed):
        if t is type(None) and value is None:
            return value
        if t in (int, float) and isinstance(value, bool):
            continue
        if isinstance(value, int | float if t is float else t):
            return value
    raise TypeError(f"{name} must be {getattr(kind, '__name__', kind)}, got {value!r}")
