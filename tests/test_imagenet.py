"""Downsampled ImageNet: the canonical .npz and pickled batches, their layouts, splits and bad input."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest

from conftest import run_refused

from igpt import IgptError, Palette, data
from igpt.data import imagenet
from igpt.data.images import fit_to

TRAIN_COUNTS = (2, 3, 1, 2, 2, 3, 1, 2, 2, 2)  # images in train_data_batch_1..10: 20 in all, 2 held out for val
VAL_COUNT = 4


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("IGPT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def write_batch(path: Path, images: np.ndarray, labels: np.ndarray, fmt: str) -> None:
    """One batch as the release stores it: channel planes, labels 1..1000, and the mean image."""
    planes = images.transpose(0, 3, 1, 2).reshape(len(images), -1)
    batch = {"data": planes, "labels": (labels + 1).tolist(), "mean": planes.mean(0)}
    if fmt == "npz":
        np.savez(path.with_name(path.name + ".npz"), **batch)
    else:
        path.write_bytes(pickle.dumps(batch))


def write_release(root: Path, side: int, fmt: str, layout: str = "one folder", seed: int = 0) -> dict:
    """A tiny release in `layout` ("one folder" or the download's own subfolders); returns its images and labels."""
    rng = np.random.default_rng(seed)
    made = {}
    for split, counts in (("train", TRAIN_COUNTS), ("test", (VAL_COUNT,))):
        images = rng.integers(0, 256, (sum(counts), side, side, 3), dtype=np.uint8)
        labels = rng.integers(0, 1000, sum(counts))
        labels[:2] = (0, 999)  # both ends of the range
        made[split] = images, labels
        stems = imagenet.BATCHES[split]
        for k, (stem, start) in enumerate(zip(stems, np.cumsum((0, *counts)))):
            folder = root / _subfolder(layout, side, fmt, split, k)
            folder.mkdir(parents=True, exist_ok=True)
            rows = slice(start, start + counts[k])
            write_batch(folder / stem, images[rows], labels[rows], fmt)
    return made


def _subfolder(layout: str, side: int, fmt: str, split: str, batch: int) -> str:
    if layout == "one folder":
        return ""
    suffix = "_npz" if fmt == "npz" else ""
    if split == "test":
        return f"Imagenet{side}_val{suffix}"
    return f"Imagenet{side}_train_part{1 + batch // 5}{suffix}" if side == 64 else f"Imagenet{side}_train{suffix}"


@pytest.mark.parametrize("side, fmt, layout", [(32, "npz", "one folder"), (32, "pickle", "subfolders"),
                                               (64, "npz", "subfolders"), (64, "pickle", "one folder")])
def test_release_reads_pixel_for_pixel(tmp_path, side, fmt, layout):
    made = write_release(tmp_path / "release", side, fmt, layout)
    name, root = f"imagenet{side}", tmp_path / "release"
    test = data.load(name, "test", None, data_dir=root)
    np.testing.assert_array_equal(test.images, made["test"][0])  # the native test split is val_data
    np.testing.assert_array_equal(test.labels, made["test"][1])  # 1..1000 in the files, 0..999 here
    assert test.classes == [str(i) for i in range(1, 1001)] and test.images.shape[1:] == (side, side, 3)
    native = data.open_source(name, root)
    train_images, train_labels = made["train"]
    for split in ("train", "val"):
        loaded = data.load(name, split, None, data_dir=root)
        rows = data._plan(native, split, seed=0)[1]
        np.testing.assert_array_equal(loaded.images, train_images[rows])
        np.testing.assert_array_equal(loaded.labels, train_labels[rows])
    assert len(data.load(name, "val", None, data_dir=root)) == 2 and "val: seeded 10% of train" in loaded.describe()


def test_data_config_resizes_and_tokenises(tmp_path):
    made = write_release(tmp_path, 64, "npz")
    described = data.DataConfig(name="imagenet64", data_dir=str(tmp_path), resolution=8)
    expected = np.stack([fit_to(image, 8, False) for image in made["test"][0]])
    np.testing.assert_array_equal(described.images("test").images, expected)
    palette = Palette(np.array([[-1, -1, -1], [0, 0, 0], [1, 1, 1], [1, -1, 0]], np.float32))
    tokens = described.tokens("test", palette, require_labels=True)
    np.testing.assert_array_equal(tokens.tokens, palette.encode(expected))
    np.testing.assert_array_equal(tokens.labels, made["test"][1])


def test_one_batch_is_decoded_at_a_time_and_labels_are_read_once(tmp_path, monkeypatch):
    write_release(tmp_path, 32, "pickle")
    native = data.open_source("imagenet32", tmp_path)
    assert isinstance(native.splits["train"].images, imagenet.BatchImages)
    reads = []
    field = imagenet._field
    monkeypatch.setattr(imagenet, "_field", lambda path, name: reads.append((path.name, name)) or field(path, name))
    data.open_source("imagenet32", tmp_path)
    assert reads == []  # labels and batch sizes come from the cache
    data.load("imagenet32", "train", None, data_dir=tmp_path)
    assert reads == [(stem, "data") for stem in imagenet.BATCHES["train"]]


def test_a_replaced_file_is_not_read_from_a_stale_cache(tmp_path):
    write_release(tmp_path, 32, "npz")
    data.load("imagenet32", "test", None, data_dir=tmp_path)
    images = np.random.default_rng(7).integers(0, 256, (VAL_COUNT, 32, 32, 3), dtype=np.uint8)
    (tmp_path / "val_data.npz").unlink()
    write_batch(tmp_path / "val_data", images, np.arange(VAL_COUNT), "npz")
    os.utime(tmp_path / "val_data.npz", ns=(1, 1))  # same size, another time
    np.testing.assert_array_equal(data.load("imagenet32", "test", None, data_dir=tmp_path).images, images)


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _relabel(value):
    def damage(path: Path) -> None:
        with np.load(path) as batch:
            fields = dict(batch)
        fields["labels"][0] = value
        np.savez(path, **fields)
    return damage


def _narrow(path: Path) -> None:
    with np.load(path) as batch:
        fields = dict(batch)
    np.savez(path, **{**fields, "data": fields["data"][:, :-1]})


class Payload:
    def __reduce__(self):
        return (print, ("pwned",))


# (format, damaged file, what is done to it, words the one line must contain)
DAMAGE = [
    ("npz", "train_data_batch_3.npz", _truncate, "not a readable batch file"),
    ("pickle", "train_data_batch_3", _truncate, "not a valid batch file"),
    ("npz", "val_data.npz", _relabel(0), "labels outside 1..1000"),
    ("npz", "val_data.npz", _relabel(1001), "labels outside 1..1000"),
    ("npz", "val_data.npz", Path.unlink, "lacks val_data"),
    ("pickle", "train_data_batch_10", Path.unlink, "lacks train_data_batch_10"),
    ("npz", "train_data_batch_2.npz", _narrow, "not uint8 rows of 3x32x32=3072"),
    ("pickle", "val_data", lambda path: path.write_bytes(pickle.dumps({"data": Payload()})), "refusing to load"),
]


@pytest.mark.parametrize("fmt, name, damage, words", DAMAGE, ids=[f"{d[1]}: {d[3]}" for d in DAMAGE])
def test_bad_release_ends_in_one_line_and_writes_nothing(fmt, name, damage, words, tmp_path, monkeypatch, capsys):
    write_release(tmp_path / "release", 32, fmt)
    damage(tmp_path / "release" / name)
    (tmp_path / "cwd").mkdir()
    err = run_refused(["palette", "fit", "--data", "imagenet32", "--data-dir", str(tmp_path / "release"), "--out",
                       "p.npy"], tmp_path / "cwd", monkeypatch, capsys)
    assert words in err, err
    pixels = tmp_path / "cache" / "pixels"
    assert not pixels.exists() or list(pixels.iterdir()) == []


def test_the_other_size_is_named(tmp_path):
    write_release(tmp_path, 64, "npz")
    with pytest.raises(IgptError, match="use --data imagenet64"):
        data.load("imagenet32", "test", data_dir=tmp_path)


def test_without_data_dir_says_where_the_files_come_from(tmp_path, monkeypatch, capsys):
    err = run_refused(["palette", "fit", "--data", "imagenet64", "--out", "p.npy"], tmp_path, monkeypatch, capsys)
    assert "--data-dir" in err and "image-net.org/download-images.php" in err and "Downsampled ImageNet 64x64" in err
