"""Atomic file writes: a temporary file in the same folder, then a rename.

A reader (or a resumed run) sees either the old file or the new one, never half of one,
whatever kills the writer: SIGKILL, a full disk, a power cut.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Callable, IO

from igpt.errors import IgptError


def check_folder(path: str | os.PathLike) -> Path:
    """Refuse a path whose folder cannot be made because a file stands in its way: checkable before long work."""
    path = Path(path)
    blocking = next((p for p in path.parents if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise IgptError(f"cannot write {path}: {blocking} is a file, not a folder")
    return path


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> Path:
    """Call `write(f)` on a temporary file and rename it to `path` once complete and synced."""
    path = check_folder(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise IgptError(f"cannot write {path}: {err.strerror or err}; check the folder's permissions and free space") from None
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda f: f.write(text.encode()))


def atomic_write_json(path: str | os.PathLike, obj) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2) + "\n")
