"""Configuration dataclasses and the command-line flags made from them.

Each concern (the data description, pretraining, fine-tuning) is one dataclass whose fields
carry their defaults and help text; `add_flags` turns the fields into argparse flags and
`from_flags` reads them back, so every default is written once, in the dataclass.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any

from igpt.errors import IgptError


def option(default: Any, help: str, **extra) -> Any:
    """A dataclass field with its flag's help text (and, optionally, `flag`, `choices`, `metavar`)."""
    return dataclasses.field(default=default, metadata={"help": help, **extra})


def _base_type(annotation) -> type:
    """int for `int | None`, and so on: the type argparse converts the flag's text to."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        return args[0]
    return annotation


def flag_name(field: dataclasses.Field) -> str:
    return field.metadata.get("flag", "--" + field.name.replace("_", "-"))


def add_flags(parser: argparse.ArgumentParser, cls: type, *, only: tuple[str, ...] | None = None,
              skip: tuple[str, ...] = (), inherit: str | None = None, defaults: dict | None = None) -> None:
    """A flag for each field of `cls` (in `only`, when given, and not in `skip`).

    `defaults`: this command's own defaults for some fields (the demo's data), in place of the field's.

    `inherit`: every default becomes None, shown as "default: <inherit>" (a later command that
    takes its settings from a run folder unless told otherwise); booleans then get --x/--no-x.
    """
    hints = typing.get_type_hints(cls)
    unknown = set(defaults or {}) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
        raise TypeError(f"add_flags: {cls.__name__} has no field {', '.join(sorted(unknown))}")
    for field in dataclasses.fields(cls):
        if field.name in skip or (only is not None and field.name not in only) or "help" not in field.metadata:
            continue
        kind = _base_type(hints[field.name])
        help_text = field.metadata["help"]
        default = (defaults or {}).get(field.name, field.default)
        if inherit is not None:
            help_text += f" (default: {inherit})"
        elif default is not None and kind is not bool:
            help_text += f" (default: {default})"
        kwargs: dict[str, Any] = {"dest": field.name, "help": help_text}
        if kind is bool:
            if inherit is not None or default:
                kwargs["action"] = argparse.BooleanOptionalAction
            else:
                kwargs["action"] = "store_true"
        else:
            kwargs["type"] = kind
            for key in ("choices", "metavar"):
                if key in field.metadata:
                    kwargs[key] = field.metadata[key]
        kwargs["default"] = None if inherit is not None else default
        parser.add_argument(flag_name(field), **kwargs)


def from_flags(cls: type, args: argparse.Namespace, **values):
    """An instance of `cls` from the parsed flags (those present in `args`), plus `values`."""
    names = {f.name for f in dataclasses.fields(cls)}
    given = {name: getattr(args, name) for name in names if hasattr(args, name)}
    return cls(**{**given, **values})


def given_flags(cls: type, args: argparse.Namespace) -> dict:
    """The fields of `cls` set on the command line of an `inherit` parser (those that are not None)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return {name: getattr(args, name) for name in names if getattr(args, name, None) is not None}


def check(checks: list[tuple[bool, str]]) -> None:
    """Raise the first failed check's message: one line naming the flag and what it must be."""
    for ok, message in checks:
        if not ok:
            raise IgptError(message)


def differences(saved: dict, now: dict, ignore: set[str] = frozenset()) -> list[str]:
    """`name A (run) vs B (now)` for every setting that differs between a saved run and this command."""
    return [f"{name} {saved.get(name)!r} (run) vs {value!r} (now)"
            for name, value in now.items() if name not in ignore and saved.get(name) != value]
