"""The `igpt` command reference (docs/cli.md), written from the parser.

    python -m igpt.clidoc docs/cli.md     rewrites the reference (without a path: prints it)

tests/test_cli_reference.py fails when docs/cli.md differs from what the parser says.
"""

from __future__ import annotations

import argparse
import sys

from igpt.cli import build_parser, command_parsers

REGENERATE = "python -m igpt.clidoc docs/cli.md"


# ---- the reference ----------------------------------------------------------------------------
def cell(text: str) -> str:
    """Text that stays one markdown table cell and shows as written."""
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("<", "&lt;").replace("*", "\\*").replace("\n", " ")


def invocation(action: argparse.Action) -> str:
    """How a flag is written: `--steps STEPS`, `--crop, --no-crop`, `IMAGES [IMAGES ...]`."""
    if action.option_strings and action.nargs == 0:
        return ", ".join(action.option_strings)
    value = argparse.HelpFormatter("igpt")._format_args(action, action.dest.upper())  # as --help writes it
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


def reference_markdown() -> str:
    """docs/cli.md: a table of the commands, then each command's flags with their defaults and help."""
    listed = command_parsers(build_parser())
    lines = [f"_Generated from the `igpt` parser by `{REGENERATE}`; do not edit._", "", "# igpt command reference", "",
             "`igpt --version` prints the version; `igpt COMMAND --help` prints a command's flags, as below.", "",
             "| command | what it does |", "|---|---|"]
    lines += [f"| [`igpt {name}`](#igpt-{name.replace(' ', '-')}) | {cell(text)} |" for name, text, _ in listed]
    lines.append("")
    for name, text, command in listed:
        lines += command_section(name, text, command)
    return "\n".join(lines)


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
