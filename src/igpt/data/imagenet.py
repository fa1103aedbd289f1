"""Downsampled ImageNet (Chrabaszcz, Loshchilov and Hutter, 2017): `imagenet32` and `imagenet64`.

ImageNet's licence asks each user to download it, so nothing here downloads: `--data-dir` names
the unpacked release, `train_data_batch_1..10` and `val_data`, each an `.npz` or a pickled batch
(read with the CIFAR unpickler, which admits only numpy arrays and builtins), in one folder or in
the release's own subfolders (`Imagenet32_train/`, `Imagenet32_val/`, `Imagenet64_train_part1/`...).
A batch holds `data`, (N, 3*s*s) uint8 in channel planes, and `labels` 1..1000, shifted to 0..999.

Native splits: `train` is the ten batches in order; `test` is the canonical `val_data`, since
ImageNet's test labels are not public and the paper reports on the validation set. igpt's `val`
is therefore the seeded hold-out of train. The files carry no class names, so each class is named
by the label the files give it ("1".."1000").

A split of imagenet64 is larger than memory: its images are a lazy sequence that memory-maps an
uncompressed .npz and otherwise keeps one batch file decoded at a time. Labels and batch sizes are
read once and kept in the cache beside the pixels (a pickled batch must be read whole to find them).
"""

from __future__ import annotations

import functools
import math
import operator
import struct
import zipfile
import zlib
from pathlib import Path

import numpy as np

from igpt.data.cache import build_entry, entry_key, read_entry
from igpt.data.sources import Native, Split, _unpickle
from igpt.errors import IgptError

BATCHES = {"train": [f"train_data_batch_{i}" for i in range(1, 11)], "test": ["val_data"]}
CLASSES = 1000
WHERE = "https://image-net.org/download-images.php"


def load_imagenet(side: int, data_dir: Path | None) -> Native:
    files = {split: [_find(stem, side, data_dir) for stem in stems] for split, stems in BATCHES.items()}
    stats = [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for paths in files.values() for p in paths]
    identity = f"imagenet{side}:v1:{stats}"  # any replaced file gives a new cache key
    key = entry_key(identity=identity)
    index = read_entry("imagenet-labels", key) or build_entry("imagenet-labels", key, lambda tmp: _index(tmp, files))
    splits = {split: Split(BatchImages(paths, index[f"{split}_counts"], side), np.array(index[f"{split}_labels"]))
              for split, paths in files.items()}
    return Native(splits, [str(label) for label in range(1, CLASSES + 1)], identity)


class BatchImages:
    """The images of a split's batch files, (s, s, 3) uint8 each, one file at a time.

    An uncompressed .npz (what np.savez writes) is memory-mapped, so any row is read alone. A pickled batch or a
    compressed .npz is decoded whole; `pieces` then says where each file starts, so that a build reads such a
    file in one piece, and rows read in order decode each file once. Only the current file is held.
    """

    def __init__(self, paths: list[Path], counts, side: int):
        self.paths, self.side = paths, side
        self.starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self._current, self._planes = None, None

    def __len__(self) -> int:
        return int(self.starts[-1])

    @functools.cached_property
    def pieces(self) -> list[int] | None:
        """The first row of each file where some file must be decoded whole; None where every one is mapped."""
        if all(_mapped_field(path, "data") is not None for path in self.paths):
            return None
        return self.starts[:-1].tolist()

    @property
    def piece_bytes(self) -> int:
        """The memory a process reading the largest piece holds: the file's bytes, its images, and them made over."""
        return 3 * int(np.diff(self.starts).max(initial=0)) * 3 * self.side * self.side

    def __getitem__(self, i) -> np.ndarray:
        i = operator.index(i)
        if not 0 <= i < len(self):
            raise IndexError(f"image {i} of {len(self)}")
        k = int(np.searchsorted(self.starts, i, side="right")) - 1
        if k != self._current:
            self._planes = None  # let the previous batch go before decoding the next
            self._planes = _batch_planes(self.paths[k], self.side, int(self.starts[k + 1] - self.starts[k]))
            self._current = k
        return self._planes[i - self.starts[k]].transpose(1, 2, 0)


