"""Named data sets in their canonical formats, and downloading them with checksums.

`digits` is bundled with scikit-learn (`shifted-digits` places them at random on a larger
canvas); MNIST and Fashion-MNIST are gzipped IDX files;
CIFAR-10/100 are the python-version pickles, read with an unpickler that admits only
the numpy types the files hold, so a doctored file cannot run code.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import os
import pickle
import shutil
import struct
import tarfile
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from igpt.errors import IgptError


@dataclass
class Split:
    """Images of one native split, with labels: a uint8 (N, H, W[, C]) array, or, for sources larger than
    memory, a sequence that reads one such image by index (memory-mapped files, batch files)."""

    images: np.ndarray | Sequence[np.ndarray]
    labels: np.ndarray | None


@dataclass
class Native:
    """What a source holds before hold-outs: its native splits, class names, an identity for caching."""

    splits: dict  # split name -> Split, or -> list of (name, loader) items for files
    classes: list[str] | None
    identity: str
    crop: bool = False  # always centre-crop to square (images that are not square, as the paper preprocessed them)


def cache_root() -> Path:
    return Path(os.environ.get("IGPT_CACHE") or Path.home() / ".cache" / "igpt")


# ---- downloads --------------------------------------------------------------------------------
def _digest(path: Path, algorithm: str) -> str:
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fetch(resource: dict, folder: Path | None = None) -> Path:
    """The file `resource` describes (url, filename, sha256 or md5), downloaded once into the cache.

    The download streams to a temporary file, is checked against its checksum, and only
    then renamed into place, so an interrupted or corrupted download is never used.
    """
    folder = folder or cache_root() / "downloads"
    path = folder / resource["filename"]
    algorithm = "sha256" if "sha256" in resource else "md5"
    if path.is_file():
        return path
    folder.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.part{os.getpid()}")
    try:
        with urllib.request.urlopen(resource["url"], timeout=60) as response, open(tmp, "wb") as out:
            shutil.copyfileobj(response, out, 1 << 20)
        actual = _digest(tmp, algorithm)
        if actual != resource[algorithm]:
            raise IgptError(
                f"download of {resource['url']} is corrupt ({algorithm} {actual[:12]}..., expected "
                f"{resource[algorithm][:12]}...); try again, or fetch it yourself and pass --data-dir"
            )
        os.replace(tmp, path)
    except (urllib.error.URLError, OSError, ValueError) as err:
        raise IgptError(
            f"cannot download {resource['url']} ({getattr(err, 'reason', err)}); fetch {resource['filename']} "
            "yourself and pass --data-dir FOLDER"
        ) from None
    finally:
        tmp.unlink(missing_ok=True)
    return path


# ---- MNIST-style IDX files ----------------------------------------------------------------------
def read_idx(path: Path) -> np.ndarray:
    """An IDX array (optionally gzipped): magic 0 0 type ndim, big-endian dims, then the data."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
        zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
        if zero != 0 or dtype_code != 0x08:
            raise ValueError("not an unsigned-byte IDX file")
        dims = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
        data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
        if data.size != int(np.prod(dims)):
            raise ValueError(f"expected {int(np.prod(dims))} values, found {data.size}")
        return data.reshape(dims)
    except (OSError, EOFError, struct.error, ValueError) as err:
        raise IgptError(f"{path} is not a valid IDX file ({err}); re-download it") from None


_IDX = {
    "mnist": {
        "url": "https://ossci-datasets.s3.amazonaws.com/mnist/",
        "classes": [str(i) for i in range(10)],
        "md5": {
            "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
            "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
            "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
            "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
        },
    },
    "fashion-mnist": {
        "url": "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
        "classes": ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                    "Ankle boot"],
        "sha256": {
            "train-images-idx3-ubyte.gz": "b0564c3eedabfbf835052cff8503ea422014ce006caf5b757f851416ee8300c7",
            "train-labels-idx1-ubyte.gz": "0ae29f65d86684f32d1b9c85147786c547b9c6aebcaf235f0400a0cce308b056",
            "t10k-images-idx3-ubyte.gz": "cc1d090a38ace84dfa1aa66e3ada7c336ef481a96936906477e6dd344da56eaa",
            "t10k-labels-idx1-ubyte.gz": "8d3605d196f4be44669e46906da9733c8131fef761fdbfec72c424d5222f1a05",
        },
    },
}


