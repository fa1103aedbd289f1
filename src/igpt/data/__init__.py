"""Data sets: `--data DATA` -> images (N, R, R, 3) uint8 and labels, per split, cached.

DATA is a named data set (`digits`, `shifted-digits`, `mnist`, `fashion-mnist`, `cifar10`, `cifar100`,
`imagenet32` and `imagenet64`: downsampled ImageNet, from the files in --data-dir), an
image folder (`class/file` or `split/class/file`), a `.tar`/`.tar.gz`/`.zip` of one, or a
`.npz` with `x_train`, `y_train`, `x_test`, `y_test`. Splits are `train`, `val`, `test`;
where the source has no `val` (or `test`), a seeded 10% of train is held out for it.
"""

from __future__ import annotations

import dataclasses
import functools
import multiprocessing
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from igpt.data import encoded
from igpt.data.augment import pad_crop_flip, random_resized_crop
from igpt.data.cache import build_entry, entry_key, read_entry
from igpt.data.folders import FileSplit, load_path
from igpt.data.images import decode, fit_to, read_images
from igpt.data import ilsvrc, imagenet, stl10
from igpt.data.sources import Native, Split, fetch, load_cifar, load_digits_dataset, load_idx_dataset, load_shifted_digits
from igpt.config import check, option
from igpt.errors import IgptError

NAMED = {  # --data NAME: its loader, given --data-dir
    "digits": lambda data_dir: load_digits_dataset(),
    "shifted-digits": lambda data_dir: load_shifted_digits(),
    "mnist": lambda data_dir: load_idx_dataset("mnist", data_dir),
    "fashion-mnist": lambda data_dir: load_idx_dataset("fashion-mnist", data_dir),
    "cifar10": lambda data_dir: load_cifar("cifar10", data_dir),
    "cifar100": lambda data_dir: load_cifar("cifar100", data_dir),
    "stl10": lambda data_dir: stl10.load_stl10(data_dir, unlabelled=False),
    "stl10+unlabeled": lambda data_dir: stl10.load_stl10(data_dir, unlabelled=True),
    "imagenet32": lambda data_dir: imagenet.load_imagenet(32, data_dir),
    "imagenet64": lambda data_dir: imagenet.load_imagenet(64, data_dir),
    "imagenet": ilsvrc.load_ilsvrc,
}
DATASETS = tuple(NAMED)
SPLITS = ("train", "val", "test")
HOLD_OUT = 0.1
_PARALLEL_FILES = 2000  # decode in worker processes above this many files

__all__ = ["DATASETS", "DataConfig", "ImageSet", "TokenSet", "fetch", "labelled_splits", "load", "load_tokens",
           "pad_crop_flip", "random_resized_crop", "read_images", "split_option"]


def split_option(help: str = "the split to read"):
    """The --split flag of every command that reads one split (a dataclass field)."""
    return option("test", help, choices=SPLITS)


@dataclass
class ImageSet:
    images: np.ndarray  # uint8 (N, R, R, 3), memory-mapped
    labels: np.ndarray | None  # int64 (N,)
    classes: list[str] | None
    name: str
    split: str
    resolution: int
    skipped: int = 0
    note: str = ""

    def __len__(self) -> int:
        return len(self.images)

    def describe(self) -> str:
        classes = f", {len(self.classes)} classes" if self.classes else ", unlabelled"
        extra = f" ({self.note})" if self.note else ""
        bad = f", {self.skipped} unreadable files skipped" if self.skipped else ""
        return f"{self.name} {self.split}: {len(self):,} images {self.resolution}x{self.resolution}{classes}{bad}{extra}"


@dataclass
class TokenSet:
    tokens: np.ndarray  # uint16 (N, R*R), memory-mapped
    labels: np.ndarray | None
    classes: list[str] | None
    resolution: int
    palette_hash: str
    pixels: Callable[[], ImageSet] = field(repr=False, default=None)  # the same images as pixels, read on first use

    def __len__(self) -> int:
        return len(self.tokens)

    @functools.cached_property
    def images(self) -> ImageSet:
        return self.pixels()


@dataclass(frozen=True)
class DataConfig:
    """Which images a run reads and how: one description shared by every command and stored in run.json.

    Later commands (eval, probe, finetune, sample, complete) read the run's description and
    change only what they are told; the resolution then follows the model.
    """

    name: str = option("digits", " | ".join(DATASETS) + " | an image folder, .tar/.tar.gz/.zip of one, or a .npz",
                       flag="--data")
    data_dir: str | None = option(None, "folder holding existing copies of a named data set")
    crop: bool = option(False, "centre-crop images to square before resizing")
    skip_bad: bool = option(False, "skip (and count) corrupt images instead of stopping")
    resolution: int = option(8, "input resolution: images are resized to R x R")

    def __post_init__(self):
        check([(self.resolution > 0, f"--resolution must be positive, got {self.resolution}")])

    def replace(self, **changes) -> "DataConfig":
        return dataclasses.replace(self, **changes)

    def images(self, split: str, *, require_labels: bool = False, native: bool = False,
               resolution: int | None = None) -> ImageSet:
        """One split's pixels at the configured resolution (`resolution` to override, `native` for the stored size)."""
        size = None if native else (resolution or self.resolution)
        return load(self.name, split, size, data_dir=self.data_dir, crop=self.crop, skip_bad=self.skip_bad,
                    require_labels=require_labels)

    def tokens(self, split: str, palette, *, require_labels: bool = False) -> TokenSet:
        """One split encoded through `palette`."""
        return load_tokens(self.name, split, self.resolution, palette, data_dir=self.data_dir, crop=self.crop,
                           skip_bad=self.skip_bad, require_labels=require_labels)


