"""ILSVRC-2012 as released: `--data imagenet --data-dir D`.

D holds `train/<wnid>/*.JPEG` (the training archive's class folders, unpacked) and the validation
images, either in class folders (`val/<wnid>/*.JPEG`) or flat as released
(`val/ILSVRC2012_val_00000001.JPEG`, ...) beside the development kit: its
`data/ILSVRC2012_validation_ground_truth.txt` (the ILSVRC2012_ID of each validation image, in file
order) and `data/meta.mat` (ILSVRC2012_ID -> WNID), in D/ILSVRC2012_devkit_t12/ or D itself.
Nothing is downloaded: ImageNet's licence asks each user to fetch it.

Classes are the WNIDs in sorted order, as class folders number them. Native splits: `train`, and
`test` = the validation images (the test labels are not public; the paper reports on validation);
igpt's `val` is the seeded hold-out of train. The images are not square, so they are always
centre-cropped before resizing, as the paper preprocessed them.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import numpy as np

from igpt.data.folders import FileSplit, is_image, stamp
from igpt.data.imagenet import WHERE
from igpt.data.sources import Native
from igpt.errors import IgptError

DEVKIT = "ILSVRC2012_devkit_t12"
GROUND_TRUTH = "ILSVRC2012_validation_ground_truth.txt"
VAL_NUMBER = re.compile(r"ILSVRC2012_val_(\d+)\.", re.IGNORECASE)


def load_ilsvrc(data_dir: Path | None) -> Native:
    if data_dir is None or not (data_dir / "train").is_dir() or not (data_dir / "val").is_dir():
        place = f"--data-dir {data_dir} lacks train/ or val/" if data_dir else "imagenet needs --data-dir"
        raise IgptError(f"{place}: ImageNet's licence asks you to download it yourself: get ILSVRC2012 (train, val and "
                        f"the devkit) from {WHERE}, unpack it and pass --data-dir FOLDER holding train/<wnid>/ and val/")
    train = _images(data_dir / "train")
    classes = sorted({path.parent.name for path in train})
    index = {wnid: i for i, wnid in enumerate(classes)}
    val = _images(data_dir / "val")
    if all(path.parent != data_dir / "val" for path in val):  # class folders
        unknown = sorted({path.parent.name for path in val} - set(index))
        if unknown:
            raise IgptError(f"{data_dir / 'val'} has classes that train/ lacks: {', '.join(unknown[:3])}")
        val_labels = [index[path.parent.name] for path in val]
    else:
        val_labels = [index.get(wnid, -1) for wnid in _ground_truth(data_dir, val)]
        if min(val_labels, default=0) < 0:
            raise IgptError(f"the devkit's ground truth names classes that {data_dir / 'train'} lacks")
    listing = hashlib.sha256("\n".join(stamp(p) for p in (*train, *val)).encode()).hexdigest()
    splits = {"train": _split(data_dir, train, [index[p.parent.name] for p in train]),
              "test": _split(data_dir, val, val_labels)}
    return Native(splits, classes, f"ilsvrc2012:{data_dir.resolve()}:{listing}", crop=True)


def _images(folder: Path) -> list[Path]:
    files = sorted(p for p in folder.rglob("*") if p.is_file() and is_image(p.relative_to(folder).as_posix()))
    if not files:
        raise IgptError(f"{folder} holds no images: unpack the ILSVRC2012 archive into it")
    return files


def _split(root: Path, files: list[Path], labels: list[int]) -> FileSplit:
    names = [p.relative_to(root).as_posix() for p in files]

    def read(indices):
        for i in indices:
            yield names[i], files[i]

    return FileSplit(names, np.asarray(labels, dtype=np.int64), read)


def _ground_truth(root: Path, val: list[Path]) -> list[str]:
    """The WNID of each flat validation image, from the devkit's ground truth and meta.mat."""
    data = next((d for d in (root / DEVKIT / "data", root / "data", root) if (d / GROUND_TRUTH).is_file()), None)
    if data is None or not (data / "meta.mat").is_file():
        raise IgptError(f"{root / 'val'} is flat, so its labels come from the devkit: put {DEVKIT}/data/{GROUND_TRUTH} "
                        "and meta.mat in --data-dir (or sort val/ into class folders)")
    from scipy.io import loadmat  # scikit-learn's dependency, needed only here

    try:
        synsets = loadmat(data / "meta.mat", squeeze_me=True)["synsets"]
        wnid_of = {int(i): str(w) for i, w in zip(synsets["ILSVRC2012_ID"], synsets["WNID"])}
        ids = [int(line) for line in (data / GROUND_TRUTH).read_text().split()]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise IgptError(f"the devkit in {data} is unreadable ({err}); re-download it") from None
    wnids = []
    for path in val:
        number = VAL_NUMBER.search(path.name)
        if number is None or not 1 <= int(number[1]) <= len(ids) or ids[int(number[1]) - 1] not in wnid_of:
            raise IgptError(f"{path.name} has no entry in the devkit's {GROUND_TRUTH}: is it an ILSVRC2012 "
                            "validation image?")
        wnids.append(wnid_of[ids[int(number[1]) - 1]])
    return wnids
