"""The command line's own process settings."""

from __future__ import annotations

import subprocess
import sys

import pytest

FAULTS_OF_A_SECOND_TENSOR = """
import resource, sys, torch
if sys.argv[1] == "reuse":
    from igpt.cli import reuse_freed_memory
    assert reuse_freed_memory()
torch.ones(64 << 18).sum()  # 64 MiB, freed at once
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
torch.ones(64 << 18).sum()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator settings")
def test_the_command_line_reuses_freed_memory_instead_of_faulting_in_fresh_pages():
    def faults(mode: str) -> int:
        out = subprocess.run([sys.executable, "-c", FAULTS_OF_A_SECOND_TENSOR, mode], capture_output=True, text=True,
                             check=True)
        return int(out.stdout)

    pages = (64 << 20) // 4096
    assert faults("default") > pages // 2  # glibc maps the 64 MiB afresh: every page faults again
    assert faults("reuse") < pages // 10  # the heap kept the first tensor's pages
