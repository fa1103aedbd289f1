"""ILSVRC-2012 as released: class folders for train, validation flat with the devkit's ground truth or in class
folders, every image centre-cropped then resized, and the missing pieces named in one line."""

import io

import numpy as np
import pytest
import scipy.io
from PIL import Image

from igpt import IgptError, data
from igpt.data.images import fit_to

WNIDS = ["n01440764", "n01443537", "n01484850"]  # sorted: the class numbering
IDS = {"n01484850": 1, "n01440764": 2, "n01443537": 3}  # the devkit's own ILSVRC2012_IDs, in another order


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("IGPT_CACHE", str(tmp_path / "cache"))


def jpeg(seed: int) -> bytes:
    """A 20x12 picture: wider than tall, so the centre crop matters."""
    pixels = np.random.default_rng(seed).integers(0, 256, (12, 20, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="JPEG")
    return out.getvalue()


def write_release(root, flat_val=True):
    for c, wnid in enumerate(WNIDS):
        (root / "train" / wnid).mkdir(parents=True)
        for i in range(4):
            (root / "train" / wnid / f"{wnid}_{i}.JPEG").write_bytes(jpeg(10 * c + i))
    val_wnids = [WNIDS[i % 3] for i in range(6)]
    for i, wnid in enumerate(val_wnids, start=1):
        folder = root / "val" if flat_val else root / "val" / wnid
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"ILSVRC2012_val_{i:08d}.JPEG").write_bytes(jpeg(100 + i))
    if flat_val:
        devkit = root / "ILSVRC2012_devkit_t12" / "data"
        devkit.mkdir(parents=True)
        (devkit / "ILSVRC2012_validation_ground_truth.txt").write_text("".join(f"{IDS[w]}\n" for w in val_wnids))
        synsets = np.zeros(len(IDS), dtype=[("ILSVRC2012_ID", "O"), ("WNID", "O")])
        for row, (wnid, number) in enumerate(IDS.items()):
            synsets[row] = (number, wnid)
        scipy.io.savemat(devkit / "meta.mat", {"synsets": synsets})
    return [WNIDS.index(w) for w in val_wnids]


@pytest.mark.parametrize("flat_val", [True, False], ids=["flat val with the devkit", "val in class folders"])
def test_the_release_reads_with_its_labels_centre_cropped(tmp_path, flat_val):
    val_labels = write_release(tmp_path, flat_val)
    test = data.load("imagenet", "test", 8, data_dir=tmp_path)
    assert test.classes == WNIDS and list(test.labels) == (val_labels if flat_val else sorted(val_labels))  # path order
    first = tmp_path / "val" / ("" if flat_val else WNIDS[0]) / "ILSVRC2012_val_00000001.JPEG"
    expected = fit_to(np.asarray(Image.open(first).convert("RGB")), 8, crop=True)
    np.testing.assert_array_equal(test.images[0], expected)  # cropped to 12x12, then resized, without --crop
    train, val = (data.load("imagenet", split, 8, data_dir=tmp_path) for split in ("train", "val"))
    assert len(train) + len(val) == 12 and len(val) == 1  # val: a seeded 10% of train
    assert sorted([*train.labels, *val.labels]) == sorted([0, 1, 2] * 4)


@pytest.mark.parametrize("damage, match", [
    (lambda root: None, "imagenet needs --data-dir"),
    (lambda root: (root / "ILSVRC2012_devkit_t12" / "data" / "meta.mat").unlink(), "labels come from the devkit"),
    (lambda root: (root / "val" / "ILSVRC2012_val_00000009.JPEG").write_bytes(jpeg(0)), "no entry in the devkit"),
], ids=["no data dir", "no meta.mat", "an image beyond the ground truth"])
def test_missing_pieces_are_named(tmp_path, damage, match):
    write_release(tmp_path)
    damage(tmp_path)
    with pytest.raises(IgptError, match=match):
        data.load("imagenet", "test", 8, data_dir=None if "needs" in match else tmp_path)
