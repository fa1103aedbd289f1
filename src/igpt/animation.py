"""The filling-in animation: the image grid as the decoder writes it, a frame every few rows (GIF or WebP).

Frames come from the sampling loop itself (`sample(..., watch=animation.watch)`), so the
animation shows the very images the grid ends with, not a second sampling run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import torch

from igpt.errors import IgptError
from igpt.palette import Palette
from igpt.grids import UNKNOWN, completion_layout, image_grid

FORMATS = {".gif": "GIF", ".webp": "WEBP"}
FRAME_MS = 120
HOLD_MS = 2500  # the finished grid stays up before the loop starts again


def check_animation_path(path: str | Path) -> Path:
    """The output path, refused up front (before any sampling) unless it ends in .gif or .webp."""
    path = Path(path)
    if path.suffix.lower() not in FORMATS:
        raise IgptError(f"--animate {path}: the animation is written as .gif or .webp; name the file so")
    return path


class Animation:
    """Frames of a grid of `n` images being decoded; `layout` turns the decoded images (n, R, R, 3)
    into the images the grid shows, in order (completions add the occluded input and the original)."""

    def __init__(self, palette: Palette, n: int, side: int, *, columns: int | None = None,
                 layout: Callable[[np.ndarray], np.ndarray] | None = None, every_rows: int | None = None):
        self.palette, self.side, self.columns = palette, side, columns
        self.layout = layout or (lambda images: images)
        self.every = (every_rows or max(1, side // 16)) * side  # pixels between frames
        self.tokens = np.full((n, side * side), -1, dtype=np.int64)
        self.frames: list[np.ndarray] = []
        self.batches: set[int] = set()  # the first image of each batch seen so far

    @classmethod
    def of_completions(cls, palette: Palette, originals: np.ndarray, keep_rows: int, samples: int, **options):
        """The animation of `completion_rows`' grid: per image a row of the occluded input, the `samples`
        completions filling in, and the original."""
        layout, side = completion_layout(palette, originals, keep_rows), originals.shape[1]
        return cls(palette, len(originals) * samples, side, columns=samples + 2,
                   layout=lambda images: layout(images).reshape(-1, side, side, 3), **options)

    def watch(self, first: int, tokens: torch.Tensor, filled: int) -> None:
        """sample()'s callback: copy what is decoded so far; a frame at the start, then every few rows."""
        self.tokens[first : first + len(tokens), :filled] = tokens[:, :filled].cpu().numpy()
        starting = first not in self.batches
        self.batches.add(first)
        if not self.frames or (not starting and (filled % self.every == 0 or filled == self.tokens.shape[1])):
            self.frames.append(self.grid())

    def grid(self) -> np.ndarray:
        known = self.tokens >= 0
        images = self.palette.decode(np.where(known, self.tokens, 0))
        images[~known.reshape(len(known), self.side, self.side)] = UNKNOWN
        return image_grid(self.layout(images), self.columns)

    def save(self, path: str | Path) -> Path:
        """Write the frames (the last held) as an endlessly looping GIF or WebP, atomically."""
        from PIL import Image

        from igpt.fileio import atomic_write

        path = check_animation_path(path)
        if not self.frames:
            raise IgptError("nothing was decoded, so there is no animation to write")
        frames = [Image.fromarray(frame) for frame in self.frames]
        durations = [FRAME_MS] * (len(frames) - 1) + [HOLD_MS]
        return atomic_write(path, lambda f: frames[0].save(
            f, format=FORMATS[path.suffix.lower()], save_all=True, append_images=frames[1:], duration=durations,
            loop=0))