def open_source(spec: str, data_dir: str | os.PathLike | None = None) -> Native:
    if spec in NAMED:
        folder = Path(data_dir) if data_dir is not None else None
        if folder is not None and not folder.exists():
            raise IgptError(f"--data-dir {folder} does not exist")
        return NAMED[spec](folder)
    released = encoded.find(spec)
    if released is not None:
        from igpt.palette import Palette

        return released.native(Palette.openai())
    path = Path(spec)
    if not path.exists() and os.sep not in spec and "." not in spec:
        raise IgptError(f"unknown data set {spec!r}: use one of {', '.join(DATASETS)}, a folder, an archive or a .npz")
    return load_path(path)


def _plan(native: Native, split: str, seed: int) -> tuple[str, np.ndarray | None, str]:
    """Which native split serves `split`, which of its rows (None: all), and a note saying so."""
    if split not in SPLITS:
        raise IgptError(f"unknown split {split!r}: use {', '.join(SPLITS)}")
    if split in native.splits and split != "train":
        return split, None, ""
    if "train" not in native.splits:
        raise IgptError(f"this data has no {split} split and no train split to hold one out from")
    n = _count(native.splits["train"])
    held = [s for s in ("val", "test") if s not in native.splits]
    size = max(1, round(HOLD_OUT * n)) if n >= 10 else 0
    order = np.random.default_rng(seed).permutation(n)
    parts, start = {}, 0
    for name in held:
        parts[name], start = order[start : start + size], start + size
    parts["train"] = order[start:]
    note = f"{', '.join(held)}: seeded {int(HOLD_OUT * 100)}% of train" if held else ""
    if len(parts[split]) == 0:
        raise IgptError(f"too few images ({n}) to hold out a {split} split")
    return "train", np.sort(parts[split]), note


def _count(native_split) -> int:
    return len(native_split.names) if isinstance(native_split, FileSplit) else len(native_split.images)


def _decode_item(job: tuple[str, bytes | Path, int | None, bool]):
    name, source, resolution, crop = job
    try:
        return name, fit_to(decode(source, name), resolution, crop), None
    except Exception as err:  # reported per file by the parent
        return name, None, str(err)


def _file_images(native_split: FileSplit, rows: list[int], resolution, crop, workers: int):
    jobs = ((name, source, resolution, crop) for name, source in native_split.read(rows))
    if workers > 1 and len(rows) > _PARALLEL_FILES and "fork" in multiprocessing.get_all_start_methods():
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            yield from pool.imap(_decode_item, jobs, chunksize=64)
    else:
        yield from map(_decode_item, jobs)


def _build_pixels(tmp: Path, native_split, rows: np.ndarray, resolution, crop, skip_bad) -> dict:
    n = len(rows)
    labels = native_split.labels[rows] if native_split.labels is not None else None
    if isinstance(native_split, Split):
        items = ((str(i), fit_to(native_split.images[i], resolution, crop), None) for i in rows)
    else:
        items = _file_images(native_split, rows.tolist(), resolution, crop, os.cpu_count() or 1)
    out, kept, skipped, first_bad = None, [], 0, None
    for i, (name, image, error) in enumerate(items):
        if error is None and out is not None and image.shape != out.shape[1:]:
            error = f"image {name} is {image.shape[1]}x{image.shape[0]}, unlike the others: pass --resolution"
        if error is not None:
            if not skip_bad:
                raise IgptError(f"{error} (pass --skip-bad to skip unreadable files)")
            skipped += 1
            first_bad = first_bad or error
            continue
        if out is None:
            out = np.lib.format.open_memmap(tmp / "images.npy", mode="w+", dtype=np.uint8, shape=(n, *image.shape))
        out[len(kept)] = image
        kept.append(i)
    if out is None:
        raise IgptError(f"no readable images in this split ({first_bad})" if first_bad else "this split is empty")
    if len(kept) < n:  # rewrite without the skipped rows' slots
        out.flush()
        images = np.load(tmp / "images.npy", mmap_mode="r")[: len(kept)]
        trimmed = np.lib.format.open_memmap(tmp / "trim.npy", mode="w+", dtype=np.uint8, shape=images.shape)
        trimmed[:] = images
        trimmed.flush()
        del out, images, trimmed
        os.replace(tmp / "trim.npy", tmp / "images.npy")
    else:
        out.flush()
        del out
    if labels is not None:
        np.save(tmp / "labels.npy", labels[kept])
    return {"skipped": skipped}


