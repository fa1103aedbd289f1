"""docs/cli.md is the parser's own account of the command line, and cannot drift from it."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest

from igpt.cli import build_parser, command_parsers, remaking_command
from igpt.clidoc import REGENERATE, cell, default_and_help, invocation, reference_markdown

REFERENCE = Path(__file__).parents[1] / "docs" / "cli.md"


def test_docs_cli_md_is_what_the_parser_says():
    if REFERENCE.read_text() != reference_markdown() + "\n":
        pytest.fail(f"docs/cli.md is out of date with the igpt parser: run `{REGENERATE}`", pytrace=False)


def test_the_reference_has_every_command_and_every_flag_with_its_default():
    text = reference_markdown()
    listed = command_parsers(build_parser())
    assert {"train", "palette fit", "convert", "info", "probe", "demo"} <= {name for name, _, _ in listed}
    for name, _, command in listed:
        section = text.split(f"\n## igpt {name}\n")[1].split("\n## ")[0]
        for action in command._actions:
            if action.option_strings != ["-h", "--help"]:
                row = f"| `{cell(invocation(action))}` | {cell(default_and_help(action)[0])} |"
                assert row in section, (name, row)
    train = text.split("\n## igpt train\n")[1].split("\n## ")[0]
    assert "| `--out OUT` | required | run folder" in train and "| `--seed SEED` | 0 | seed " in train
    assert "| `--quiet` | off | for scripts" in train and "| `--resume` | off |" in train
    assert "Exactly one of `--from-hf`, `--to-hf`." in text


def test_a_default_the_help_states_is_taken_from_it_and_a_switch_reads_on_or_off():
    import argparse

    parser = argparse.ArgumentParser()
    stated = parser.add_argument("--warmup", help="warm-up steps (default: about one epoch)")
    switch = parser.add_argument("--crop", action="store_true", help="centre-crop")
    assert default_and_help(stated) == ("about one epoch", "warm-up steps")
    assert default_and_help(switch) == ("off", "centre-crop")


def test_the_command_that_remakes_a_run_parses_back_to_its_recorded_settings(tiny_run):
    from igpt.runrecord import read_record

    record = read_record(tiny_run)
    command = remaking_command(record)
    words = shlex.split(command)
    assert words[:2] == ["igpt", "train"] and words[-2:] == ["--out", "RUN"]
    args = build_parser().parse_args(words[1:])
    for name, value in {**record["data"], **record["config"]}.items():
        if hasattr(args, name):
            parsed = getattr(args, name)
            assert (list(parsed) if isinstance(parsed, tuple) else parsed) == value, name
    assert remaking_command({"kind": None}) is None
