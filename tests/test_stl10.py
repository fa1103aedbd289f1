"""STL-10's binary release: column-major planes read pixel for pixel, labels 1..10, the unlabelled images for
pretraining, the tarball unpacked once, the download checked, and damaged files refused in one line."""

import hashlib
import tarfile
from pathlib import Path

import numpy as np
import pytest

from igpt import IgptError, data
from igpt.cli import main
from igpt.data import stl10

NAMES = ["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"]


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("IGPT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def column_major(images: np.ndarray) -> bytes:
    """The release's byte order, written out loop by loop: per image, per channel, per column, per row."""
    out = bytearray()
    for image in images:
        for c in range(3):
            for x in range(stl10.SIDE):
                out += image[:, x, c].tobytes()
    return bytes(out)


def write_release(folder: Path, n_train=20, n_test=10, n_unlabelled=15) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    arrays = {name: rng.integers(0, 256, (n, 96, 96, 3), dtype=np.uint8)
              for name, n in (("train", n_train), ("test", n_test), ("unlabeled", n_unlabelled))}
    folder.mkdir(parents=True, exist_ok=True)
    for name, images in arrays.items():
        (folder / f"{name}_X.bin").write_bytes(column_major(images))
    for name, n in (("train", n_train), ("test", n_test)):
        arrays[f"{name}_labels"] = np.arange(n) % 10
        (folder / f"{name}_y.bin").write_bytes((arrays[f"{name}_labels"] + 1).astype(np.uint8).tobytes())
    (folder / "class_names.txt").write_text("\n".join(NAMES) + "\n")
    return arrays


def tarball_of(folder: Path, path: Path) -> Path:
    with tarfile.open(path, "w:gz") as archive:
        archive.add(folder, arcname=stl10.FOLDER)
    return path


def test_the_labelled_folds_read_pixel_for_pixel(tmp_path):
    arrays = write_release(tmp_path / "stl10_binary")
    raw = (tmp_path / "stl10_binary" / "train_X.bin").read_bytes()
    assert raw[stl10.SIDE] == arrays["train"][0, 0, 1, 0]  # the second byte run is column 1: column-major
    test = data.load("stl10", "test", None, data_dir=tmp_path)  # the folder's stl10_binary/ is found
    np.testing.assert_array_equal(test.images, arrays["test"])
    np.testing.assert_array_equal(test.labels, arrays["test_labels"])
    assert test.classes == NAMES and test.resolution == 96
    train, val = (data.load("stl10", split, None, data_dir=tmp_path / "stl10_binary") for split in ("train", "val"))
    assert len(train) + len(val) == 20 and len(val) == 2  # val: a seeded 10% of train
    together = np.concatenate([train.images, val.images])
    assert sorted(map(bytes, together)) == sorted(map(bytes, arrays["train"]))
    small = data.DataConfig(name="stl10", data_dir=str(tmp_path), resolution=8).images("test")
    assert small.images.shape == (10, 8, 8, 3)


def test_the_unlabelled_images_serve_pretraining(tmp_path):
    arrays = write_release(tmp_path)
    train, val, test = (data.load("stl10+unlabeled", split, None, data_dir=tmp_path) for split in ("train", "val", "test"))
    assert train.labels is None and train.classes is None and len(train) + len(val) == 35
    together = np.concatenate([train.images, val.images])
    assert sorted(map(bytes, together)) == sorted(map(bytes, np.concatenate([arrays["unlabeled"], arrays["train"]])))
    np.testing.assert_array_equal(test.images, arrays["test"])
    with pytest.raises(IgptError, match="no labels"):
        data.load("stl10+unlabeled", "train", None, data_dir=tmp_path, require_labels=True)


def test_the_tarball_is_unpacked_once_and_the_download_checked(tmp_path, cache, monkeypatch):
    arrays = write_release(tmp_path / "release")
    (tmp_path / "given").mkdir()
    tarball = tarball_of(tmp_path / "release", tmp_path / "given" / stl10.RESOURCE["filename"])
    np.testing.assert_array_equal(data.load("stl10", "test", None, data_dir=tmp_path / "given").images, arrays["test"])
    unpacked = next((cache / "stl10").iterdir())
    stamp = (unpacked / "test_X.bin").stat().st_mtime_ns
    data.load("stl10", "test", 16, data_dir=tmp_path / "given")
    assert (unpacked / "test_X.bin").stat().st_mtime_ns == stamp and len(list((cache / "stl10").iterdir())) == 1
    digest = hashlib.md5(tarball.read_bytes()).hexdigest()
    monkeypatch.setattr(stl10, "RESOURCE", {**stl10.RESOURCE, "url": tarball.as_uri(), "md5": digest})
    np.testing.assert_array_equal(data.load("stl10", "test", None).images, arrays["test"])
    assert (cache / "downloads" / "stl10" / stl10.RESOURCE["filename"]).is_file()
    monkeypatch.setenv("IGPT_CACHE", str(tmp_path / "fresh"))
    monkeypatch.setattr(stl10, "RESOURCE", {**stl10.RESOURCE, "md5": "0" * 32})
    with pytest.raises(IgptError, match="corrupt"):
        data.load("stl10", "test", None)


@pytest.mark.parametrize("damage, match", [
    (lambda d: (d / "test_X.bin").write_bytes((d / "test_X.bin").read_bytes()[:-5]), "not a whole number of 96x96"),
    (lambda d: (d / "test_y.bin").write_bytes(bytes([1] * 9)), "holds 10 images but test_y.bin 9 labels"),
    (lambda d: (d / "train_y.bin").write_bytes(bytes([11] * 20)), "labels outside 1..10"),
    (lambda d: (d / "test_X.bin").unlink(), "holds neither .* nor stl10_binary.tar.gz"),
], ids=["truncated images", "label count", "label range", "missing file"])
def test_damaged_releases_are_refused_in_one_line(tmp_path, capsys, damage, match):
    write_release(tmp_path)
    damage(tmp_path)
    with pytest.raises(IgptError, match=match):
        data.load("stl10", "test", None, data_dir=tmp_path)
    out = tmp_path / "palette.npy"
    assert main(["palette", "fit", "--data", "stl10", "--data-dir", str(tmp_path), "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("igpt: error:") and not out.exists()
