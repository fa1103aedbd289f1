"""Sampling (docs/reference.md §7): raster-order ancestral sampling through the key/value cache of decoding.py.

The prefix (if any) goes through the model in one pass; each further pixel is one cached
step that reads the keys and values its attention pattern sees (every earlier pixel for dense
attention, a window or a column for local and strided), never a full forward pass.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from igpt.decoding import Decoder
from igpt.errors import IgptError


def filter_logits(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None) -> torch.Tensor:
    """Temperature, then top-k, then nucleus (top-p) filtering; filtered entries become -inf."""
    if temperature <= 0:
        raise IgptError(f"temperature must be > 0, got {temperature} (use greedy=True for argmax decoding)")
    if top_p is not None and not 0 < top_p <= 1:
        raise IgptError(f"top-p must lie in (0, 1], got {top_p}")
    if top_k is not None and top_k <= 0:
        raise IgptError(f"top-k must be positive, got {top_k}")
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs >= top_p  # keep the smallest head whose mass reaches top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


def draw(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One index per row of `probs` (B, V) by inverting its cumulative sum at one uniform number per row.

    Exact, and cheaper than torch.multinomial, which draws V random numbers per row on CPUs.
    A zero-probability entry is never returned: the target lies in (0, total], and the first
    entry whose cumulative sum reaches it always has mass.
    """
    cdf = probs.cumsum(-1)
    u = torch.rand(len(probs), 1, generator=generator, device=probs.device, dtype=cdf.dtype)
    return torch.searchsorted(cdf, (1 - u) * cdf[:, -1:]).squeeze(1).clamp_(max=probs.shape[-1] - 1)


@torch.no_grad()
def sample(
    model,
    n: int,
    prefix: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    greedy: bool = False,
    generator: torch.Generator | None = None,
    batch_size: int | None = None,
    compile: bool = False,
    watch: Callable[[int, torch.Tensor, int], None] | None = None,
) -> torch.Tensor:
    """`n` token sequences of the model's full context; `prefix` (n or 1 rows of p tokens) is kept as given.

    `watch(first, tokens, filled)`, when given, sees the batch being decoded (`tokens`, images
    `first`, `first + 1`, ... of the n) once its prefix is in and after every completed image
    row, with `filled` the pixels written so far: the filling-in animation is drawn from it.

    `compile` runs each pixel's step through torch.compile with static shapes (CUDA graphs on
    GPUs), the route to launch-free decoding there. On CPUs leave it off: the eager step attends
    over the pixels so far only and is faster (32x32, 2-core EPYC, bench/bench_sample.py).
    """
    if model.config.objective != "ar":
        raise IgptError("sampling needs an autoregressive (ar) model; this one was trained with the bert objective")
    if not greedy:
        filter_logits(torch.zeros(1, 2), temperature, top_k, top_p)  # validate the options up front
    device = next(model.parameters()).device
    n_ctx = model.config.n_ctx
    if prefix is not None:
        prefix = torch.as_tensor(prefix, dtype=torch.long, device=device)
        prefix = prefix[None] if prefix.ndim == 1 else prefix
        if prefix.shape[1] > n_ctx:
            raise IgptError(f"the prefix holds {prefix.shape[1]} tokens but the context is {n_ctx}")
        if len(prefix) == 1 and n > 1:
            prefix = prefix.expand(n, -1)
        if len(prefix) != n:
            raise IgptError(f"give one prefix or {n}, got {len(prefix)}")
    batch_size = batch_size or n
    was_training = model.training
    model.eval()
    chunks, weights = [], None
    for start in range(0, n, batch_size):
        rows = min(batch_size, n - start)
        decoder = Decoder(model, rows, weights=weights, compile=compile)
        weights = decoder.weights  # laid out once per call
        head = prefix[start : start + rows] if prefix is not None else None
        observe = None if watch is None else functools.partial(watch, start)
        chunks.append(_sample_batch(decoder, head, temperature, top_k, top_p, greedy, generator, observe))
    model.train(was_training)
    return torch.cat(chunks)


def _sample_batch(decoder: Decoder, prefix, temperature, top_k, top_p, greedy, generator, watch) -> torch.Tensor:
    n_ctx, side = decoder.model.config.n_ctx, decoder.model.config.side
    out = torch.empty(decoder.cache.batch, n_ctx, dtype=torch.long, device=decoder.cache.k[0].device)
    known = 0 if prefix is None else prefix.shape[1]
    if known:
        out[:, :known] = prefix
    if watch is not None:
        watch(out, known)
    logits = decoder.feed(out[:, :known] if known else None)  # predictions for pixel `known`
    for pos in range(known, n_ctx):
        if greedy:
            nxt = logits.argmax(-1)
        else:
            nxt = draw(filter_logits(logits, temperature, top_k, top_p).softmax(-1), generator)
        out[:, pos] = nxt
        if watch is not None and (pos + 1) % side == 0:
            watch(out, pos + 1)
        if pos + 1 < n_ctx:
            logits = decoder.feed(nxt[:, None])
    return out


def complete(
    model,
    tokens: torch.Tensor,
    keep_rows: int,
    samples: int,
    **options,
) -> torch.Tensor:
    """The paper's figure: keep the top `keep_rows` rows of each image, sample the rest `samples` times.

    Returns tokens (N, samples, n_ctx); the kept rows equal the input's.
    """
    side = model.config.side
    if not 0 <= keep_rows <= side:
        raise IgptError(f"--keep-rows must lie in [0, {side}] for {side}x{side} images, got {keep_rows}")
    prefix = tokens[:, : keep_rows * side].repeat_interleave(samples, dim=0)
    out = sample(model, len(prefix), prefix if keep_rows else None, **options)
    return out.view(len(tokens), samples, -1)


UNKNOWN = 127  # the grey of pixels not (yet) known: below the cut of an occluded input, ahead of the decoder


def completion_rows(model, palette, originals: np.ndarray, keep_rows: int, samples: int, **options) -> np.ndarray:
    """uint8 (N, samples + 2, R, R, 3): per image the occluded input (grey below the kept rows),
    `samples` completions, and the original. `options` go to `sample` (a `watch` included: the
    completions filling in, igpt.animation.Animation.of_completions)."""
    device = next(model.parameters()).device
    tokens = torch.from_numpy(palette.encode(originals).astype(np.int64)).to(device)
    completed = complete(model, tokens, keep_rows, samples, **options)
    return completion_layout(palette, originals, keep_rows)(palette.decode(completed.flatten(0, 1).cpu().numpy()))


def completion_layout(palette, originals: np.ndarray, keep_rows: int) -> Callable[[np.ndarray], np.ndarray]:
    """Completions as sampled, (N x samples, R, R, 3), -> the rows of `completion_rows`: occluded input,
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
