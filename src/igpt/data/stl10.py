"""STL-10 (Coates, Lee and Ng, 2011) from its binary release: 96x96 colour images in 10 classes, 5,000
labelled training images, 8,000 test images and 100,000 unlabelled ones, made for unsupervised pretraining.

The release holds train_X.bin / train_y.bin, test_X.bin / test_y.bin, unlabeled_X.bin and
class_names.txt. An X file is uint8 images one after another, each three channel planes, each
plane stored column by column; a y file is one byte per image, the class 1..10. The X files are
memory-mapped, never read whole (the unlabelled images alone are 2.8 GB).

- `--data stl10`: the labelled folds: train (a seeded 10% of it held out as val) and test.
- `--data stl10+unlabeled`: for pretraining: the 100,000 unlabelled images followed by the 5,000
  training images, without labels (val: a seeded 10% of them), and the test images, unlabelled.
  Probes and fine-tuning then read `--data stl10`.

With `--data-dir`, the files are read from that folder (or its stl10_binary/), or from the release
tarball in it; without, the tarball is downloaded once, checked against its MD5, and unpacked once
into the igpt cache.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from igpt.data.sources import Native, Split, cache_root, release_members, release_place
from igpt.errors import IgptError

SIDE = 96
IMAGE_BYTES = 3 * SIDE * SIDE
RESOURCE = {"url": "http://ai.stanford.edu/~acoates/stl10/stl10_binary.tar.gz", "filename": "stl10_binary.tar.gz",
            "md5": "91f7769df0f17e558f3565bffb0c7dfb"}
FOLDER = "stl10_binary"  # the release's folder, inside the tarball
NAMES_FILE = "class_names.txt"
CLASSES = ("airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck")
LABELLED = {"train": ("train_X.bin", "train_y.bin"), "test": ("test_X.bin", "test_y.bin")}
UNLABELLED = "unlabeled_X.bin"


def load_stl10(data_dir: Path | None, unlabelled: bool) -> Native:
    """`--data stl10` (unlabelled False) or `--data stl10+unlabeled` (True)."""
    wanted = [name for pair in LABELLED.values() for name in pair] + ([UNLABELLED] if unlabelled else [])
    folder = binary_folder(data_dir, wanted)
    train, test = (labelled_fold(folder, *LABELLED[split]) for split in ("train", "test"))
    stamp = ":".join(f"{name}={(folder / name).stat().st_size}@{(folder / name).stat().st_mtime_ns}" for name in wanted)
    if not unlabelled:
        return Native({"train": train, "test": test}, class_names(folder), f"stl10:{folder.resolve()}:{stamp}")
    pretraining = Stacked(read_images(folder / UNLABELLED), train.images)
    return Native({"train": Split(pretraining, None), "test": Split(test.images, None)}, None,
                  f"stl10+unlabeled:{folder.resolve()}:{stamp}")


def binary_folder(data_dir: Path | None, wanted: list[str]) -> Path:
    """The folder holding the .bin files: --data-dir itself or its stl10_binary/, else the release tarball (in
    --data-dir, or downloaded) unpacked once into the cache."""
    place = release_place("stl10", data_dir, RESOURCE, FOLDER, wanted, "the STL-10 binary release")
    return place if place.is_dir() else unpacked(place, wanted)


def unpacked(tarball: Path, wanted: list[str]) -> Path:
    """The tarball's .bin files and class names in a cache folder of its own, written once and whole."""
    stat = tarball.stat()
    key = hashlib.sha256(f"{tarball.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    folder = cache_root() / "stl10" / key
    if all((folder / name).is_file() for name in wanted):
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder.parent) as scratch:
        out = Path(scratch) / "files"
        out.mkdir()
        with release_members(tarball, wanted, "the STL-10 binary release") as (archive, members):
            for name in members.keys() & {*wanted, UNLABELLED, NAMES_FILE}:
                with archive.extractfile(members[name]) as source, open(out / name, "wb") as target:
                    shutil.copyfileobj(source, target, 1 << 20)
        shutil.rmtree(folder, ignore_errors=True)  # an earlier process's partial unpacking, if any
        os.replace(out, folder)
    return folder


def read_images(path: Path) -> np.ndarray:
    """An X file as a read-only (N, 96, 96, 3) view of the memory-mapped (N, channel, column, row) bytes."""
    size = path.stat().st_size
    if size == 0 or size % IMAGE_BYTES:
        raise IgptError(f"{path} holds {size:,} bytes, not a whole number of 96x96 colour images "
                        f"({IMAGE_BYTES:,} bytes each): the file is damaged, re-download it")
    return np.memmap(path, dtype=np.uint8, mode="r", shape=(size // IMAGE_BYTES, 3, SIDE, SIDE)).transpose(0, 3, 2, 1)


def labelled_fold(folder: Path, images_file: str, labels_file: str) -> Split:
    images = read_images(folder / images_file)
    labels = np.fromfile(folder / labels_file, dtype=np.uint8)
    if len(labels) != len(images):
        raise IgptError(f"{folder / images_file} holds {len(images):,} images but {labels_file} "
                        f"{len(labels):,} labels: the files are damaged or from different releases")
    if len(labels) and not (labels.min() >= 1 and labels.max() <= len(CLASSES)):
        raise IgptError(f"{folder / labels_file} has labels outside 1..{len(CLASSES)}: not an STL-10 label file")
    return Split(images, labels.astype(np.int64) - 1)


def class_names(folder: Path) -> list[str]:
    path = folder / NAMES_FILE
    names = path.read_text().split() if path.is_file() else []
    return names if len(names) == len(CLASSES) else list(CLASSES)


class Stacked:
    """Image arrays read one after another as one sequence, by integer index (how the pixel cache reads a split)."""

    def __init__(self, *parts: np.ndarray):
        self.parts = parts
        self.ends = np.cumsum([len(part) for part in parts])

    def __len__(self) -> int:
        return int(self.ends[-1])

    def __getitem__(self, i: int) -> np.ndarray:
        part = int(np.searchsorted(self.ends, i, side="right"))
        return self.parts[part][i - (int(self.ends[part - 1]) if part else 0)]
