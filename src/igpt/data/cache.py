"""The on-disk cache of decoded and tokenised splits.

An entry is a folder of `.npy` arrays opened memory-mapped, plus `meta.json` written last.
It is built in a private folder and renamed into place in one step, so an entry either
exists complete or not at all: a half-built folder is never read.

Entries with one row per image (pixels, tokens) are built in chunks of rows (`build_rows`): worker
processes on every core compute chunks (decoding, resizing), and this process encodes each (one
palette's colour table for all) and writes its rows into the memory-mapped arrays of the build
folder (`.part-KEY`); `progress.json` there, replaced atomically after each chunk, lists the chunks
done. A build that is killed resumes from that list; one that stops on bad data removes its folder.
Builders of one entry take turns on a lock file beside it.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import fcntl
import hashlib
import json
import math
import multiprocessing
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from igpt.data.sources import cache_root
from igpt.errors import IgptError
from igpt.fileio import atomic_write_json

VERSION = 2  # 2: tokens entries hold their labels and resolution, and are built straight from the source
CHUNK_BYTES = 1 << 25  # output bytes per chunk of a row build: what a kill can lose, and each worker's buffer
PROGRESS = "progress.json"
KEPT = "kept"  # the array of a row build that says which rows were written (skipped unreadable images are not)


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


def _kind_folder(kind: str) -> Path:
    root = cache_root() / kind
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise IgptError(f"cannot create the cache folder {root} ({err.strerror}); "
                        "set IGPT_CACHE to a writable folder") from None
    return root


def _publish(folder: Path, kind: str, key: str, meta: dict) -> dict:
    """Describe the arrays in `folder` in its meta.json, rename it to the entry `key`, and open that."""
    root = folder.parent
    meta["arrays"] = {p.stem: list(np.load(p, mmap_mode="r").shape) for p in sorted(folder.glob("*.npy"))}
    (folder / "meta.json").write_text(json.dumps(meta))
    try:
        os.rename(folder, root / key)
    except OSError:  # another process published the same entry first
        shutil.rmtree(folder, ignore_errors=True)
    entry = read_entry(kind, key)
    if entry is None:
        raise IgptError(f"the cache entry {root / key} could not be written; check free space in {root}")
    return entry


def build_entry(kind: str, key: str, build: Callable[[Path], dict]) -> dict:
    """Run `build(tmp_folder)` (which writes .npy files and returns meta), then publish atomically."""
    root = _kind_folder(kind)
    _clear_abandoned(root, key)
    tmp = root / f".tmp-{key}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        return _publish(tmp, kind, key, build(tmp))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


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


def gather_rows(array: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """`array[rows]`, read from the file with pread where `array` is a whole memory-mapped .npy: the rows come
    through the page cache without being mapped into this process, so a run that samples rows at random for
    long does not come to hold the file's pages resident (the kernel maps the pages around each one it faults)."""
    path = getattr(array, "filename", None)
    rows = np.asarray(rows)
    if path is None or not array.flags.c_contiguous or rows.ndim != 1 or array.ndim < 1:
        return np.asarray(array[rows])
    try:
        whole = array.offset + array.nbytes == os.path.getsize(path)
    except OSError:
        whole = False
    if not whole:  # a view of part of the file: its offset is the file's, not its own
        return np.asarray(array[rows])
    rows = np.where(rows < 0, rows + len(array), rows)
    if len(rows) and not (0 <= rows.min() and rows.max() < len(array)):
        raise IndexError(f"rows outside 0..{len(array) - 1}")
    row_bytes = array[:1].nbytes
    fd = os.open(path, os.O_RDONLY)
    try:
        raw = b"".join(os.pread(fd, row_bytes, array.offset + row * row_bytes) for row in rows.tolist())
    finally:
        os.close(fd)
    return np.frombuffer(raw, array.dtype).reshape(len(rows), *array.shape[1:]).copy()


# ---- entries built a chunk of rows at a time ------------------------------------------------------
@dataclass
class Rows:
    """What a chunk computes: its arrays (the kept rows only), which rows were kept, why the first was not."""

    arrays: dict[str, np.ndarray]
    kept: np.ndarray | None = None  # bool per row of the chunk; None: all
    error: str | None = None


