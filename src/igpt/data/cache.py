"""The on-disk cache of decoded and tokenised splits.

An entry is a folder of `.npy` arrays opened memory-mapped, plus `meta.json` written last.
It is built in a private temporary folder and renamed into place in one step, so an entry
either exists complete or not at all: whatever a killed process leaves behind is a
temporary folder, which is never read and is cleared by the next build.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Callable

import numpy as np

from igpt.data.sources import cache_root
from igpt.errors import IgptError

VERSION = 1


def entry_key(**parts) -> str:
    return hashlib.sha256(json.dumps({"version": VERSION, **parts}, sort_keys=True).encode()).hexdigest()[:24]


def read_entry(kind: str, key: str) -> dict | None:
    """The arrays of a complete entry (memory-mapped), or None when there is none or it is damaged."""
    folder = cache_root() / kind / key
    try:
        meta = json.loads((folder / "meta.json").read_text())
        arrays = {name: np.load(folder / f"{name}.npy", mmap_mode="r") for name in meta["arrays"]}
        if any(list(arrays[name].shape) != shape for name, shape in meta["arrays"].items()):
            raise ValueError("array shapes differ from meta.json")
    except (OSError, ValueError, KeyError, TypeError):
        if folder.exists():
            shutil.rmtree(folder, ignore_errors=True)  # damaged: rebuild
        return None
    return {"meta": meta, **arrays}


def build_entry(kind: str, key: str, build: Callable[[Path], dict]) -> dict:
    """Run `build(tmp_folder)` (which writes .npy files and returns meta), then publish atomically."""
    root = cache_root() / kind
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise IgptError(f"cannot create the cache folder {root} ({err.strerror}); set IGPT_CACHE to a writable folder") from None
    _clear_abandoned(root, key)
    tmp = root / f".tmp-{key}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        meta = build(tmp)
        meta["arrays"] = {p.stem: list(np.load(p, mmap_mode="r").shape) for p in sorted(tmp.glob("*.npy"))}
        (tmp / "meta.json").write_text(json.dumps(meta))
        try:
            os.rename(tmp, root / key)
        except OSError:  # another process published the same entry first
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    entry = read_entry(kind, key)
    if entry is None:
        raise IgptError(f"the cache entry {root / key} could not be written; check free space in {root}")
    return entry


def _clear_abandoned(root: Path, key: str) -> None:
    """Remove temporary folders of this entry left by processes that no longer run."""
    for leftover in root.glob(f".tmp-{key}-*"):
        try:
            pid = int(leftover.name.rsplit("-", 1)[1])
            os.kill(pid, 0)
            if pid == os.getpid():
                raise ProcessLookupError
        except (ValueError, ProcessLookupError):
            shutil.rmtree(leftover, ignore_errors=True)
        except PermissionError:
            pass
