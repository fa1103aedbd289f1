"""Sampling (docs/reference.md §7): raster-order ancestral sampling through the key/value cache of decoding.py.

The prefix (if any) goes through the model in one pass; each further pixel is one cached
step that reads the keys and values its attention pattern sees (every earlier pixel for dense
attention, a window or a column for local and strided), never a full forward pass.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from igpt.animation import Animation, check_animation_path
from igpt.config import device_option, option, positive_int, seed_option
from igpt.data import split_option
from igpt.decoding import Decoder, check_temperature
from igpt.errors import IgptError
from igpt.fileio import atomic_write
from igpt.grids import completion_layout, save_grid
from igpt.precision import autocast, precision_option


CALL_SECONDS = 0.25  # about how long one kernel call draws for: what Ctrl-C waits, many steps to a call's Python


def filter_logits(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None) -> torch.Tensor:
    """Temperature, then top-k, then nucleus (top-p) filtering; filtered entries become -inf."""
    check_temperature(temperature)
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
    entry whose cumulative sum reaches it always has mass. decode_kernel.cpp's `pick` draws the
    same way inside the sampling step (`Decoder.feed_and_draw`).
    """
    cdf = probs.cumsum(-1)
    u = uniforms(len(probs), generator, probs.device)[:, None]
    return torch.searchsorted(cdf, (1 - u) * cdf[:, -1:]).squeeze(1).clamp_(max=probs.shape[-1] - 1)