def _idx_file(name: str, filename: str, data_dir: Path | None) -> Path:
    spec = _IDX[name]
    if data_dir is not None:
        for candidate in (data_dir / filename, data_dir / filename[:-3]):
            if candidate.is_file():
                return candidate
        raise IgptError(f"--data-dir {data_dir} has no {filename} (or its unzipped form): point it at the {name} files")
    algorithm = "sha256" if "sha256" in spec else "md5"
    resource = {"url": spec["url"] + filename, "filename": filename, algorithm: spec[algorithm][filename]}
    return fetch(resource, cache_root() / "downloads" / name)


def load_idx_dataset(name: str, data_dir: Path | None) -> Native:
    splits = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images = read_idx(_idx_file(name, f"{prefix}-images-idx3-ubyte.gz", data_dir))
        labels = read_idx(_idx_file(name, f"{prefix}-labels-idx1-ubyte.gz", data_dir))
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise IgptError(f"{name} {split}: images {images.shape} and labels {labels.shape} do not match")
        splits[split] = Split(images, labels.astype(np.int64))
    return Native(splits, list(_IDX[name]["classes"]), f"{name}:{data_dir or 'download'}")


# ---- CIFAR python pickles ---------------------------------------------------------------------
class _ArrayUnpickler(pickle.Unpickler):
    """Admits only what CIFAR's pickles hold (builtin containers and numpy arrays); nothing can run."""

    allowed = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
    }

    def find_class(self, module, name):
        if (module, name) in self.allowed:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def _unpickle(raw: bytes, name: str) -> dict:
    try:
        return _ArrayUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except Exception as err:  # any malformed pickle
        raise IgptError(f"{name} is not a valid batch file ({err})") from None


_CIFAR = {
    "cifar10": {
        "resource": {"url": "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
                     "filename": "cifar-10-python.tar.gz", "md5": "c58f30108f718f92721af3b95e74349a"},
        "folder": "cifar-10-batches-py",
        "train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"],
        "meta": "batches.meta", "names": b"label_names", "labels": b"labels",
    },
    "cifar100": {
        "resource": {"url": "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
                     "filename": "cifar-100-python.tar.gz", "md5": "eb9058c3a382ffc7106e4002c42a8d85"},
        "folder": "cifar-100-python",
        "train": ["train"], "test": ["test"],
        "meta": "meta", "names": b"fine_label_names", "labels": b"fine_labels",
    },
}


def release_place(name: str, data_dir: Path | None, resource: dict, folder_name: str, wanted: list[str],
                  what: str) -> Path:
    """Where a released data set's files are: a folder holding all of `wanted` (--data-dir itself or its
    `folder_name`/), else the release archive (in --data-dir, or downloaded once into the cache)."""
    if data_dir is None:
        return fetch(resource, cache_root() / "downloads" / name)
    for folder in (data_dir, data_dir / folder_name):
        if all((folder / f).is_file() for f in wanted):
            return folder
    archive = data_dir / resource["filename"] if data_dir.is_dir() else data_dir
    if not archive.is_file():
        raise IgptError(f"--data-dir {data_dir} holds neither {folder_name}/ (or its files) nor "
                        f"{resource['filename']}: point it at {what}")
    return archive


