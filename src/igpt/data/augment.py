"""Augmentation on uint8 pixels, before encoding, one call per batch.

Pretraining uses random resized crops (docs/reference.md §5); fine-tuning uses reflect-pad-4, random crop
and horizontal flip (docs/reference.md §6.2). Both take a numpy Generator, so a step's augmentation is a
function of its seed alone.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image


def random_resized_crop(
    images: np.ndarray,
    out_res: int,
    rng: np.random.Generator,
    scale: tuple[float, float] = (0.25, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> np.ndarray:
    """For each image, a crop of random area fraction and aspect ratio, resized to out_res x out_res."""
    n, h, w = images.shape[:3]
    area = rng.uniform(scale[0], scale[1], n) * h * w
    aspect = np.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1]), n))
    cw = np.clip(np.rint(np.sqrt(area * aspect)), 1, w).astype(int)
    ch = np.clip(np.rint(np.sqrt(area / aspect)), 1, h).astype(int)
    top = (rng.random(n) * (h - ch + 1)).astype(int)
    left = (rng.random(n) * (w - cw + 1)).astype(int)
    out = np.empty((n, out_res, out_res, 3), dtype=np.uint8)
    for i in range(n):
        crop = Image.fromarray(np.ascontiguousarray(images[i, top[i] : top[i] + ch[i], left[i] : left[i] + cw[i]]))
        shrinking = out_res <= min(ch[i], cw[i])
        out[i] = np.asarray(crop.resize((out_res, out_res), Image.BOX if shrinking else Image.BICUBIC))
    return out


def pad_crop_flip(images: np.ndarray, rng: np.random.Generator, pad: int = 4, flip: bool = True) -> np.ndarray:
    """Reflect-pad by `pad`, crop back to the original size at a random offset, flip half of them (with `flip`)."""
    n, h, w = images.shape[:3]
    padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode="reflect")
    dy = rng.integers(0, 2 * pad + 1, n)
    dx = rng.integers(0, 2 * pad + 1, n)
    flip = (rng.random(n) < 0.5) & flip
    rows = dy[:, None] + np.arange(h)
    cols = dx[:, None] + np.arange(w)
    cols = np.where(flip[:, None], cols[:, ::-1], cols)
    return padded[np.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :]]
