"""Training batches: which images each step sees, their augmentation, and the BERT masks.

Every random choice of step s (which images, their crops, the BERT mask) is drawn from a
named stream seeded by (seed, stream, s, ...), never from a generator carried along. So a
resumed run, a run with gradient accumulation and a run on N processes all see exactly the
same global batches, and a run folder needs no RNG state to continue bit for bit.

Under torchrun each process reads only its share of each global batch (`process_rows`, the split
`train_step` computes on), its rows read from the token cache's file one by one (`gather_rows`):
no process reads the rows of another, and none holds more of a split than its batches.
"""

from __future__ import annotations

import enum
import threading
from dataclasses import dataclass
from queue import Queue
from typing import Callable

import numpy as np
import torch

from igpt import data
from igpt.data.cache import gather_rows
from igpt.distributed import World
from igpt.errors import IgptError
from igpt.palette import Palette


class Stream(enum.IntEnum):
    """The independent random streams of a run."""

    ORDER = 0  # the permutation of the training images, per epoch
    AUGMENT = 1  # crops and flips, per step
    BERT_MASK = 2  # masked positions, per step and micro-batch
    EVAL_MASK = 3  # masked positions of evaluation batches (fixed, so evaluations compare)


def seed_of(seed: int, stream: Stream, *parts: int) -> int:
    """A 63-bit seed for (`seed`, `stream`, parts...): distinct tuples give independent draws."""
    words = [abs(int(seed)), int(stream), *(abs(int(p)) for p in parts)]
    return int(np.random.SeedSequence(words).generate_state(1, np.uint64)[0] >> 1)


def process_rows(size: int, grad_accum: int, world: World) -> list[slice]:
    """The rows of a global batch of `size` that process `world.rank` computes: its share of each of the
    `grad_accum` micro-batches, in order."""
    micro = size // grad_accum
    share = micro // world.size
    return [slice(j * micro + world.rank * share, j * micro + (world.rank + 1) * share) for j in range(grad_accum)]


@dataclass
class Batch:
    """A global batch of `size` images, of which this process holds `tokens` (rows, n) and, for classification,
    labels: every row, or where `held` is given, the rows at those places in the global batch."""

    tokens: torch.Tensor
    labels: torch.Tensor | None = None
    held: np.ndarray | None = None
    size: int | None = None

    def __len__(self) -> int:
        return len(self.tokens) if self.held is None else self.size

    @property
    def shape(self) -> tuple[int, int]:
        """(images, tokens per image) of the global batch."""
        return len(self), self.tokens.shape[1]

    def rows(self, part: slice) -> "Batch":
        """Rows `part` of the global batch, which this process must hold."""
        if self.held is not None:
            wanted = np.arange(*part.indices(len(self)))
            local = np.searchsorted(self.held, wanted).clip(max=len(self.held) - 1)
            if not np.array_equal(self.held[local], wanted):
                raise ValueError(f"rows {part} of the global batch are not all held by this process")
            part = slice(int(local[0]), int(local[-1]) + 1) if len(local) else slice(0, 0)
        return Batch(self.tokens[part], None if self.labels is None else self.labels[part])

    def to(self, device: torch.device) -> "Batch":
        labels = None if self.labels is None else self.labels.to(device, non_blocking=True)
        return Batch(self.tokens.to(device, non_blocking=True), labels, self.held, self.size)


Augmentation = Callable[[np.ndarray, np.random.Generator], np.ndarray]  # (image rows, rng) -> tokens


class ResizedCrops:
    """Pretraining's augmentation: random resized crops of `pixels` down to `resolution` (docs/reference.md §5)."""

    def __init__(self, pixels: np.ndarray, resolution: int, palette: Palette):
        self.pixels, self.resolution, self.palette = pixels, resolution, palette

    def __call__(self, rows: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return self.palette.encode(data.random_resized_crop(gather_rows(self.pixels, rows), self.resolution, rng))


class PadCropFlip:
    """Fine-tuning's augmentation: reflect-pad, random crop back, optional mirror (docs/reference.md §6.2)."""

    def __init__(self, pixels: np.ndarray, palette: Palette, flip: bool):
        self.pixels, self.palette, self.flip = pixels, palette, flip
        self.pad = max(1, round(4 * pixels.shape[1] / 32))  # the paper's 4 pixels at 32x32, scaled

    def __call__(self, rows: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        pixels = data.pad_crop_flip(gather_rows(self.pixels, rows), rng, pad=self.pad, flip=self.flip)
        return self.palette.encode(pixels)


class Batches:
    """The global batch of any step: a seeded permutation per epoch, augmented when asked."""

    def __init__(self, size: int, seed: int, tokens: np.ndarray, labels: np.ndarray | None = None,
                 augment: Augmentation | None = None):
        if len(tokens) < size:
            raise IgptError(f"--batch-size {size} exceeds the {len(tokens)} training images; lower it")
        self.size, self.seed, self.tokens, self.augment = size, seed, tokens, augment
        self.labels = None if labels is None else np.asarray(labels)
        self.per_epoch = len(tokens) // size
        self.held: np.ndarray | None = None  # the places in each global batch this process reads; None: all
        self._order: tuple[int, np.ndarray] | None = None

    def keep(self, parts: list[slice]) -> None:
        """Read only these rows of each global batch (`process_rows`: this process's share)."""
        held = np.concatenate([np.arange(*part.indices(self.size)) for part in parts])
        self.held = None if np.array_equal(held, np.arange(self.size)) else held

    def indices(self, step: int) -> np.ndarray:
        epoch, i = divmod(step, self.per_epoch)
        if self._order is None or self._order[0] != epoch:
            rng = np.random.default_rng(seed_of(self.seed, Stream.ORDER, epoch))
            self._order = (epoch, rng.permutation(len(self.tokens)))
        return np.sort(self._order[1][i * self.size : (i + 1) * self.size])

    def __call__(self, step: int) -> Batch:
        """This process's rows of step `step`'s global batch (the augmentation draws for the whole batch)."""
        rows = self.indices(step)
        read = rows if self.held is None else rows[self.held]
        if self.augment is None:
            tokens = gather_rows(self.tokens, read)
        else:
            tokens = self.augment(rows, np.random.default_rng(seed_of(self.seed, Stream.AUGMENT, step)))
            tokens = tokens if self.held is None else tokens[self.held]
        labels = None if self.labels is None else torch.from_numpy(self.labels[read].astype(np.int64))
        return Batch(torch.from_numpy(tokens.astype(np.int64)), labels, self.held, self.size)


class Prefetcher:
    """Builds the next steps' batches in a background thread so the model never waits for data."""

    def __init__(self, batches: Batches, start: int, stop: int, depth: int = 3):
        self.queue: Queue = Queue(maxsize=depth)
        self.thread = threading.Thread(target=self._run, args=(batches, start, stop), daemon=True)
        self.thread.start()

    def _run(self, batches, start, stop):
        try:
            for step in range(start, stop):
                self.queue.put((step, batches(step)))
        except BaseException as err:  # surfaced in the training thread
            self.queue.put((None, err))

    def get(self) -> tuple[int, Batch]:
        step, item = self.queue.get()
        if step is None:
            raise item
        return step, item
