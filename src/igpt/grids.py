"""Image grids: images tiled into one picture (what `igpt sample` and `igpt complete` write, and what the
filling-in animation and the web page show), the layout of a completion figure, and the PNG writer."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

UNKNOWN = 127  # the grey of pixels not (yet) known: below the cut of an occluded input, ahead of the decoder


def completion_layout(palette, originals: np.ndarray, keep_rows: int) -> Callable[[np.ndarray], np.ndarray]:
    """Completions as sampled, (N x samples, R, R, 3), -> the rows of a completion figure: occluded input,
    completions, original, (N, samples + 2, R, R, 3)."""
    occluded = palette.decode(palette.encode(originals))
    occluded[:, keep_rows:] = UNKNOWN
    originals = np.asarray(originals)
    return lambda sampled: np.concatenate(
        [occluded[:, None], sampled.reshape(len(originals), -1, *sampled.shape[1:]), originals[:, None]], axis=1)


def image_grid(images: np.ndarray, columns: int | None = None, scale: int | None = None, pad: int = 1) -> np.ndarray:
    """Tile uint8 images (N, H, W, 3) into one image, each enlarged by nearest neighbour."""
    n, h, w = images.shape[:3]
    columns = columns or int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / columns))
    scale = scale or max(1, 64 // max(h, w))
    big = images.repeat(scale, 1).repeat(scale, 2)
    bh, bw = h * scale, w * scale
    grid = np.full((rows * (bh + pad) + pad, columns * (bw + pad) + pad, 3), 255, dtype=np.uint8)
    for i, img in enumerate(big):
        r, c = divmod(i, columns)
        grid[pad + r * (bh + pad) : pad + r * (bh + pad) + bh, pad + c * (bw + pad) : pad + c * (bw + pad) + bw] = img
    return grid


def save_grid(images: np.ndarray, path: str | Path, columns: int | None = None, scale: int | None = None) -> Path:
    from PIL import Image

    from igpt.fileio import atomic_write

    grid = Image.fromarray(image_grid(images, columns, scale))
    return atomic_write(path, lambda f: grid.save(f, format="PNG"))
