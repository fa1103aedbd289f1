"""The command line's own process settings."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

FAULTS_OF_A_LATER_TENSOR = """
import resource, sys, torch
if sys.argv[1] == "reuse":
    from igpt.runtime import reuse_freed_memory
    assert reuse_freed_memory()
for _ in range(3):  # 64 MiB, freed at once; the heap settles within a couple of rounds
    torch.ones(64 << 18).sum()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
torch.ones(64 << 18).sum()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's allocator settings")
def test_the_command_line_reuses_freed_memory_instead_of_faulting_in_fresh_pages():
    from igpt.runtime import sets_the_allocator

    untuned = {k: v for k, v in os.environ.items() if not sets_the_allocator(k)}

    def faults(mode: str, env: dict) -> int:
        out = subprocess.run([sys.executable, "-c", FAULTS_OF_A_LATER_TENSOR, mode], capture_output=True, text=True,
                             check=True, env=env)
        return int(out.stdout)

    pages = (64 << 20) // 4096
    assert faults("default", untuned) > pages // 2  # glibc maps the 64 MiB afresh: every page faults again
    assert faults("reuse", untuned) < pages // 10  # the heap kept the earlier tensors' pages


def test_a_users_own_allocator_settings_are_left_alone(monkeypatch):
    from igpt.runtime import reuse_freed_memory

    monkeypatch.setenv("MALLOC_ARENA_MAX", "2")
    assert reuse_freed_memory() is False


def test_the_igpt_executable_is_the_command_with_its_process_settings():
    from importlib.metadata import entry_points

    (script,) = [e for e in entry_points(group="console_scripts") if e.name == "igpt"]
    assert script.value == "igpt.cli:command"