def _cifar_files(name: str, data_dir: Path | None) -> dict[str, bytes]:
    """The batch files as bytes, from a batches folder, its parent, or the release tarball."""
    spec = _CIFAR[name]
    wanted = spec["train"] + spec["test"] + [spec["meta"]]
    tarball = release_place(name, data_dir, spec["resource"], spec["folder"], wanted,
                            f"the {name} python-version files")
    if tarball.is_dir():
        return {f: (tarball / f).read_bytes() for f in wanted}
    with release_members(tarball, wanted, f"the {name} python-version archive") as (archive, found):
        return {f: archive.extractfile(found[f]).read() for f in wanted}


@contextlib.contextmanager
def release_members(tarball: Path, wanted: list[str], what: str):
    """A release tarball open, with its files by name, each of `wanted` among them; a damaged one in one line."""
    try:
        with tarfile.open(tarball) as archive:
            found = {Path(m.name).name: m for m in archive.getmembers() if m.isfile()}
            missing = [f for f in wanted if f not in found]
            if missing:
                raise IgptError(f"{tarball} lacks {', '.join(missing)}: not {what}")
            yield archive, found
    except (tarfile.TarError, OSError, EOFError) as err:
        raise IgptError(f"{tarball} is not a readable archive ({err}); re-download it") from None


def load_cifar(name: str, data_dir: Path | None) -> Native:
    spec = _CIFAR[name]
    files = _cifar_files(name, data_dir)
    meta = _unpickle(files[spec["meta"]], spec["meta"])
    classes = [c.decode() if isinstance(c, bytes) else str(c) for c in meta[spec["names"]]]
    splits = {}
    for split in ("train", "test"):
        batches = [_unpickle(files[f], f) for f in spec[split]]
        try:
            data = np.concatenate([np.asarray(b[b"data"], dtype=np.uint8) for b in batches])
            labels = np.concatenate([np.asarray(b[spec["labels"]], dtype=np.int64) for b in batches])
        except KeyError as err:
            raise IgptError(f"{name} {split} batch lacks the field {err}") from None
        splits[split] = Split(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels)
    return Native(splits, classes, f"{name}:{data_dir or 'download'}")


def load_digits_dataset() -> Native:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8)
    return Native({"train": Split(images, bunch.target.astype(np.int64))}, [str(i) for i in range(10)], "digits")


SHIFTED_CANVAS = 12  # side of the blank canvas each 8x8 digit is placed in: offsets 0-4 down and across
SHIFTED_COPIES = 4  # placements of each training digit
SHIFTED_HELD_OUT = {"test": 360, "val": 180}  # source digits per held-out split (of 1,797)


def load_shifted_digits() -> Native:
    """sklearn's digits, each pasted at a seeded random place on a 12x12 canvas: a digit that moves, as
    objects do in photographs, so a linear classifier of raw pixels no longer separates the classes.

    Split by source digit (no digit is in two splits); each training digit appears at SHIFTED_COPIES
    places, each held-out digit at one. A fixed seed builds the same images on every machine."""
    digits = load_digits_dataset().splits["train"]
    rng = np.random.default_rng(0)
    order = rng.permutation(len(digits.images))
    ends = np.cumsum(list(SHIFTED_HELD_OUT.values()))
    parts = dict(zip([*SHIFTED_HELD_OUT, "train"], np.split(order, ends)))
    splits = {}
    for name, rows in parts.items():
        rows = np.tile(rows, SHIFTED_COPIES if name == "train" else 1)
        places = rng.integers(0, SHIFTED_CANVAS - 7, size=(len(rows), 2))
        canvas = np.zeros((len(rows), SHIFTED_CANVAS, SHIFTED_CANVAS), np.uint8)
        for image, row, (top, left) in zip(canvas, rows, places):
            image[top : top + 8, left : left + 8] = digits.images[row]
        splits[name] = Split(canvas, digits.labels[rows])
    held = "+".join(map(str, SHIFTED_HELD_OUT.values()))  # the cache's key: any change here builds anew
    return Native(splits, [str(i) for i in range(10)], f"shifted-digits:v1:{SHIFTED_CANVAS}x{SHIFTED_COPIES}:{held}")
