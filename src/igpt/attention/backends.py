"""How attention is computed: a table of named backends and the one rule that picks among them.

Every backend takes (B, heads, t, head_dim) queries, keys and values and a `Pattern`, and
returns what dense attention under `pattern.mask(t)` returns, in the same shape (the tests
hold each to that in float64). None of them builds a t x t mask for a local or strided
layer: their cost falls to O(t x window) and O(t x side).

- `sdpa`: PyTorch's scaled_dot_product_attention. Dense layers; a column laid out as
  (columns, rows), where every column is a short causal sequence of its own; a band no
  longer than its window, which is plain causal attention.
- `blocked`: a band cut into blocks of one image row, each attending to its own row and the
  window's rows before it under one small mask that every block shares.
- `blocked_flash`: the same blocks through PyTorch's CPU flash kernel called directly, with a
  backward of its own that writes each gradient once.
- `band_kernel`: igpt's C++ kernel (band_kernel.py), which reads only each query's window; causal dense
  layers are the band as wide as the sequence, and columns are causal sequences of their own.
- `flex`: FlexAttention's block-sparse kernel, with the pattern's own `sees` as its mask.

`choose_backend` is the rule: the first backend in PREFERENCE that runs these inputs.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

import igpt.attention.band_kernel as band_kernel
from igpt.attention.patterns import Pattern


# ---- sdpa ---------------------------------------------------------------------------------------
def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: Pattern) -> torch.Tensor:
    if pattern.kind == "column":
        return column_sdpa(q, k, v, pattern.side)
    return F.scaled_dot_product_attention(q, k, v, is_causal=pattern.causal)


def column_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, side: int) -> torch.Tensor:
    """Columns as causal sequences of their own. Padding completes the last row; it lies after every real
    query of its column, so the causal mask hides it."""
    b, h, t, hd = q.shape
    rows = -(-t // side)

    def columns(x: torch.Tensor) -> torch.Tensor:
        return F.pad(x, (0, 0, 0, rows * side - t)).reshape(b * h, rows, side, hd).transpose(1, 2)

    y = F.scaled_dot_product_attention(columns(q), columns(k), columns(v), is_causal=True)
    return y.transpose(1, 2).reshape(b, h, rows * side, hd)[:, :, :t]


# ---- blocked: a band in blocks of one row ----------------------------------------------------------
def blocked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: Pattern) -> torch.Tensor:
    """The first `window` positions see every position before them (plain causal attention); after them each
    row block attends to its own row and the rows before it in the window, one stacked copy of the keys and
    values per block and one concatenation joining the outputs, so work and memory grow as t x window."""
    window, t = pattern.window, q.shape[2]
    first = F.scaled_dot_product_attention(q[:, :, :window], k[:, :, :window], v[:, :, :window], is_causal=True)
    rest = F.scaled_dot_product_attention(*band_blocks(q, k, v, pattern), attn_mask=block_mask(pattern, q.device))
    return band_join(first, rest, t)


def band_rows(x: torch.Tensor, start: int, block: int) -> torch.Tensor:
    """(B, heads, t, head_dim) from position `start` -> (B, rows, block, heads, head_dim), the last row
    zero-padded: a view of the model's (B, t, heads, head_dim) layout where t fills the rows."""
    b, h, t, hd = x.shape
    x = x.transpose(1, 2)[:, start:]
    tail = -(t - start) % block
    return (F.pad(x, (0, 0, 0, 0, 0, tail)) if tail else x).reshape(b, -1, block, h, hd)


def band_blocks(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                pattern: Pattern) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The row blocks after the first window: queries (B x blocks, heads, block, head_dim) and each
    block's window of keys and values (B x blocks, heads, window + block, head_dim), one stacked copy."""
    window, block = pattern.window, pattern.side
    before = window // block

    def windows(x: torch.Tensor) -> torch.Tensor:
        rows = band_rows(x, 0, block)
        stacked = torch.stack([rows[:, i : rows.shape[1] - before + i] for i in range(before + 1)], dim=2)
        return stacked.flatten(0, 1).flatten(1, 2).transpose(1, 2)

    return band_rows(q, window, block).flatten(0, 1).transpose(1, 2), windows(k), windows(v)


def band_join(first: torch.Tensor, rest: torch.Tensor, t: int) -> torch.Tensor:
    """The causal head (B, heads, w, head_dim) and the row blocks (B x blocks, heads, block, head_dim)
    back into one (B, heads, t, head_dim), laid out as (B, t, heads, head_dim)."""
    b, h, w, hd = first.shape
    rest = rest.transpose(1, 2).reshape(b, -1, h, hd)[:, : t - w]
    return torch.cat([first.transpose(1, 2), rest], dim=1).transpose(1, 2)


