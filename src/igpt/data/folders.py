"""Image folders (`class/file`, `split/class/file`), archives of them, and `.npz` arrays.

Archives are read in place, streaming members in file order, never unpacked to disk.
"""

from __future__ import annotations

import hashlib
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Callable, Iterator

import numpy as np

from igpt.data.images import IMAGE_SUFFIXES
from igpt.data.sources import Native, Split
from igpt.errors import IgptError

SPLIT_NAMES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}


@dataclass
class FileSplit:
    """One split's encoded image files: `read(indices)` yields (name, bytes or path) in index order."""

    names: list[str]
    labels: np.ndarray | None
    read: Callable[[list[int]], Iterator[tuple[str, bytes | Path]]]


def _layout(paths: list[str]) -> tuple[dict[str, list[int]], list[str | None], list[str] | None]:
    """Split membership, class of each file, and class names, from relative paths."""
    parts = [PurePosixPath(p).parts for p in paths]
    while parts and len({p[0] for p in parts}) == 1 and parts[0][0] not in SPLIT_NAMES and min(map(len, parts)) > 2:
        parts = [p[1:] for p in parts]  # a wrapper folder around the real tree
    by_split = all(len(p) >= 2 and p[0] in SPLIT_NAMES for p in parts)
    splits: dict[str, list[int]] = {}
    classes_of: list[str | None] = []
    for i, p in enumerate(parts):
        split = SPLIT_NAMES[p[0]] if by_split else "train"
        rest = p[1:] if by_split else p
        splits.setdefault(split, []).append(i)
        classes_of.append(rest[0] if len(rest) >= 2 else None)
    labelled = all(c is not None for c in classes_of)
    classes = sorted({c for c in classes_of if c is not None}) if labelled else None
    return splits, classes_of if labelled else [None] * len(paths), classes


def _native_from_files(paths: list[str], reader, identity: str, where: str) -> Native:
    if not paths:
        raise IgptError(f"{where} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))}): check the path")
    splits, classes_of, classes = _layout(paths)
    index = {c: i for i, c in enumerate(classes or [])}
    native = {}
    for split, members in splits.items():
        labels = np.array([index[classes_of[i]] for i in members], dtype=np.int64) if classes else None
        native[split] = FileSplit([paths[i] for i in members], labels, _subset_reader(reader, members))
    return Native(native, classes, identity)


def _subset_reader(reader, members: list[int]):
    def read(indices: list[int]):
        return reader([members[i] for i in indices])

    return read


def is_image(name: str) -> bool:
    p = PurePosixPath(name)
    return p.suffix.lower() in IMAGE_SUFFIXES and not any(part.startswith(".") for part in p.parts)


def stamp(path: Path) -> str:
    st = path.stat()
    return f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}"


def load_folder(root: Path) -> Native:
    files = sorted(p for p in root.rglob("*") if p.is_file() and is_image(p.relative_to(root).as_posix()))
    paths = [p.relative_to(root).as_posix() for p in files]
    listing = hashlib.sha256("\n".join(stamp(p) for p in files).encode()).hexdigest()
    identity = f"folder:{root.resolve()}:{listing}"

    def read(indices):
        for i in indices:
            yield paths[i], files[i]

    return _native_from_files(paths, read, identity, str(root))


def load_tar(path: Path) -> Native:
    try:
        with tarfile.open(path) as tf:
            members = [m for m in tf.getmembers() if m.isfile() and is_image(m.name)]
    except (tarfile.TarError, OSError, EOFError) as err:
        raise IgptError(f"{path} is not a readable tar archive ({err})") from None
    paths = [m.name for m in members]
    order = {m.name: i for i, m in enumerate(members)}

    def read(indices):
        wanted, found, done = set(indices), {}, 0
        try:
            with tarfile.open(path, "r|*") as tf:  # one sequential pass, members in file order
                for member in tf:
                    i = order.get(member.name)
                    if i is None or i not in wanted:
                        continue
                    found[i] = tf.extractfile(member).read()
                    while done < len(indices) and indices[done] in found:
                        yield paths[indices[done]], found.pop(indices[done])
                        done += 1
                    if done == len(indices):  # a build reads a chunk at a time: stop at its last member
                        break
        except (tarfile.TarError, OSError, EOFError) as err:
            raise IgptError(f"{path} is damaged ({err}); re-download it") from None
        if done < len(indices):
            raise IgptError(f"{path} ended before {paths[indices[done]]}: the archive is truncated")

    return _native_from_files(paths, read, "tar:" + stamp(path), str(path))


def load_zip(path: Path) -> Native:
    try:
        with zipfile.ZipFile(path) as zf:
            paths = [n for n in zf.namelist() if not n.endswith("/") and is_image(n)]
    except (zipfile.BadZipFile, OSError) as err:
        raise IgptError(f"{path} is not a readable zip archive ({err})") from None

    def read(indices):
        try:
            with zipfile.ZipFile(path) as zf:
                for i in indices:
                    yield paths[i], zf.read(paths[i])
        except (zipfile.BadZipFile, OSError) as err:
            raise IgptError(f"{path} is damaged ({err})") from None

    return _native_from_files(paths, read, "zip:" + stamp(path), str(path))


def load_npz(path: Path) -> Native:
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except (OSError, ValueError, zipfile.BadZipFile) as err:
        raise IgptError(f"{path} is not a readable .npz ({err})") from None
    if "x_train" not in arrays:
        raise IgptError(f"{path} has no x_train array: a .npz needs x_train (and optionally y_train, x_test, y_test)")
    splits, classes = {}, None
    for split in ("train", "test", "val"):
        x = arrays.get(f"x_{split}")
        if x is None:
            continue
        if x.dtype != np.uint8 or x.ndim not in (3, 4) or (x.ndim == 4 and x.shape[-1] not in (1, 3, 4)):
            raise IgptError(f"{path}: x_{split} must be uint8 (N, H, W) or (N, H, W, C), got {x.dtype} {x.shape}")
        y = arrays.get(f"y_{split}")
        if y is not None:
            y = np.asarray(y).astype(np.int64).reshape(-1)
            if len(y) != len(x):
                raise IgptError(f"{path}: y_{split} has {len(y)} labels for {len(x)} images")
        splits[split] = Split(x, y)
    if all(s.labels is not None for s in splits.values()):
        classes = [str(i) for i in range(int(max(s.labels.max(initial=-1) for s in splits.values())) + 1)]
    else:
        splits = {k: Split(s.images, None) for k, s in splits.items()}
    return Native(splits, classes, "npz:" + stamp(path))


def load_path(path: Path) -> Native:
    name = path.name.lower()
    if path.is_dir():
        return load_folder(path)
    if not path.exists():
        raise IgptError(f"data not found: {path} (give a data set name, a folder, an archive or a .npz)")
    if name.endswith((".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")):
        return load_tar(path)
    if name.endswith(".zip"):
        return load_zip(path)
    if name.endswith(".npz"):
        return load_npz(path)
    raise IgptError(f"{path} is not a folder, .tar(.gz), .zip or .npz: cannot read images from it")
