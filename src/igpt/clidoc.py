"""The `igpt` command line as text, read from its parser: the reference (docs/cli.md), and the command that
makes a recorded run again.

    python -m igpt.clidoc docs/cli.md     rewrites the reference (without a path: prints it)

tests/test_cli_reference.py fails when docs/cli.md differs from what the parser says.
"""

from __future__ import annotations

import argparse
import shlex
import sys

REGENERATE = "python -m igpt.clidoc docs/cli.md"
KIND_COMMANDS = {"pretrain": "train", "finetune": "finetune"}  # run.json's kind: the command that makes such a run
RUN_PLACEHOLDER = "RUN"  # --out of a remade run: run.json does not record where it was written
STATED = ("name", "resolution")  # written out even where they are the defaults: what a reader looks for first


def _parser(parser: argparse.ArgumentParser | None) -> argparse.ArgumentParser:
    if parser is not None:
        return parser
    from igpt.cli import build_parser

    return build_parser()


def commands(parser: argparse.ArgumentParser | None = None,
             prefix: str = "") -> list[tuple[str, str, argparse.ArgumentParser]]:
    """(name, help, parser) of every command, in the parser's order: "train", "palette fit", ..."""
    out = []
    for action in _parser(parser)._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {choice.dest: choice.help or "" for choice in action._choices_actions}
            for name, sub in action.choices.items():
                nested = commands(sub, f"{prefix}{name} ")
                out.extend(nested or [(prefix + name, helps.get(name, ""), sub)])
    return out


# ---- the reference ----------------------------------------------------------------------------
def cell(text: str) -> str:
    """Text that stays one markdown table cell and shows as written."""
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("<", "&lt;").replace("*", "\\*").replace("\n", " ")


def invocation(action: argparse.Action) -> str:
    """How a flag is written: `--steps STEPS`, `--crop, --no-crop`, `IMAGES [IMAGES ...]`."""
    if action.option_strings and action.nargs == 0:
        return ", ".join(action.option_strings)
    if action.metavar is not None:
        metavar = action.metavar
    elif action.choices is not None:
        metavar = "{" + ",".join(map(str, action.choices)) + "}"
    else:
        metavar = action.dest.upper()
    value = {None: metavar, "?": f"[{metavar}]", "*": f"[{metavar} ...]", "+": f"{metavar} [{metavar} ...]"}.get(
        action.nargs, " ".join([metavar] * action.nargs) if isinstance(action.nargs, int) else metavar)
    return " ".join([action.option_strings[0], value]) if action.option_strings else value


def default_and_help(action: argparse.Action) -> tuple[str, str]:
    """(default, help): the default the help text states (igpt.config writes it last, "(default: X)"), else the
    one argparse holds; "required" for a flag that must be given."""
    text = action.help or ""
    head, marker, tail = text.rpartition(" (default: ")
    if marker and tail.endswith(")"):
        return tail[:-1], head
    if action.required or (not action.option_strings and action.nargs not in ("?", "*")):
        return "required", text
    if action.nargs == 0:
        return ("on" if action.default else "off"), text
    return ("—" if action.default is None else str(action.default)), text


def _exclusive_groups(command: argparse.ArgumentParser) -> list[str]:
    lines = []
    for group in command._mutually_exclusive_groups:
        names = ", ".join(f"`{a.option_strings[0]}`" for a in group._group_actions)
        lines.append(f"{'Exactly' if group.required else 'At most'} one of {names}.")
    return lines


def command_section(name: str, help_text: str, command: argparse.ArgumentParser) -> list[str]:
    lines = [f"## igpt {name}", "", help_text[:1].upper() + help_text[1:] + ".", "",
             "| flag | default | what it sets |", "|---|---|---|"]
    for action in command._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        default, text = default_and_help(action)
        lines.append(f"| `{cell(invocation(action))}` | {cell(default)} | {cell(text)} |")
    groups = _exclusive_groups(command)
    return lines + ([""] + groups if groups else []) + [""]


def reference_markdown(parser: argparse.ArgumentParser | None = None) -> str:
    """docs/cli.md: a table of the commands, then each command's flags with their defaults and help."""
    parser = _parser(parser)
    listed = commands(parser)
    lines = [f"_Generated from the `igpt` parser by `{REGENERATE}`; do not edit._", "", "# igpt command reference", "",
             "`igpt --version` prints the version; `igpt COMMAND --help` prints a command's flags, as below.", "",
             "| command | what it does |", "|---|---|"]
    lines += [f"| [`igpt {name}`](#igpt-{name.replace(' ', '-')}) | {cell(text)} |" for name, text, _ in listed]
    lines.append("")
    for name, text, command in listed:
        lines += command_section(name, text, command)
    return "\n".join(lines)


# ---- the command that makes a run again ------------------------------------------------------
def _flag_words(action: argparse.Action, value) -> list[str]:
    """The words that set `action`'s value to `value` (none where the default already gives it, but for STATED)."""
    if value is None or (value == action.default and action.dest not in STATED):
        return []
    if action.nargs == 0:
        if isinstance(action, argparse.BooleanOptionalAction):
            return [action.option_strings[0 if value else 1]]
        return [action.option_strings[0]] if value else []
    if isinstance(value, (list, tuple)):
        values = [str(v) for v in value] if action.nargs in ("*", "+") else [",".join(map(str, value))]
    else:
        values = [str(value)]
    return [action.option_strings[0], *values]


def remaking_command(record: dict, parser: argparse.ArgumentParser | None = None) -> str | None:
    """The `igpt train` (or `igpt finetune`) command, with --out RUN_PLACEHOLDER, whose flags give the settings a
    run.json records; None for a record no command makes."""
    name = KIND_COMMANDS.get(record.get("kind"))
    if name is None:
        return None
    command = next(sub for listed, _, sub in commands(_parser(parser)) if listed == name)
    values = {**(record.get("data") or {}), **(record.get("config") or {}), "ckpt": record.get("source"),
              "out": RUN_PLACEHOLDER}
    words = ["igpt", name]
    for action in command._actions:
        if action.option_strings and action.dest in values:
            words += _flag_words(action, values[action.dest])
    return shlex.join(words)


def main(argv: list[str] | None = None) -> int:
    from igpt.fileio import atomic_write_text

    args = sys.argv[1:] if argv is None else argv
    text = reference_markdown() + "\n"
    if not args:
        sys.stdout.write(text)
        return 0
    atomic_write_text(args[0], text)
    print(f"wrote {args[0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
