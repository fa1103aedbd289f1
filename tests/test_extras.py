"""Extras that leave torch alone: each of pyproject's extras, installed as the README says (with the installed
torch pinned), resolves without installing or replacing torch, and any torchvision it brings is the release made
for that torch. pip's own dry run decides (`--dry-run --report`), so nothing in this environment changes; it needs
the package index, and skips where pip cannot reach it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

tomllib = pytest.importorskip("tomllib")  # Python 3.11 on
ROOT = Path(__file__).resolve().parent.parent
EXTRAS = sorted(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"])
UNREACHABLE = ("NewConnectionError", "Max retries exceeded", "Temporary failure in name resolution",
               "Network is unreachable", "Could not fetch URL", "No matching distribution found")


def keep_torch() -> str:
    """The README's pin beside an extra: the installed torch, build included (`2.13.0+cpu`)."""
    return f"torch=={torch.__version__}"


def dry_run(requirements: list[str], report: Path) -> dict:
    """What `pip install REQUIREMENTS` would install into this environment (pip's JSON report), or a skip."""
    done = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--report", str(report),
                           *requirements], capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        if any(sign in done.stderr for sign in UNREACHABLE):
            pytest.skip(f"pip cannot reach the package index: {done.stderr.strip().splitlines()[-1]}")
        pytest.fail(f"pip install --dry-run {' '.join(requirements)} failed:\n{done.stderr}")
    return json.loads(report.read_text())


def test_every_extra_is_checked():
    assert set(EXTRAS) == {"app", "fid", "hub", "tensorboard", "test"}


@pytest.mark.slow
@pytest.mark.parametrize("extra", EXTRAS)
def test_installing_an_extra_beside_torch_leaves_torch_alone(extra, tmp_path):
    report = dry_run(["-e", f"{ROOT}[{extra}]", keep_torch()], tmp_path / "report.json")
    installs = {canonicalize_name(item["metadata"]["name"]): item["metadata"] for item in report["install"]}
    assert "torch" not in installs, f"[{extra}] would install torch {installs.get('torch', {}).get('version')}"
    torch_version = Version(torch.__version__).base_version
    for name, metadata in installs.items():
        for text in metadata.get("requires_dist") or []:
            need = Requirement(text)
            if canonicalize_name(need.name) == "torch" and need.marker is None:
                assert need.specifier.contains(torch_version, prereleases=True), f"{name} needs {need}"