def block_mask(pattern: Pattern, device: torch.device) -> torch.Tensor:
    """Which of its window + block keys each of a block's queries sees, (1, 1, block, keys): the block's keys
    start `window` positions before its first query."""
    query = torch.arange(pattern.side, device=device)[:, None] + pattern.window
    return pattern.sees(query, torch.arange(pattern.window + pattern.side, device=device))[None, None]


def block_bias(pattern: Pattern, like: torch.Tensor) -> torch.Tensor:
    """block_mask as the additive mask (0 or -inf, `like`'s dtype) the CPU flash kernel takes when called directly."""
    mask = block_mask(pattern, like.device)
    return like.new_zeros(mask.shape).masked_fill_(~mask, -math.inf)


@functools.cache
def cpu_flash_has_masks() -> bool:
    """Whether this PyTorch's CPU flash kernel and its backward take an attention mask (BandAttention calls them)."""
    ops = [getattr(torch.ops.aten, f"_scaled_dot_product_flash_attention_for_cpu{end}", None) for end in ("", "_backward")]
    return all(op is not None and "attn_mask" in str(op.default._schema) for op in ops)


class BandAttention(torch.autograd.Function):
    """`blocked` over whole rows on a CPU: PyTorch's flash kernel called directly, with a backward of its own.

    Under autograd the plain blocks pay for their views: every slice of q, k and v zero-fills a
    full-size gradient, which is then added up, and the window copies fold back through one more
    full tensor. This backward runs the flash kernel's own backward for the causal head and the
    row blocks and sums each of q, k and v's gradients into one tensor. It keeps the forward's
    stacked windows (as SDPA under autograd keeps them too) rather than stack them again.
    """

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: Pattern) -> torch.Tensor:
        flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
        window = pattern.window
        queries, keys, values = band_blocks(q, k, v, pattern)
        first, first_lse = flash(q[:, :, :window], k[:, :, :window], v[:, :, :window], 0.0, True)
        rest, rest_lse = flash(queries, keys, values, 0.0, False, attn_mask=block_bias(pattern, q))
        ctx.save_for_backward(q, k, v, queries, keys, values, first, first_lse, rest, rest_lse)
        ctx.pattern = pattern
        return band_join(first, rest, q.shape[2])

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        q, k, v, queries, keys, values, first, first_lse, rest, rest_lse = ctx.saved_tensors
        pattern = ctx.pattern
        window, block = pattern.window, pattern.side
        b, h, t, hd = q.shape
        before, blocks = window // block, (t - window) // block
        flash_backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
        dq_first, dk_first, dv_first = flash_backward(grad[:, :, :window], q[:, :, :window], k[:, :, :window],
                                                      v[:, :, :window], first, first_lse, 0.0, True)
        grad_rest = band_rows(grad, window, block).flatten(0, 1).transpose(1, 2)
        dq_rest, dk_rest, dv_rest = flash_backward(grad_rest, queries, keys, values, rest, rest_lse, 0.0, False,
                                                   attn_mask=block_bias(pattern, q))

        def fold(window_grads: torch.Tensor, head_grad: torch.Tensor) -> torch.Tensor:
            """Every window's gradients summed onto their rows, plus the causal head's: (B, heads, t, head_dim)."""
            window_grads = window_grads.transpose(1, 2).reshape(b, blocks, before + 1, block, h, hd)
            dx = window_grads.new_empty(b, before + blocks, block, h, hd)
            dx[:, :before] = 0
            dx[:, before:] = window_grads[:, :, before]
            for i in range(before):
                dx[:, i : i + blocks] += window_grads[:, :, i]
            dx = dx.view(b, t, h, hd)
            dx[:, :window] += head_grad.transpose(1, 2)
            return dx.transpose(1, 2)

        needed = ctx.needs_input_grad
        return (band_join(dq_first, dq_rest, t) if needed[0] else None,
                fold(dk_rest, dk_first) if needed[1] else None,
                fold(dv_rest, dv_first) if needed[2] else None, None)


def blocked_flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: Pattern) -> torch.Tensor:
    return BandAttention.apply(q, k, v, pattern)


# ---- flex ---------------------------------------------------------------------------------------
@functools.cache
def _flex_attention():
    try:
        from torch.nn.attention.flex_attention import flex_attention
    except ImportError:  # torch < 2.5
        return None
    return torch.compile(flex_attention, dynamic=False)


@functools.lru_cache(maxsize=32)
def _flex_block_mask(pattern: Pattern, t: int, device: str):
    from torch.nn.attention.flex_attention import create_block_mask

    return create_block_mask(lambda b, h, query, key: pattern.sees(query, key), None, None, t, t, device=device)


def flex(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: Pattern) -> torch.Tensor:
    return _flex_attention()(q, k, v, block_mask=_flex_block_mask(pattern, q.shape[2], str(q.device)))