def uniforms(rows: int, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """One float32 number uniform in [0, 1) per row: what `draw` inverts, and what the kernel's own draw takes
    (one stream for both routes, so a seed draws alike on either: a CPU generator fills a tensor element after
    element, so the kernel's run of steps takes its rows' numbers in one call)."""
    return torch.rand(rows, generator=generator, device=device, dtype=torch.float32)


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
    kernel: bool = True,
    watch: Callable[[int, torch.Tensor, int], None] | None = None,
) -> torch.Tensor:
    """`n` token sequences of the model's full context; `prefix` (n or 1 rows of p tokens) is kept as given.

    `watch(first, tokens, filled)`, when given, sees the batch being decoded (`tokens`, images
    `first`, `first + 1`, ... of the n) once its prefix is in and after every completed image
    row, with `filled` the pixels written so far: the filling-in animation is drawn from it.

    `compile` runs each pixel's step through torch.compile with static shapes (CUDA graphs on
    GPUs), the route to launch-free decoding there. On CPUs leave it off: steps then run in igpt's
    decode kernel (`kernel`, where a C++ compiler builds it), with plain temperature or greedy
    sampling a run of pixels in each call (a row's end at most, with a `watch`), faster than either PyTorch route
    (bench/bench_sample.py measures each).
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
        decoder = Decoder(model, rows, weights=weights, compile=compile, kernel=kernel)
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

    def pick(logits: torch.Tensor) -> torch.Tensor:
        return logits.argmax(-1) if greedy else draw(filter_logits(logits, temperature, top_k, top_p).softmax(-1),
                                                     generator)

    if known == n_ctx:  # nothing left to draw
        return out
    fused = decoder.draws_in_kernel and top_k is None and top_p is None  # the kernel picks as `pick` does
    out[:, known] = pick(decoder.feed(out[:, :known] if known else None))
    filled, per_call = known + 1, side  # the kernel's first call draws a row at most, later ones by CALL_SECONDS
    while True:
        if watch is not None and filled % side == 0:
            watch(out, filled)
        if filled == n_ctx:
            break
        if fused:  # a run of pixels in one call, ending at the row's end where `watch` sees every row
            steps = min(per_call, side - filled % side if watch is not None else n_ctx - filled)
            numbers = None if greedy else uniforms(steps * len(out), generator, out.device).view(steps, len(out))
            started = time.perf_counter()
            decoder.feed_and_draw(out, steps, numbers, temperature)
            per_call = max(1, int(CALL_SECONDS * steps / max(time.perf_counter() - started, 1e-9)))
            filled += steps
        else:
            out[:, filled] = pick(decoder.feed(out[:, filled - 1 : filled]))
            filled += 1
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


def completion_rows(model, palette, originals: np.ndarray, keep_rows: int, samples: int, **options) -> np.ndarray:
    """uint8 (N, samples + 2, R, R, 3): per image the occluded input (grey below the kept rows),
    `samples` completions, and the original. `options` go to `sample` (a `watch` included: the
    completions filling in, igpt.animation.Animation.of_completions)."""
    device = next(model.parameters()).device
    tokens = torch.from_numpy(palette.encode(originals).astype(np.int64)).to(device)
    completed = complete(model, tokens, keep_rows, samples, **options)
    return completion_layout(palette, originals, keep_rows)(palette.decode(completed.flatten(0, 1).cpu().numpy()))


# ---- the sample and complete commands ----------------------------------------------------------
@dataclass(kw_only=True)
class SamplingConfig:
    """How `igpt sample` and `igpt complete` draw their pixels (`sample`'s options), from which run, and where
    the grid goes."""

    ckpt: str = option(help="run folder (or a converted model folder)")
    temperature: float = option(1.0, "divide the logits by this before drawing")
    top_k: int | None = option(None, "draw among the k likeliest colours only")
    top_p: float | None = option(None, "draw among the likeliest colours that hold this much probability only")
    seed: int = seed_option()
    batch_size: int | None = option(None, "images sampled at once", type=positive_int)
    device: str | None = device_option()
    precision: str = precision_option()
    compile: bool = option(False, "torch.compile the decoding step (CUDA graphs on GPUs; on CPUs igpt's own step "
                                  "is faster)")
    out: str = option(help="output PNG (an .npy of the images is written beside it)")
    animate: str | None = option(None, "also write the images filling in, a frame every few rows (.gif or .webp)",
                                 metavar="GIF_OR_WEBP")

    def check(self) -> None:
        """Bad options fail here, before any model loads."""
        filter_logits(torch.zeros(1, 2), self.temperature, self.top_k, self.top_p)
        if self.animate:
            check_animation_path(self.animate)

    def options(self, device: torch.device) -> dict:
        """`sample`'s keyword arguments, the generator seeded on `device`."""
        generator = torch.Generator(device=device).manual_seed(self.seed)
        return dict(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p, generator=generator,
                    batch_size=self.batch_size, compile=self.compile)


@dataclass(kw_only=True)
class SampleConfig(SamplingConfig):
    n: int = option(64, "number of images", type=positive_int)
    columns: int | None = None  # of the grid (default: about square); not a flag


@dataclass(kw_only=True)
class CompletionConfig(SamplingConfig):
    """The paper's figure: the top rows of `n` images kept, the rest sampled `samples` times."""

    images: tuple[str, ...] = option((), "your own image files (any size: centre-cropped, resized); without them, "
                                     "the first --n images of --split", flag="images", nargs="*")
    split: str = split_option("the split whose first --n images are completed, without image files")
    n: int = option(8, "number of images", type=positive_int)
    samples: int = option(4, "completions per image", type=positive_int)
    keep_rows: int | None = option(None, "rows kept from the top", exclusive="keep")
    keep: float = option(0.5, "fraction of rows kept", exclusive="keep")

    def check(self) -> None:
        super().check()
        if self.keep_rows is None and not 0 <= self.keep <= 1:
            raise IgptError(f"--keep must lie in [0, 1], got {self.keep}")

    def rows_kept(self, side: int) -> int:
        return self.keep_rows if self.keep_rows is not None else round(self.keep * side)


def write_samples(model, palette, cfg: SampleConfig, *, log: Callable[[str], None] = print) -> np.ndarray:
    """The sample command's whole job: `cfg.n` images drawn with `cfg`'s options; their grid written to `cfg.out`,
    the images (uint8 (n, R, R, 3), returned) as .npy beside it, and with `cfg.animate` the filling-in animation."""
    device = next(model.parameters()).device
    animation = Animation(palette, cfg.n, model.config.side, columns=cfg.columns) if cfg.animate else None
    with autocast(device, cfg.precision):
        tokens = sample(model, cfg.n, watch=animation and animation.watch, **cfg.options(device))
    images = palette.decode(tokens.cpu().numpy())
    log(_write(images, images, cfg, cfg.columns, animation) + f": {cfg.n} samples" + _animation_text(cfg, animation))
    return images


def write_completions(model, palette, originals: np.ndarray, cfg: CompletionConfig, *,
                      log: Callable[[str], None] = print) -> np.ndarray:
    """The complete command's whole job: the top rows of `originals` kept, the rest sampled `cfg.samples` times;
    the grid of `completion_rows` written to `cfg.out`, the rows (returned) as .npy beside it, and with
    `cfg.animate` the completions filling in."""
    side = model.config.side
    keep_rows = cfg.rows_kept(side)
    animation = Animation.of_completions(palette, originals, keep_rows, cfg.samples) if cfg.animate else None
    device = next(model.parameters()).device
    with autocast(device, cfg.precision):
        rows = completion_rows(model, palette, originals, keep_rows, cfg.samples,
                               watch=animation and animation.watch, **cfg.options(device))
    log(_write(rows.reshape(-1, side, side, 3), rows, cfg, cfg.samples + 2, animation)
        + f": {len(rows)} images x {cfg.samples} completions from the top {keep_rows} of {side} rows"
        + _animation_text(cfg, animation))
    return rows


def _write(grid: np.ndarray, array: np.ndarray, cfg: SamplingConfig, columns: int | None,
           animation: Animation | None) -> str:
    """The grid PNG, the array beside it and the animation, if any: "wrote A and B"."""
    out = Path(cfg.out)
    save_grid(grid, out, columns=columns)
    atomic_write(out.with_suffix(".npy"), lambda f: np.save(f, array))
    if animation is not None:
        animation.save(cfg.animate)
    return f"wrote {out} and {out.with_suffix('.npy')}"


def _animation_text(cfg: SamplingConfig, animation: Animation | None) -> str:
    return "" if animation is None else f"; the filling-in animation ({len(animation.frames)} frames) in {cfg.animate}"
