"""The README guides, and the results live in dated documents: the README's length and sections, its
links and the documents' links, each document's date and the JSON of its figures beside it, and the
README's cheap commands and Python run as written, on the digits."""

from __future__ import annotations

import json
import re
import shlex
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
RESULTS = ROOT / "docs" / "results"
MAX_LINES = 320
SECTIONS = ["What it is", "Commands", "Quickstart on your own images", "Python API", "The released weights",
            "Multi-GPU and multi-node", "The code", "Headline results", "Development"]
HEADLINE_SECTION = "Headline results"
MACHINE_NAMES = ("EPYC", "Xeon", "H100", "H200")
LINKED = [README, *(ROOT / "docs" / name for name in ("guide.md", "design.md", "reference.md", "cli.md")),
          *sorted(RESULTS.glob("*.md"))]
DATE = re.compile(r"\b20\d\d-\d\d-\d\d\b")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")

OUTPUT_FLAGS = ("--out", "--json", "--animate")  # what a command writes, checked once it has run
SKIPPED = {  # the README's commands that do not run here: the first words of the command, and why
    ("train",): "sized to the data and the machine: minutes (the test's runs/mine is a tiny digits run)",
    ("finetune",): "minutes of training",
    ("classify",): "needs the fine-tuned run that igpt finetune makes",
    ("demo",): "minutes: the README's first command runs it",
    ("probe",): "fits every layer and both baselines: minutes on 2 shared cores (tests/test_probe.py probes)",
    ("serve",): "a server that runs until it is stopped (tests/test_serve.py drives it)",
    ("fid",): "torch-fidelity's Inception-v3 weights, downloaded from the network",
    ("convert", "--from-hf"): "downloads the released weights from the Hugging Face hub",
    ("sample", "--ckpt", "models/igpt-s"): "the released weights, converted from the hub",
}
PYTHON_SKIPPED = {"from_hf(": "reads the released weights from the hub or a download",
                  "linear_probe(": "fits every layer and both baselines: minutes on 2 shared cores"}


def text_outside_code(path: Path) -> list[str]:
    """The file's lines that are not inside a fenced code block."""
    lines, fenced = [], False
    for line in path.read_text().splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced:
            lines.append(line)
    return lines


def code_blocks(path: Path, language: str) -> list[str]:
    """The bodies of the file's fenced blocks in `language`."""
    return re.findall(rf"^```{language}\n(.*?)^```", path.read_text(), flags=re.M | re.S)


def sections(path: Path) -> dict[str, list[str]]:
    """The `##` sections of a markdown file: heading -> its lines (code blocks included)."""
    found, current = {}, None
    for line in path.read_text().splitlines():
        if line.startswith("## "):
            current = line[3:].strip()
            found[current] = []
        elif current is not None:
            found[current].append(line)
    return found


def anchor(heading: str) -> str:
    """GitHub's anchor for a markdown heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    return {anchor(line.lstrip("#")) for line in text_outside_code(path) if line.startswith("#")}


def test_the_readme_is_a_short_guide_in_the_agreed_order():
    lines = README.read_text().splitlines()
    assert len(lines) <= MAX_LINES
    assert list(sections(README)) == SECTIONS
    first_block = code_blocks(README, "bash")[0].splitlines()
    assert README.read_text().index(first_block[0]) < README.read_text().index("\n## ")
    assert first_block[1] in (ROOT / ".ci" / "run").read_text()


def test_the_readme_holds_no_log_entries_and_names_machines_only_in_its_headline_table():
    prose = [LINK.sub("", line) for line in text_outside_code(README)]
    assert not [line for line in prose if DATE.search(line)]
    assert not re.search(r"runs/\S*\.log", README.read_text())
    headline = set(sections(README)[HEADLINE_SECTION])
    named = [line for line in README.read_text().splitlines() if any(name in line for name in MACHINE_NAMES)]
    assert named and all(line in headline and line.startswith("|") for line in named)


@pytest.mark.parametrize("document", LINKED, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(document):
    for target in LINK.findall("\n".join(text_outside_code(document))):
        if re.match(r"[a-z]+:", target):
            continue
        path_part, _, fragment = target.partition("#")
        resolved = (document.parent / path_part).resolve() if path_part else document
        assert resolved.exists(), f"{document.name}: {target}"
        if fragment and resolved.suffix == ".md":
            assert fragment in anchors(resolved), f"{document.name}: {target}"


def test_every_result_document_is_dated_with_its_figures_beside_it_and_listed_in_the_index():
    documents = [p for p in RESULTS.glob("*.md") if p.name != "README.md"]
    assert documents
    index = (RESULTS / "README.md").read_text()
    for document in documents:
        assert DATE.match(document.name), document.name
        assert DATE.search("\n".join(document.read_text().splitlines()[:5])), document.name
        figures = json.loads(document.with_suffix(".json").read_text())
        assert figures, document.name
        assert f"]({document.name})" in index, document.name


def readme_commands() -> list[str]:
    """Every `igpt ...` command of the README's bash blocks, continuation lines joined."""
    commands = []
    for block in code_blocks(README, "bash"):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words[:1] == ["igpt"]:
                commands.append(shlex.join(words))
    return commands


def skip_reason(argv: list[str]) -> str | None:
    """Why the command cannot run here (None: it runs); `--help` always runs."""
    if "--help" in argv:
        return None
    return next((why for first, why in SKIPPED.items() if tuple(argv[:len(first)]) == first), None)


@pytest.fixture(scope="module")
def workdir(tiny_run, tmp_path_factory):
    """A folder laid out as the README's commands expect: runs/mine (the tiny digits run) and the photos they name."""
    import numpy as np
    from PIL import Image

    folder = tmp_path_factory.mktemp("readme")
    shutil.copytree(tiny_run, folder / "runs" / "mine")
    pixels = np.random.default_rng(0).integers(0, 256, (30, 40, 3), dtype=np.uint8)
    for name in ("photo.jpg", "cat.png", "photo1.jpg", "photo2.png"):
        Image.fromarray(pixels).save(folder / name)
    return folder


@pytest.mark.slow
@pytest.mark.parametrize("command", readme_commands())
def test_every_cheap_readme_command_runs_as_written(command, workdir, monkeypatch, capsys):
    from igpt.cli import main

    argv = shlex.split(command)[1:]
    if reason := skip_reason(argv):
        pytest.skip(reason)
    monkeypatch.chdir(workdir)
    try:
        code = main(argv)
    except SystemExit as exit_:
        code = exit_.code
    err = capsys.readouterr().err
    if argv == ["info"] and code == 2 and "invalid choice" in err:
        pytest.skip("igpt info is not in this tree yet")
    assert code in (0, None), f"{command}: {err}"
    outputs = [argv[i + 1] for i, word in enumerate(argv[:-1]) if word in OUTPUT_FLAGS]
    assert all((workdir / output).exists() for output in outputs), command


@pytest.mark.slow
@pytest.mark.parametrize("block", code_blocks(README, "python"), ids=lambda b: b.splitlines()[0][:40])
def test_the_readme_python_runs_as_written(block, workdir, monkeypatch):
    if reason := next((why for marker, why in PYTHON_SKIPPED.items() if marker in block), None):
        pytest.skip(reason)
    monkeypatch.chdir(workdir)
    exec(compile(block, "README.md", "exec"), {})