def _find(stem: str, side: int, data_dir: Path | None) -> Path:
    """`stem` or `stem.npz` in the folder or in one of its `Imagenet{side}*` subfolders."""
    folders = [] if data_dir is None or not data_dir.is_dir() else [data_dir, *sorted(
        p for p in data_dir.iterdir() if p.is_dir() and p.name.lower().startswith(f"imagenet{side}"))]
    found = next((p for f in folders for p in (f / f"{stem}.npz", f / stem) if p.is_file()), None)
    if found is None:
        place = f"--data-dir {data_dir} lacks {stem}" if data_dir else f"imagenet{side} needs --data-dir"
        raise IgptError(
            f"{place}: ImageNet's licence asks you to download it yourself: get \"Downsampled ImageNet {side}x{side}\" "
            f"from {WHERE}, unpack it and pass --data-dir FOLDER holding train_data_batch_1..10 and val_data"
        )
    return found


def _index(tmp: Path, files: dict[str, list[Path]]) -> dict:
    for split, paths in files.items():
        labels = [_batch_labels(path) for path in paths]
        np.save(tmp / f"{split}_labels.npy", np.concatenate(labels))
        np.save(tmp / f"{split}_counts.npy", np.array([len(part) for part in labels], np.int64))
    return {}


def _field(path: Path, name: str) -> np.ndarray:
    """One field of a batch file (an .npz reads only that field)."""
    try:
        if path.suffix == ".npz":
            with np.load(path) as batch:
                return batch[name]
        batch = _unpickle(path.read_bytes(), str(path))
        return np.asarray(batch[name] if name in batch else batch[name.encode()])
    except (KeyError, TypeError):
        raise IgptError(f"{path} has no {name!r}: not a downsampled ImageNet batch") from None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as err:
        raise IgptError(f"{path} is not a readable batch file ({err}); re-download it") from None


def _batch_labels(path: Path) -> np.ndarray:
    labels = _field(path, "labels")
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer) or (
            labels.size and not 1 <= labels.min() <= labels.max() <= CLASSES):
        raise IgptError(f"{path} has labels outside 1..{CLASSES}: not a downsampled ImageNet batch")
    return labels.astype(np.int64) - 1


def _mapped_field(path: Path, name: str) -> np.ndarray | None:
    """A field of an uncompressed .npz memory-mapped where it lies in the zip file, or None where it cannot be."""
    if path.suffix != ".npz":
        return None
    try:
        with zipfile.ZipFile(path) as archive:
            member = archive.getinfo(f"{name}.npy")
        if member.compress_type != zipfile.ZIP_STORED or member.flag_bits & 0x1:
            return None
        with open(path, "rb") as f:
            f.seek(member.header_offset)
            header = f.read(30)
            if header[:4] != b"PK\x03\x04":
                return None
            name_length, extra_length = struct.unpack("<HH", header[26:30])
            f.seek(member.header_offset + 30 + name_length + extra_length)
            version = np.lib.format.read_magic(f)
            npy = np.lib.format
            shape, fortran, dtype = (npy.read_array_header_1_0 if version == (1, 0) else npy.read_array_header_2_0)(f)
            offset = f.tell()
        if dtype.hasobject or offset + dtype.itemsize * math.prod(shape) > path.stat().st_size:
            return None
        return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape, order="F" if fortran else "C")
    except (KeyError, OSError, ValueError, struct.error, zipfile.BadZipFile):
        return None  # read the ordinary way, which names what is wrong


def _batch_planes(path: Path, side: int, count: int) -> np.ndarray:
    """A batch's images as (N, 3, s, s): R, G and B planes, each row-major."""
    data = _mapped_field(path, "data")
    data = _field(path, "data") if data is None else data
    width = 3 * side * side
    if data.ndim != 2 or data.shape[1] != width or data.dtype != np.uint8:
        found = f"{data.dtype} {data.shape}"
        other = next((f"; use --data imagenet{s}" for s in (32, 64) if s != side and data.shape[1:] == (3 * s * s,)), "")
        raise IgptError(f"{path} holds data of {found}, not uint8 rows of 3x{side}x{side}={width}{other}")
    if len(data) != count:
        raise IgptError(f"{path} holds {len(data)} images but {count} labels; re-download it")
    return data.reshape(count, 3, side, side)
