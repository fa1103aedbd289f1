"""OpenAI's encoded data sets: images already turned into the released palette's colour indices.

OpenAI released ImageNet and CIFAR-10 as `<name>_trX.npy`, `<name>_vaX.npy` and `<name>_teX.npy`
(N, 1024) arrays: the cluster ids of each image's 32x32 centre crop in the released 512-colour
palette, in raster order, with `<name>_trY.npy` and so on holding the labels, as class indices or
one-hot rows. `--data FOLDER` (the folder holding one set's files) or `--data FILE` (any one of
them) reads such a set.

With the released palette at 32x32, the ids are the tokens: read as they are, never decoded
(`igpt eval` of an imported release model on them reproduces OpenAI's loss figures). Every
other use (another palette or resolution, the pixels a probe's baseline or a completion needs)
decodes each image through the released palette when it is read.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from igpt.data.sources import Native, Split
from igpt.errors import IgptError

SPLIT_CODES = {"tr": "train", "va": "val", "te": "test"}
FILE = re.compile(r"^(?P<name>.+)_(?P<code>tr|va|te)(?P<kind>[XY])\.npy$")


@dataclass
class EncodedSet:
    """One encoded set's files: per split the ids (N, side * side) and the labels (N,) or None."""

    name: str
    ids: dict[str, np.ndarray]
    labels: dict[str, np.ndarray | None]
    side: int
    identity: str

    @property
    def classes(self) -> list[str] | None:
        known = [labels for labels in self.labels.values() if labels is not None]
        return [str(i) for i in range(int(max(labels.max() for labels in known)) + 1)] if known else None

    def native(self, palette) -> Native:
        """The set as images, each decoded through `palette` (the released one) when it is read."""
        splits = {split: Split(Decoded(ids, palette, self.side), self.labels[split]) for split, ids in self.ids.items()}
        return Native(splits, self.classes, self.identity)


class Decoded:
    """Colour ids (N, side * side) read as (side, side, 3) uint8 images, one at a time."""

    def __init__(self, ids: np.ndarray, palette, side: int):
        self.ids, self.palette, self.side = ids, palette, side

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.palette.decode(np.asarray(self.ids[i])).reshape(self.side, self.side, 3)


def find(spec: str) -> EncodedSet | None:
    """The encoded set that `spec` names (its folder, or one of its files), or None when it names none."""
    path = Path(spec)
    if path.is_file() and FILE.match(path.name):
        folder, name = path.parent, FILE.match(path.name)["name"]
    elif path.is_dir():
        names = {m["name"] for p in path.glob("*_*[XY].npy") if (m := FILE.match(p.name))}
        if not names:
            return None
        if len(names) > 1:
            raise IgptError(f"{path} holds the encoded sets {', '.join(sorted(names))}: name one file of the set")
        folder, name = path, names.pop()
    else:
        return None
    return read(folder, name)


def read(folder: Path, name: str) -> EncodedSet:
    ids, labels, stamps = {}, {}, []
    for code, split in SPLIT_CODES.items():
        x, y = folder / f"{name}_{code}X.npy", folder / f"{name}_{code}Y.npy"
        if not x.is_file():
            continue
        ids[split] = _ids(x)
        labels[split] = _labels(y, len(ids[split])) if y.is_file() else None
        stamps += [f"{p.name}={p.stat().st_size}@{p.stat().st_mtime_ns}" for p in (x, y) if p.is_file()]
    if not ids:
        raise IgptError(f"{folder} holds no {name}_trX.npy, {name}_vaX.npy or {name}_teX.npy")
    sides = {math.isqrt(x.shape[1]) for x in ids.values()}
    widths = {x.shape[1] for x in ids.values()}
    if len(widths) != 1 or sides.pop() ** 2 != widths.pop():
        raise IgptError(f"{folder / name}_*X.npy are not one square image size: {sorted({x.shape for x in ids.values()})}")
    side = math.isqrt(next(iter(ids.values())).shape[1])
    return EncodedSet(name, ids, labels, side, f"encoded:{folder.resolve() / name}:{':'.join(stamps)}")


def _ids(path: Path) -> np.ndarray:
    try:
        ids = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as err:
        raise IgptError(f"{path} is not a readable .npy file ({err}); re-download it") from None
    if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
        raise IgptError(f"{path} holds {ids.dtype} {ids.shape}, not (images, pixels) colour ids")
    return ids


def _labels(path: Path, n: int) -> np.ndarray:
    try:
        labels = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise IgptError(f"{path} is not a readable .npy file ({err}); re-download it") from None
    if labels.ndim == 2:  # one-hot rows
        labels = labels.argmax(1)
    if labels.ndim != 1 or len(labels) != n:
        raise IgptError(f"{path} holds {len(labels):,} labels {labels.shape} for {n:,} images")
    if len(labels) and labels.min() < 0:
        raise IgptError(f"{path} has negative labels")
    return labels.astype(np.int64)
