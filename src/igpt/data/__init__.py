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
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from igpt.data import encoded
from igpt.data.augment import pad_crop_flip, random_resized_crop
from igpt.data.cache import RowBuild, Rows, build_rows, cores, entry_key, read_entry
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
_PARALLEL_FILES = 200  # a build starts worker processes from this many image files to decode
_PARALLEL_PIXELS = 1 << 22  # or this many pixels to make from arrays (below, starting them costs more than it saves)

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
    n = image_count(native.splits["train"])
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


def image_count(native_split) -> int:
    """Images in a source's native split: its files, or its array's rows."""
    return len(native_split.names) if isinstance(native_split, FileSplit) else len(native_split.images)


@dataclass
class _Selection:
    """The images a split is: rows of a native split, made RGB at a resolution; `key` names their pixel cache."""

    native: Native
    source: Split | FileSplit
    rows: np.ndarray
    note: str
    resolution: int | None
    crop: bool
    skip_bad: bool
    key: str

    def labels(self, kept: np.ndarray | None = None) -> np.ndarray | None:
        if self.source.labels is None:
            return None
        labels = self.source.labels[self.rows]
        return labels if kept is None else labels[kept]


def _select(spec: str, split: str, resolution: int | None, *, data_dir=None, crop=False, skip_bad=False,
            require_labels=False, seed=0) -> _Selection:
    if resolution is not None and resolution <= 0:
        raise IgptError(f"--resolution must be positive, got {resolution}")
    native = open_source(spec, data_dir)
    crop = crop or native.crop
    source, rows, note = _plan(native, split, seed)
    native_split = native.splits[source]
    if require_labels and (native_split.labels is None or native.classes is None):
        raise IgptError(f"{spec} has no labels: put images in class subfolders (class/file or split/class/file)")
    rows = np.arange(image_count(native_split)) if rows is None else rows
    key = entry_key(identity=native.identity, split=split, resolution=resolution, crop=crop, seed=seed,
                    skip_bad=skip_bad)
    return _Selection(native, native_split, rows, note, resolution, crop, skip_bad, key)


def _items(selection: _Selection, rows: np.ndarray):
    """(name, image or None, error or None) for each of `rows`, in order."""
    if isinstance(selection.source, Split):
        for i in rows:
            yield str(i), fit_to(selection.source.images[i], selection.resolution, selection.crop), None
        return
    for name, source in selection.source.read(rows.tolist()):
        try:
            yield name, fit_to(decode(source, name), selection.resolution, selection.crop), None
        except Exception as err:  # counted with --skip-bad, else the one line that stops the build
            yield name, None, str(err)


def _refused(error: str) -> IgptError:
    return IgptError(f"{error} (pass --skip-bad to skip unreadable files)")


def _image_shape(selection: _Selection) -> tuple[int, int, int]:
    """The shape every image of the split takes: R x R, or the first readable image's native size."""
    if len(selection.rows) == 0:
        raise IgptError("this split is empty")
    if selection.resolution is not None:
        return selection.resolution, selection.resolution, 3
    first_bad = None
    for _, image, error in _items(selection, selection.rows):
        if error is None:
            return image.shape
        if not selection.skip_bad:
            raise _refused(error)
        first_bad = first_bad or error
    raise IgptError(f"no readable images in this split ({first_bad})")


def _images(selection: _Selection, shape: tuple, start: int, stop: int) -> Rows:
    """Rows start:stop of the split as images of `shape` (a chunk of a build; runs in a worker process)."""
    rows = selection.rows[start:stop]
    out, kept, first_bad = np.empty((len(rows), *shape), np.uint8), np.zeros(len(rows), bool), None
    for j, (name, image, error) in enumerate(_items(selection, rows)):
        if error is None and image.shape != shape:
            error = f"image {name} is {image.shape[1]}x{image.shape[0]}, unlike the others: pass --resolution"
        if error is not None:
            if not selection.skip_bad:
                raise _refused(error)
            first_bad = first_bad or error
            continue
        out[j], kept[j] = image, True
    return Rows({"images": out if kept.all() else out[kept]}, kept, first_bad)


