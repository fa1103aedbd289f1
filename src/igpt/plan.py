"""What to train on a data set when the command does not say: the resolution, the palette size, a budget.

`igpt train` and `igpt demo` start from the same judgement, made on the training images:

- the resolution: the images' own size (the shortest side in a sample), up to the paper's 32, so
  that a small image is never blown up;
- the palette: a colour per pixel of an image, between 16 and the paper's 512 (512 for 32x32,
  256 for 16x16), and never more colours than a sample of the images holds at that resolution;
- the budget: about a minute per 100,000 training pixels, between the 4 minutes the demo gives
  the digits and the 20 it gives the larger sets. The Trainer's --minutes then times the steps on
  this machine and runs as many as fit.
"""

from __future__ import annotations

import contextlib
from typing import NamedTuple

import numpy as np

from igpt.data import DataConfig, image_count, open_source
from igpt.data.folders import FileSplit
from igpt.data.images import decode, fit_to
from igpt.errors import IgptError
from igpt.palette import colour_codes

SURVEY_IMAGES = 64  # training images read to decide: enough to see the colours a palette needs
PAPER_RESOLUTION = 32
PALETTE_SIZES = (16, 512)  # the fewest and the most colours a palette gets by default (512: the paper's)
BUDGET_MINUTES = (4.0, 20.0)
PIXELS_PER_MINUTE = 100_000  # training pixels (images x resolution^2) a minute of the budget is given for


class Sizing(NamedTuple):
    """A data set's plan. None takes PretrainConfig's default (batch) or the demo's (probe images)."""

    resolution: int
    clusters: int
    budget_minutes: float
    batch_size: int | None = None
    probe_images: int | None = None


def sample_rows(n: int, seed: int = 0) -> np.ndarray:
    """A seeded choice of at most SURVEY_IMAGES of `n` rows, in order."""
    return np.sort(np.random.default_rng(seed).choice(n, min(n, SURVEY_IMAGES), replace=False))


def palette_size(images: np.ndarray) -> int:
    """The palette for uint8 images (N, R, R, 3): a colour per pixel within PALETTE_SIZES, at most the distinct
    colours of a seeded sample of them."""
    sample = np.asarray(images[sample_rows(len(images))])
    distinct = len(np.unique(colour_codes(sample, rgb=True)))
    fewest, most = PALETTE_SIZES
    return min(distinct, max(fewest, min(most, sample.shape[1] * sample.shape[2])))


def budget_minutes(train_images: int, resolution: int) -> float:
    """Minutes of training for `train_images` images at `resolution`: PIXELS_PER_MINUTE, within BUDGET_MINUTES."""
    fewest, most = BUDGET_MINUTES
    return float(min(most, max(fewest, train_images * resolution**2 / PIXELS_PER_MINUTE)))


def native_side(data: DataConfig) -> int:
    """The images' own size: the shortest side among a seeded sample of the training split's images (cropped to
    square where the data is), unreadable files passed over (loading the data reports them)."""
    native = open_source(data.name, data.data_dir)
    crop = data.crop or native.crop
    split = native.splits.get("train") or next(iter(native.splits.values()))
    rows = sample_rows(image_count(split)).tolist()
    if isinstance(split, FileSplit):
        images = []
        for file, source in split.read(rows):
            with contextlib.suppress(IgptError):
                images.append(fit_to(decode(source, file), None, crop))
    else:
        images = [fit_to(np.asarray(split.images[i]), None, crop) for i in rows]
    if not images:
        raise IgptError(f"{data.name}: no readable training images")
    return min(min(image.shape[:2]) for image in images)


def resolution_for(data: DataConfig, max_resolution: int = PAPER_RESOLUTION) -> int:
    """The images' own size, up to `max_resolution`."""
    return min(native_side(data), max_resolution)


def size_data(data: DataConfig) -> Sizing:
    """The plan for `data` at its resolution: the palette size and the budget from its training split there."""
    train = data.images("train").images
    return Sizing(data.resolution, palette_size(train), budget_minutes(len(train), data.resolution))