# ---- the table and the rule -----------------------------------------------------------------------
def band_kernel_backend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: Pattern) -> torch.Tensor:
    if pattern.kind == "column":
        return column_kernel(q, k, v, pattern.side)
    return band_kernel.band_attention(q, k, v, pattern.window if pattern.kind == "band" else q.shape[2])


def column_kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, side: int) -> torch.Tensor:
    """Columns in the kernel: (B, heads, rows x side, head_dim) seen as B x (side x heads) causal sequences of
    `rows` positions, one per column and head; the output's layout makes that a view of (B, t, heads, head_dim)."""
    b, h, t, hd = q.shape
    rows = t // side

    def columns(x: torch.Tensor) -> torch.Tensor:
        return x.transpose(1, 2).reshape(b, rows, side * h, hd).transpose(1, 2)

    y = band_kernel.band_attention(columns(q), columns(k), columns(v), rows)
    return y.transpose(1, 2).reshape(b, t, h, hd).transpose(1, 2)


def kernel_runs(q: torch.Tensor, pattern: Pattern) -> bool:
    """Long bands, causal dense layers (one band over the whole sequence) and columns over whole rows: on a CPU
    the kernel's tiles skip what the mask hides and read no mask (bench/bench_precision.py names the backend
    each layer gets; bench/band_kernels.py times the kernel against PyTorch's)."""
    causal_dense = pattern.kind == "dense" and pattern.causal
    whole_columns = pattern.kind == "column" and q.shape[2] % pattern.side == 0
    return (is_long_band(q, pattern) or causal_dense or whole_columns) and band_kernel.applies(q)


def is_long_band(q: torch.Tensor, pattern: Pattern) -> bool:
    """A band longer than its window; a shorter one is plain causal attention."""
    return pattern.kind == "band" and q.shape[2] > pattern.window


def flex_band_applies(q: torch.Tensor) -> bool:
    """Bands train in FlexAttention on CUDA in bf16/fp16: its block-sparse kernel skips the masked-out tiles.

    In fp32 the blocks stay (the training step was slower through it), as do column layers (the reshape is
    faster) and inference (its shapes vary with every batch and prefix; training's are fixed, so
    FlexAttention compiles once), and head sizes that are not a power of two from 16 up.
    """
    hd = q.shape[-1]
    half = q.dtype in (torch.bfloat16, torch.float16)
    return (q.is_cuda and half and torch.is_grad_enabled() and hd >= 16 and hd & (hd - 1) == 0
            and _flex_attention() is not None)


def whole_rows_on_cpu(q: torch.Tensor, pattern: Pattern) -> bool:
    """BandAttention's case: a CPU, whole rows after the window, eager, and a CPU flash kernel that takes masks."""
    return (q.device.type == "cpu" and (q.shape[2] - pattern.window) % pattern.side == 0
            and not torch.compiler.is_compiling() and cpu_flash_has_masks())


@dataclass(frozen=True)
class Backend:
    compute: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, Pattern], torch.Tensor]
    runs: Callable[[torch.Tensor, Pattern], bool]  # whether it takes these queries under this pattern


ATTENTION_BACKENDS: dict[str, Backend] = {
    "flex": Backend(flex, lambda q, p: is_long_band(q, p) and flex_band_applies(q)),
    "band_kernel": Backend(band_kernel_backend, kernel_runs),
    "blocked_flash": Backend(blocked_flash, lambda q, p: is_long_band(q, p) and whole_rows_on_cpu(q, p)),
    "blocked": Backend(blocked, is_long_band),
    "sdpa": Backend(sdpa, lambda q, p: not is_long_band(q, p)),
}
PREFERENCE = ("flex", "band_kernel", "blocked_flash", "blocked", "sdpa")


def choose_backend(q: torch.Tensor, pattern: Pattern) -> str:
    """The first backend in PREFERENCE that runs these queries under this pattern."""
    return next(name for name in PREFERENCE if ATTENTION_BACKENDS[name].runs(q, pattern))


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: Pattern,
           backend: str | None = None) -> torch.Tensor:
    """Attention of (B, heads, t, head_dim) queries over keys and values under `pattern`, in the backend the rule
    chooses (or the one named, which must run these inputs)."""
    if backend is None:
        return ATTENTION_BACKENDS[choose_backend(q, pattern)].compute(q, k, v, pattern)
    if not ATTENTION_BACKENDS[backend].runs(q, pattern):
        raise ValueError(f"attention backend {backend!r} does not run {pattern} over queries of {tuple(q.shape)}")
    return ATTENTION_BACKENDS[backend].compute(q, k, v, pattern)


def band_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int, side: int) -> torch.Tensor:
    """Causal attention of each query i to the keys i - window < j <= i, in rows of `side` (the window is whole rows)."""
    return attend(q, k, v, Pattern("band", side, window))


def column_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, side: int) -> torch.Tensor:
    """Causal attention of each query i to the keys j = i - m x side: its column of a side-wide image."""
    return attend(q, k, v, Pattern("column", side))