def load(
    spec: str,
    split: str = "train",
    resolution: int | None = None,
    *,
    data_dir: str | os.PathLike | None = None,
    crop: bool = False,
    skip_bad: bool = False,
    require_labels: bool = False,
    seed: int = 0,
) -> ImageSet:
    """One split of a data set at `resolution` (None: native size, which must be uniform).

    Decoded once into the cache ($IGPT_CACHE, default ~/.cache/igpt), memory-mapped after.
    """
    if resolution is not None and resolution <= 0:
        raise IgptError(f"--resolution must be positive, got {resolution}")
    native = open_source(spec, data_dir)
    crop = crop or native.crop
    source, rows, note = _plan(native, split, seed)
    native_split = native.splits[source]
    rows = np.arange(_count(native_split)) if rows is None else rows
    key = entry_key(identity=native.identity, split=split, resolution=resolution, crop=crop, seed=seed,
                    skip_bad=skip_bad)
    entry = read_entry("pixels", key) or build_entry(
        "pixels", key, lambda tmp: _build_pixels(tmp, native_split, rows, resolution, crop, skip_bad)
    )
    labels = entry.get("labels")
    if require_labels and (labels is None or native.classes is None):
        raise IgptError(f"{spec} has no labels: put images in class subfolders (class/file or split/class/file)")
    images = entry["images"]
    return ImageSet(
        images=images, labels=None if labels is None else np.asarray(labels), classes=native.classes,
        name=_display_name(spec), split=split, resolution=images.shape[1], skipped=entry["meta"]["skipped"], note=note,
    )


def load_tokens(spec: str, split: str, resolution: int | None, palette, **kwargs) -> TokenSet:
    """A split encoded through `palette`: uint16 tokens (N, R*R), cached per palette. An encoded release read with
    its own palette at its own size gives its colour ids as they are."""
    released = encoded.find(spec) if spec not in NAMED else None
    if released is not None and resolution == released.side and palette.hash == _released_palette_hash():
        return _released_tokens(spec, released, split, palette, kwargs.get("seed", 0),
                                kwargs.get("require_labels", False))
    images = load(spec, split, resolution, **kwargs)
    key = entry_key(pixels=str(Path(images.images.filename).parent.name), palette=palette.hash)

    def build(tmp: Path) -> dict:
        n, r = len(images), images.resolution
        out = np.lib.format.open_memmap(tmp / "tokens.npy", mode="w+", dtype=np.uint16, shape=(n, r * r))
        step = max(1, (1 << 22) // (r * r))
        for start in range(0, n, step):
            out[start : start + step] = palette.encode(np.asarray(images.images[start : start + step]))
        out.flush()
        return {}

    entry = read_entry("tokens", key) or build_entry("tokens", key, build)
    return TokenSet(entry["tokens"], images.labels, images.classes, images.resolution, palette.hash, lambda: images)


@functools.cache
def _released_palette_hash() -> str:
    from igpt.palette import Palette

    return Palette.openai().hash


def _released_tokens(spec: str, released: encoded.EncodedSet, split: str, palette, seed: int,
                     require_labels: bool) -> TokenSet:
    """An encoded release's colour ids as the split's tokens (a hold-out's rows where the release has no such split),
    copied once into the cache as uint16 and checked against the palette's size on the way."""
    native = released.native(palette)
    source, rows, _ = _plan(native, split, seed)
    ids, labels = released.ids[source], released.labels[source]
    rows = np.arange(len(ids)) if rows is None else rows
    if require_labels and labels is None:
        raise IgptError(f"{spec} has no labels for its {split} split ({released.name}_*Y.npy)")
    key = entry_key(identity=released.identity, split=split, seed=seed)

    def build(tmp: Path) -> dict:
        out = np.lib.format.open_memmap(tmp / "tokens.npy", mode="w+", dtype=np.uint16, shape=(len(rows), ids.shape[1]))
        step = max(1, (1 << 22) // ids.shape[1])
        for start in range(0, len(rows), step):
            chunk = np.asarray(ids[rows[start : start + step]])
            if chunk.size and (chunk.min() < 0 or chunk.max() >= palette.size):
                raise IgptError(f"{spec}: colour ids outside 0..{palette.size - 1}: not encoded in the released palette")
            out[start : start + step] = chunk
        out.flush()
        return {}

    entry = read_entry("tokens", key) or build_entry("tokens", key, build)
    return TokenSet(entry["tokens"], None if labels is None else labels[rows], released.classes, released.side,
                    palette.hash, lambda: load(spec, split, released.side, seed=seed))


def labelled_splits(data: DataConfig, palette) -> dict[str, TokenSet]:
    """train, val and test of a labelled data set, encoded through `palette` (what a classifier learns from)."""
    splits = {name: data.tokens(name, palette, require_labels=True) for name in SPLITS}
    if len(splits["train"].classes or []) < 2:
        raise IgptError(f"{data.name} has fewer than two classes: nothing to classify")
    return splits


def _display_name(spec: str) -> str:
    return spec if spec in NAMED else Path(spec).name