def _workers(selection: _Selection, shape: tuple, encoding: bool, whole_files: bool) -> int:
    """Worker processes for a build (0: none): every core once the work is worth starting them, less the one this
    process encodes on, and no more than the memory holds where the source is read a whole batch file at a time
    (`whole_files`)."""
    decoding = isinstance(selection.source, FileSplit)
    work = len(selection.rows) * (1 if decoding else math.prod(shape[:2]))
    if work < (_PARALLEL_FILES if decoding else _PARALLEL_PIXELS):
        return 0
    workers = cores() - encoding
    if whole_files:
        workers = min(workers, _available_memory() // max(1, selection.source.images.piece_bytes))
    return max(0, workers)


def _available_memory() -> int:
    try:
        with open("/proc/meminfo") as info:
            return next(int(line.split()[1]) * 1024 for line in info if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _pieces(selection: _Selection) -> list[int] | None:
    """Where the split's rows cross into another batch file, when the source reads such files whole (its images
    then say `pieces`, the first row of each file, and `piece_bytes`, the memory a process reading one holds)."""
    starts = getattr(selection.source.images, "pieces", None) if isinstance(selection.source, Split) else None
    return None if starts is None else np.searchsorted(selection.rows, starts).tolist()


def _row_build(selection: _Selection, shape: tuple, columns: dict, encode: Callable[[dict], dict] | None) -> RowBuild:
    """The build of one array per image of the split, `encode` turning a chunk's images into the columns."""

    def finish(folder: Path, kept: np.ndarray, first_bad: str | None) -> dict:
        if not kept.any():
            raise IgptError(f"no readable images in this split ({first_bad})")
        labels = selection.labels(kept)
        if labels is not None:
            np.save(folder / "labels.npy", labels)
        return {"skipped": int((~kept).sum()), "resolution": int(shape[0])}

    pieces = _pieces(selection)
    return RowBuild(len(selection.rows), columns, functools.partial(_images, selection, shape), finish, encode,
                    pieces=pieces, workers=_workers(selection, shape, encode is not None, pieces is not None))


def _build_pixels(selection: _Selection) -> dict:
    shape = _image_shape(selection)
    return build_rows("pixels", selection.key, _row_build(selection, shape, {"images": (np.uint8, shape)}, None))


def _encoder(palette) -> Callable[[dict], dict]:
    """A chunk's images as tokens, encoded in the building process (one colour table, filled once)."""
    return lambda arrays: {"tokens": palette.encode(arrays["images"])}


def _build_tokens(selection: _Selection, palette, key: str) -> dict:
    """Tokens of the split: encoded from its pixel cache where that exists, else decoded (by worker processes when
    the split is large) and encoded in one pass."""
    pixels = read_entry("pixels", selection.key)
    if pixels is None:
        shape = _image_shape(selection)
        columns = {"tokens": (np.uint16, (shape[0] * shape[1],))}
        return build_rows("tokens", key, _row_build(selection, shape, columns, _encoder(palette)))
    images = pixels["images"]

    def finish(folder: Path, kept: np.ndarray, first_bad: str | None) -> dict:
        if "labels" in pixels:
            np.save(folder / "labels.npy", pixels["labels"])
        return {name: pixels["meta"][name] for name in ("skipped", "resolution")}

    build = RowBuild(len(images), {"tokens": (np.uint16, (images.shape[1] * images.shape[2],))},
                     lambda start, stop: Rows({"images": np.asarray(images[start:stop])}), finish, _encoder(palette))
    return build_rows("tokens", key, build)


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

    Decoded once into the cache ($IGPT_CACHE, default ~/.cache/igpt), in chunks, by worker processes on every
    core when the split is large; a build that was killed resumes at its next chunk. Memory-mapped after.
    """
    selection = _select(spec, split, resolution, data_dir=data_dir, crop=crop, skip_bad=skip_bad,
                        require_labels=require_labels, seed=seed)
    entry = read_entry("pixels", selection.key) or _build_pixels(selection)
    labels = entry.get("labels")
    images = entry["images"]
    return ImageSet(
        images=images, labels=None if labels is None else np.asarray(labels), classes=selection.native.classes,
        name=_display_name(spec), split=split, resolution=images.shape[1], skipped=entry["meta"]["skipped"],
        note=selection.note,
    )


def load_tokens(spec: str, split: str, resolution: int | None, palette, **kwargs) -> TokenSet:
    """A split encoded through `palette`: uint16 tokens (N, R*R), cached per palette, built as `load` builds pixels
    (from the split's pixel cache where that exists, else decoded and encoded in one pass, no pixels kept). An
    encoded release read with its own palette at its own size gives its colour ids as they are."""
    released = encoded.find(spec) if spec not in NAMED else None
    if released is not None and resolution == released.side and palette.hash == _released_palette_hash():
        return _released_tokens(spec, released, split, palette, kwargs.get("seed", 0),
                                kwargs.get("require_labels", False))
    selection = _select(spec, split, resolution, **kwargs)
    key = entry_key(pixels=selection.key, palette=palette.hash)
    entry = read_entry("tokens", key) or _build_tokens(selection, palette, key)
    labels = entry.get("labels")
    return TokenSet(entry["tokens"], None if labels is None else np.asarray(labels), selection.native.classes,
                    entry["meta"]["resolution"], palette.hash, lambda: load(spec, split, resolution, **kwargs))


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

    def compute(start: int, stop: int) -> Rows:
        chunk = np.asarray(ids[rows[start:stop]])
        if chunk.size and (chunk.min() < 0 or chunk.max() >= palette.size):
            raise IgptError(f"{spec}: colour ids outside 0..{palette.size - 1}: not encoded in the released palette")
        return Rows({"tokens": chunk.astype(np.uint16)})

    key = entry_key(identity=released.identity, split=split, seed=seed)
    build = RowBuild(len(rows), {"tokens": (np.uint16, (ids.shape[1],))}, compute, lambda *_: {})
    entry = read_entry("tokens", key) or build_rows("tokens", key, build)
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