@dataclass
class RowBuild:
    """An entry of `rows` rows in `columns` (name -> dtype, shape of a row).

    `compute(start, stop)` gives rows start:stop, in one of `workers` worker processes (none: in this process);
    `encode` turns its arrays into the columns' in this process. `pieces` are row boundaries a chunk must not cross, each piece
    then one chunk (a source read whole, such as a pickled batch file). `finish(folder, kept, first_error)` adds
    files (labels) and returns meta once every chunk is in and the skipped rows are gone.
    """

    rows: int
    columns: dict[str, tuple]
    compute: Callable[[int, int], Rows]
    finish: Callable[[Path, np.ndarray, str | None], dict]
    encode: Callable[[dict], dict] | None = None
    pieces: list[int] | None = None
    workers: int = 0

    def chunks(self) -> list[list[int]]:
        if self.pieces is not None:
            edges = sorted({0, self.rows, *(p for p in self.pieces if 0 < p < self.rows)})
            return [[a, b] for a, b in zip(edges, edges[1:])]
        row_bytes = sum(np.dtype(dtype).itemsize * math.prod(shape) for dtype, shape in self.columns.values())
        size = max(1, CHUNK_BYTES // max(1, row_bytes))
        if self.workers > 0:  # several chunks per worker, so that none waits on the last
            size = min(size, max(1, math.ceil(self.rows / (4 * self.workers))))
        return [[a, min(a + size, self.rows)] for a in range(0, self.rows, size)]


def build_rows(kind: str, key: str, build: RowBuild) -> dict:
    """The entry `key`, built by `build` if no other process has finished it; resumes a build that was killed."""
    root = _kind_folder(kind)
    folder = root / f".part-{key}"
    with _turn(root / f".part-{key}.lock"):
        entry = read_entry(kind, key)
        if entry is not None:
            return entry
        try:
            progress = _open_progress(folder, build)
            for i, rows in _computed(build, progress):
                progress["done"][str(i)] = _write_chunk(build, folder, *progress["chunks"][i], rows)
                atomic_write_json(folder / PROGRESS, progress)
            meta = _finish(folder, build, progress)
        except IgptError:
            shutil.rmtree(folder, ignore_errors=True)  # bad data: nothing to resume
            raise
        return _publish(folder, kind, key, meta)


@contextlib.contextmanager
def _turn(path: Path):
    """Hold the flock on `path`, waiting while another process holds it; the file goes when we are done."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            if os.path.samestat(os.fstat(fd), os.stat(path)):
                break
        except FileNotFoundError:  # its last holder removed it after we opened it
            pass
        os.close(fd)
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            path.unlink()
        os.close(fd)


def _open_progress(folder: Path, build: RowBuild) -> dict:
    """The progress of an interrupted build of this entry, or a fresh build folder with empty arrays."""
    spec = {"rows": build.rows, "columns": {name: [np.dtype(dtype).str, list(shape)]
                                            for name, (dtype, shape) in build.columns.items()}}
    try:
        progress = json.loads((folder / PROGRESS).read_text())
        if progress["spec"] == spec and all((folder / f"{name}.npy").is_file() for name in [*spec["columns"], KEPT]):
            return progress
    except (OSError, ValueError, KeyError, TypeError):
        pass
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    for name, (dtype, shape) in [*build.columns.items(), (KEPT, (bool, ()))]:
        np.lib.format.open_memmap(folder / f"{name}.npy", mode="w+", dtype=dtype, shape=(build.rows, *shape))
        _reserve(folder / f"{name}.npy")
    progress = {"spec": spec, "chunks": build.chunks(), "done": {}}
    atomic_write_json(folder / PROGRESS, progress)
    return progress


def _reserve(path: Path) -> None:
    """Give the (sparse) array file its disk space now: a full disk is then one clear error, not a worker killed
    by SIGBUS when it writes into a page the file system cannot back."""
    fd = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, os.fstat(fd).st_size)
    except OSError as err:
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            raise IgptError(f"no room for the cache's {os.fstat(fd).st_size:,}-byte {path.name} in "
                            f"{path.parent.parent}: free space there, or set IGPT_CACHE to a folder with more"
                            ) from None
    finally:
        os.close(fd)


_JOB: tuple | None = None  # (build, chunks), inherited by forked workers


def _computed(build: RowBuild, progress: dict) -> Iterator[tuple[int, Rows]]:
    """(chunk index, its rows) for each chunk not yet done, in order; worker processes compute a few chunks ahead
    (two each: enough to keep them busy, few enough to bound what waits in memory)."""
    global _JOB
    chunks = progress["chunks"]
    todo = [i for i in range(len(chunks)) if str(i) not in progress["done"]]
    workers = min(build.workers, len(todo))
    if workers < 1 or "fork" not in multiprocessing.get_all_start_methods():
        yield from ((i, build.compute(*chunks[i])) for i in todo)
        return
    _JOB = (build, chunks)
    try:
        with _torch_threads(max(1, cores() - workers)), \
                multiprocessing.get_context("fork").Pool(workers, initializer=_one_thread) as pool:
            waiting = collections.deque((i, pool.apply_async(_pooled_chunk, (i,))) for i in todo[: 2 * workers])
            for i in todo[2 * workers :] + [None] * len(waiting):
                done, result = waiting.popleft()
                if i is not None:
                    waiting.append((i, pool.apply_async(_pooled_chunk, (i,))))
                yield done, result.get()
    finally:
        _JOB = None


def cores() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _one_thread() -> None:
    """A worker computes on one core: the pool is the parallelism."""
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(1)


@contextlib.contextmanager
def _torch_threads(count: int):
    """PyTorch's threads (the palette's nearest-colour search) set to `count` while worker processes hold the other
    cores: a core asked for by two busy processes slows both."""
    torch = sys.modules.get("torch")
    before = torch.get_num_threads() if torch is not None else None
    if torch is not None:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        if torch is not None:
            torch.set_num_threads(before)


def _pooled_chunk(i: int) -> Rows:
    build, chunks = _JOB
    return build.compute(*chunks[i])


def _write_chunk(build: RowBuild, folder: Path, start: int, stop: int, rows: Rows) -> list:
    """Encode rows start:stop and write them into the build's arrays, synced to disk before this returns
    [rows skipped, first error]."""
    kept = np.ones(stop - start, bool) if rows.kept is None else rows.kept
    if kept.any():
        where = slice(start, stop) if kept.all() else start + np.flatnonzero(kept)
        arrays = rows.arrays if build.encode is None else build.encode(rows.arrays)
        for name, values in arrays.items():
            out = np.load(folder / f"{name}.npy", mmap_mode="r+")
            out[where] = values
            out.flush()
    mask = np.load(folder / f"{KEPT}.npy", mmap_mode="r+")
    mask[start:stop] = kept
    mask.flush()
    return [int((~kept).sum()), rows.error]


def _finish(folder: Path, build: RowBuild, progress: dict) -> dict:
    """Drop the skipped rows' slots, then let the build add its files and meta."""
    kept = np.load(folder / f"{KEPT}.npy")
    if not kept.all():
        index = np.flatnonzero(kept)
        for name in build.columns:
            source = np.load(folder / f"{name}.npy", mmap_mode="r")
            step = max(1, CHUNK_BYTES // max(1, source[:1].nbytes))
            trimmed = np.lib.format.open_memmap(folder / "trim.npy", mode="w+", dtype=source.dtype,
                                                shape=(len(index), *source.shape[1:]))
            for a in range(0, len(index), step):
                trimmed[a : a + step] = source[index[a : a + step]]
            trimmed.flush()
            del source, trimmed
            os.replace(folder / "trim.npy", folder / f"{name}.npy")
    (folder / f"{KEPT}.npy").unlink()
    (folder / PROGRESS).unlink()
    errors = [progress["done"][str(i)][1] for i in range(len(progress["chunks"]))]
    return build.finish(folder, kept, next((e for e in errors if e), None))
