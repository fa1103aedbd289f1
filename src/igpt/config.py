"""Configuration dataclasses and the command-line flags made from them.

Each concern (the data description, pretraining, fine-tuning, sampling, the probe, ...) is one
dataclass whose fields carry their defaults and help text; `add_flags` turns the fields into
argparse flags and `from_flags` reads them back, so every default is written once, in the
dataclass. The options several commands share (device, seed; precision and split beside their
concerns) are written once as field factories.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from dataclasses import dataclass
from typing import Any

from igpt.errors import IgptError

MISSING = dataclasses.MISSING


def option(default: Any = MISSING, help: str = "", **flag) -> Any:
    """A dataclass field with its flag's help text. Without a default the flag must be given.

    `flag`: argparse's settings where the field's own do not do: `flag` (another name; without dashes, a
    positional argument), `type` (a converter), `choices`, `metavar`, `nargs`, `const`, and `exclusive`, the
    name of a group of which at most one flag is given (exactly one when the group's fields have no default).
    """
    return dataclasses.field(default=default, metadata={"help": help, **flag})


def device_option() -> Any:
    return option(None, "cpu | cuda (default: cuda when available)")


def seed_option(help: str = "seed of the random draws") -> Any:
    return option(0, help)


@dataclass(kw_only=True)
class RunFolderOptions:
    """Where a training command (train, finetune) writes its run folder, and whether it continues the one there."""

    out: str = option(help="run folder: a new one, or with --resume the run to continue")
    resume: bool = option(False, "continue the run in --out exactly")


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def positive_ints(text: str) -> tuple[int, ...]:
    """"4,25,100" -> (4, 25, 100)."""
    try:
        return tuple(sorted({positive_int(part) for part in text.split(",")}))
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"must be comma-separated positive integers, got {text}") from None


def _base_type(annotation) -> type:
    """int for `int | None` and for `tuple[int, ...]`: the type argparse converts the flag's text (or each word) to."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        return _base_type(args[0])
    if typing.get_origin(annotation) in (tuple, list):
        return args[0]
    return annotation


def flag_name(field: dataclasses.Field) -> str:
    return field.metadata.get("flag", "--" + field.name.replace("_", "-"))


def _default_text(default, kind, inherit: str | None) -> str:
    if inherit is not None:
        return f" (default: {inherit})"
    if default in (None, MISSING, ()) or kind is bool:
        return ""
    return f" (default: {default})"


def _settings(field: dataclasses.Field, kind: type, default, inherit: str | None) -> dict[str, Any]:
    """argparse's keyword arguments for one field's flag."""
    meta, positional = field.metadata, not flag_name(field).startswith("-")
    settings: dict[str, Any] = {"help": meta["help"] + _default_text(default, kind, inherit)}
    if not positional:
        settings["dest"] = field.name
    if kind is bool:
        settings["action"] = argparse.BooleanOptionalAction if inherit is not None or default else "store_true"
    else:
        settings["type"] = meta.get("type", kind)
        settings.update({key: meta[key] for key in ("choices", "metavar", "nargs", "const") if key in meta})
    if default is not MISSING or inherit is not None:
        settings["default"] = None if inherit is not None else default
    elif "exclusive" in meta:
        settings["default"] = None  # the group is required, not each of its flags
    elif not positional:
        settings["required"] = True
    return settings


def add_flags(parser: argparse.ArgumentParser, cls: type, *, only: tuple[str, ...] | None = None,
              skip: tuple[str, ...] = (), inherit: str | None = None, defaults: dict | None = None) -> None:
    """A flag for each field of `cls` that has help text (in `only`, when given, and not in `skip`).

    `defaults`: this command's own defaults for some fields (the demo's data), in place of the field's.

    `inherit`: every default becomes None, shown as "default: <inherit>" (a later command that
    takes its settings from a run folder unless told otherwise); booleans then get --x/--no-x.
    """
    hints = typing.get_type_hints(cls)
    unknown = set(defaults or {}) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
        raise TypeError(f"add_flags: {cls.__name__} has no field {', '.join(sorted(unknown))}")
    groups: dict[str, argparse._MutuallyExclusiveGroup] = {}
    for field in dataclasses.fields(cls):
        if field.name in skip or (only is not None and field.name not in only) or "help" not in field.metadata:
            continue
        default = (defaults or {}).get(field.name, field.default)
        target = parser
        if "exclusive" in field.metadata:
            name = field.metadata["exclusive"]
            if name not in groups:
                groups[name] = parser.add_mutually_exclusive_group(required=default is MISSING)
            target = groups[name]
        target.add_argument(flag_name(field), **_settings(field, _base_type(hints[field.name]), default, inherit))


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
