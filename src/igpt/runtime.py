"""Process setup shared by the `igpt` command and the benchmarks that measure it: the C allocator's settings."""

from __future__ import annotations

import ctypes
import os
import platform


def sets_the_allocator(name: str) -> bool:
    """Whether environment variable `name` is a user's choice of, or for, the C allocator."""
    return name in ("LD_PRELOAD", "GLIBC_TUNABLES") or name.startswith("MALLOC_")


def reuse_freed_memory() -> bool:
    """Have glibc keep the memory PyTorch frees for its next tensors (True where it did).

    By default glibc maps every large allocation afresh and unmaps it on free, so each step's activations are
    page-faulted in and zeroed by the kernel again; training steps and the probe's passes run faster without that.
    PyTorch's CPU guides give the same reason for jemalloc or tcmalloc, which pip cannot install: these are glibc's
    own settings (no large allocation by mmap; give memory back only past 1 GiB free). Left alone where the
    allocator is not glibc's or the user has tuned or replaced it.
    """
    if platform.libc_ver()[0] != "glibc" or any(map(sets_the_allocator, os.environ)):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_max = -1, -4  # glibc's malloc.h
    return bool(mallopt(m_mmap_max, 0)) and bool(mallopt(m_trim_threshold, 1 << 30))
