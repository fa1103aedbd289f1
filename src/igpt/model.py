"""The Image GPT network (docs/reference.md §3-4), exact to the released weights.

A GPT-2-style decoder over colour tokens: gain-only RMS norm, quick GELU, no biases, learned
positions, a learned start-of-sequence vector, an untied zero-initialised head. One set of
weights serves two objectives: `ar` (causal, next pixel) and `bert` (bidirectional, masked pixels).

Beyond the paper (docs/reference.md §9.5-9.6), two configuration fields whose defaults are the
paper: `positions` "2d" (a learned row table plus a learned column table) and `attention`
"local" (each pixel sees the window_rows x side positions before it) or "strided" (Sparse
Transformer: even layers see the last side positions, odd layers the pixel's own column).
Both patterns run as blocked or reshaped dense attention, so their cost really falls; on a
CPU, band layers in float32 run igpt's own kernel (band_kernel.py), which reads only each
query's window.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from igpt import band_kernel
from igpt.errors import IgptError
from igpt.palette import PALETTE_NAME, Palette

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
BERT_MASK_RATE = 0.15
OBJECTIVES = ("ar", "bert")
POSITIONS = ("1d", "2d")
ATTENTIONS = ("dense", "local", "strided")
SAVED_EXTRAS = {"model_type"}  # written beside the fields in config.json
# Fields added after igpt 0.1: a config.json without them (older runs, Hugging Face imports)
# loads with their defaults, which are the paper's architecture. Every other field is required.
ADDED_AFTER_0_1 = ("positions", "attention", "window_rows")

PRESETS = {
    "tiny": dict(n_layer=4, n_embd=128, n_head=4),
    "mini": dict(n_layer=8, n_embd=256, n_head=8),
    "igpt-s": dict(n_layer=24, n_embd=512, n_head=8),
    "igpt-m": dict(n_layer=36, n_embd=1024, n_head=8),
    "igpt-l": dict(n_layer=48, n_embd=1536, n_head=16),
    "igpt-xl": dict(n_layer=60, n_embd=3072, n_head=16),
}


@dataclass
class ImageGPTConfig:
    vocab_size: int = 512  # palette size
    n_ctx: int = 1024  # pixels per image: resolution squared
    n_embd: int = 512
    n_layer: int = 24
    n_head: int = 8
    objective: str = "ar"  # "ar" or "bert"
    bias: bool = False  # linear-layer biases: only for Hugging Face models that carry non-zero ones
    eps: float = 1e-5
    n_classes: int = 0  # a classifier head on the mean-pooled final norm (fine-tuning)
    positions: str = "1d"  # "1d": one learned vector per position; "2d": a row vector plus a column vector
    attention: str = "dense"  # "dense" (the paper), "local" or "strided"
    window_rows: int = 2  # local attention: image rows of earlier pixels each pixel sees

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value, kind = getattr(self, field.name), type(field.default)
            allowed = (int, float) if kind is float else (kind,)
            if not isinstance(value, allowed) or (isinstance(value, bool) and kind is not bool):
                raise IgptError(f"invalid model configuration: {field.name} must be {kind.__name__}, got {value!r}")
        self.eps = float(self.eps)
        checks = [
            (self.vocab_size >= 1, "vocab_size must be >= 1"),
            (self.n_ctx >= 1, "n_ctx must be >= 1"),
            (self.n_layer >= 1, "n_layer must be >= 1"),
            (self.n_head >= 1 and self.n_embd % self.n_head == 0,
             f"n_embd ({self.n_embd}) must be a multiple of n_head ({self.n_head})"),
            (self.objective in OBJECTIVES, f"objective must be 'ar' or 'bert', got {self.objective!r}"),
            (self.eps > 0, "eps must be > 0"),
            (self.n_classes >= 0, "n_classes must be >= 0"),
            (self.positions in POSITIONS, f"positions must be '1d' or '2d', got {self.positions!r}"),
            (self.attention in ATTENTIONS,
             f"attention must be 'dense', 'local' or 'strided', got {self.attention!r}"),
            (self.window_rows >= 1, "window_rows must be >= 1"),
            (self.objective == "ar" or self.attention == "dense",
             f"the bert objective sees every pixel, so it needs attention 'dense', not {self.attention!r}"),
            (self.is_paper or self.n_ctx >= 1 and math.isqrt(self.n_ctx) ** 2 == self.n_ctx,
             f"positions {self.positions!r} with attention {self.attention!r} need a square image, "
             f"but n_ctx {self.n_ctx} is not a square"),
        ]
        for ok, message in checks:
            if not ok:
                raise IgptError(f"invalid model configuration: {message}")

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "ImageGPTConfig":
        """A named size; context and vocabulary follow the data, so pass them (and any other field) as overrides."""
        if name not in PRESETS:
            raise IgptError(f"unknown model preset {name!r}: choose one of {', '.join(PRESETS)}")
        cls._reject_unknown(overrides)
        return cls(**{**PRESETS[name], **overrides})

    @classmethod
    def from_dict(cls, values: dict) -> "ImageGPTConfig":
        """A saved configuration: every field must be present, so a file never silently takes a default,
        except those added after igpt 0.1 (ADDED_AFTER_0_1), absent from older files, which take the paper's."""
        cls._reject_unknown(values, allowed=SAVED_EXTRAS)
        missing = [f.name for f in dataclasses.fields(cls) if f.name not in values and f.name not in ADDED_AFTER_0_1]
        if missing:
            raise IgptError(f"model configuration lacks fields: {', '.join(missing)}")
        return cls(**{k: v for k, v in values.items() if k not in SAVED_EXTRAS})

    @classmethod
    def _reject_unknown(cls, values: dict, allowed: set[str] = frozenset()) -> None:
        unknown = sorted(set(values) - {f.name for f in dataclasses.fields(cls)} - allowed)
        if unknown:
            raise IgptError(f"unknown model configuration fields: {', '.join(unknown)} (a config from another "
                            "version of igpt, or a hand edit: upgrade igpt or remove them)")

    def to_dict(self) -> dict:
        return {"model_type": "igpt", **dataclasses.asdict(self)}

    @property
    def side(self) -> int:
        """The image side: the context is side x side pixels in raster order."""
        side = math.isqrt(self.n_ctx)
        if side * side != self.n_ctx:
            raise IgptError(f"the context of {self.n_ctx} pixels is not a square image; the image commands need "
                            "n_ctx = resolution squared")
        return side

    @property
    def is_paper(self) -> bool:
        """The released architecture: 1-D positions and dense attention (what Hugging Face's ImageGPT holds)."""
        return self.positions == "1d" and self.attention == "dense"

    def check_palette(self, palette: Palette, where: str | os.PathLike) -> None:
        """The one check that a palette and this model's vocabulary belong together."""
        if palette.size != self.vocab_size:
            raise IgptError(f"{where}: the palette has {palette.size} colours but the model's vocabulary is "
                            f"{self.vocab_size}; use the palette the model was trained with")


def num_params(config: ImageGPTConfig) -> int:
    """Parameter count from the configuration alone (no allocation): sizes the big presets."""
    d, v = config.n_embd, config.vocab_size
    per_block = 12 * d * d + 2 * d + (9 * d if config.bias else 0)
    classifier = config.n_classes * d
    positions = config.n_ctx if config.positions == "1d" else 2 * config.side
    return config.n_layer * per_block + (2 * v + positions + 2) * d + classifier


def bert_mask(shape: tuple[int, ...], generator: torch.Generator | None = None) -> torch.Tensor:
    """The BERT objective's mask: each position independently with probability 0.15 (docs/reference.md §4)."""
    device = generator.device if generator is not None else None
    return torch.rand(shape, generator=generator, device=device) < BERT_MASK_RATE


def token_nll(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Each pixel's NLL in nats, (B, n): what `nll` sums, and what the surprise map shows."""
    return F.cross_entropy(logits.float().flatten(0, 1), tokens.flatten(), reduction="none").view(tokens.shape)


def nll(logits: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The generative loss: summed NLL in nats over the predicted pixels, and their number.

    logits[:, i] predicts tokens[:, i] (the sos shift is inside the model); `mask` (bert)
    restricts both to the masked positions. Training, evaluation, fine-tuning and the demo's
    step timing all use this one function; sums (not means) let gradient accumulation and
    several processes add up to exactly the single-batch mean.
    """
    per_token = token_nll(logits, tokens).flatten()
    if mask is None:
        return per_token.sum(), torch.tensor(per_token.numel(), device=per_token.device)
    weights = mask.flatten().to(per_token.dtype)
    return (per_token * weights).sum(), weights.sum()


QUICK_GELU = 1.702


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """x * sigmoid(1.702 x), the released model's activation; under autograd through QuickGELUFunction."""
    if x.requires_grad and torch.is_grad_enabled():
        return QuickGELUFunction.apply(x)
    return x * torch.sigmoid(QUICK_GELU * x)


class QuickGELUFunction(torch.autograd.Function):
    """quick_gelu with a one-kernel backward.

    Its derivative is SiLU's at z = 1.702 x, so the backward is aten's fused silu_backward: one
    pass over the block's largest activation, (tokens, 4d), instead of the five memory-bound
    element-wise passes autograd makes through the formula (the A/B: README, Speed). The forward
    is the same formula, so outputs are unchanged. First derivatives only: training needs no
    more, and a second backward through it raises rather than return a wrong one.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        z = QUICK_GELU * x
        ctx.save_for_backward(z)
        return torch.sigmoid(z).mul_(x)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (z,) = ctx.saved_tensors
        return torch.ops.aten.silu_backward(grad, z)


class RMSNorm(nn.RMSNorm):
    """nn.RMSNorm over the last dimension, with a gain, and a backward of its own under autograd;
    the same forward, bit for bit.

    PyTorch's CPU kernel is a composite: its backward is a dozen element-wise passes over the
    (tokens, width) activations, and there are two norms a block. RMSNormFunction's makes about
    half as many, which measured 1.3x faster per norm on a CPU (README, Speed). Compiled, the
    composite runs, as inductor fuses its passes anyway.
    """

    def __init__(self, width: int, eps: float):
        super().__init__(width, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        full = x.dtype in (torch.float32, torch.float64)  # half inputs keep PyTorch's float accumulation
        if full and torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad) \
                and not torch.compiler.is_compiling():
            return RMSNormFunction.apply(x, self.weight, self.eps)
        return super().forward(x)


class RMSNormFunction(torch.autograd.Function):
    """x * rsqrt(mean(x^2) + eps) * weight over the last dimension, saving x's normalised copy for the backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        r = x.pow(2).mean(-1, keepdim=True).add_(eps).rsqrt_()
        normed = x * r
        ctx.save_for_backward(normed, r, weight)
        return normed * weight

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
        normed, r, weight = ctx.saved_tensors
        dx = dweight = None
        if ctx.needs_input_grad[0]:
            scaled = grad * weight
            along = (scaled * normed).mean(-1, keepdim=True)  # the part along x, which the norm removes
            dx = torch.addcmul(scaled, normed, along, value=-1).mul_(r)
        if ctx.needs_input_grad[1]:
            dweight = (grad * normed).reshape(-1, normed.shape[-1]).sum(0)
        return dx, dweight, None


def layer_pattern(config: ImageGPTConfig, layer: int) -> tuple[str, int]:
    """What layer `layer` attends to: ("dense", n_ctx); ("band", w): the w positions up to and
    including the query's; or ("column", side): the query's column, every earlier row."""
    if config.attention == "dense":
        return "dense", config.n_ctx
    side = config.side
    if config.attention == "local":
        return "band", min(config.window_rows, side) * side  # a wider window is the whole image
    return ("band", side) if layer % 2 == 0 else ("column", side)


def band_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int, block: int) -> torch.Tensor:
    """Causal attention of each query i to the keys j with i - window < j <= i; (B, heads, t, head_dim) in and out.

    `window` is a multiple of `block` (one image row). The first `window` positions see every
    position before them: plain causal attention. From there the sequence is cut into blocks
    of `block` queries, each attending to its own block and the window // block blocks before
    it under one small mask (block, keys per block) that every block shares, so work and memory
    grow as t x window, not t^2. The query blocks are views of the attention's own (B, t, heads,
    head_dim) layout (for batch 1; a copy for larger batches), and one concatenation joins the
    head and the blocks' outputs. On a CPU, float32 goes through igpt's own kernel
    (band_kernel.py), which reads only each query's window; other dtypes, over whole rows,
    through BandAttention, which calls the same flash kernel with a backward of its own.
    """
    t = q.shape[2]
    if flex_band_applies(q):
        return _flex_attention()(q, k, v, block_mask=_band_block_mask(t, window, str(q.device)))
    if t <= window:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    if band_kernel.applies(q):
        return band_kernel.band_attention(q, k, v, window)
    if q.device.type == "cpu" and (t - window) % block == 0 and not torch.compiler.is_compiling() \
            and cpu_flash_has_masks():
        return BandAttention.apply(q, k, v, window, block)
    first = F.scaled_dot_product_attention(q[:, :, :window], k[:, :, :window], v[:, :, :window], is_causal=True)
    rest = F.scaled_dot_product_attention(*band_blocks(q, k, v, window, block),
                                          attn_mask=band_mask(window, block, q.device))
    return band_join(first, rest, t)


def band_rows(x: torch.Tensor, start: int, block: int) -> torch.Tensor:
    """(B, heads, t, head_dim) from position `start` -> (B, rows, block, heads, head_dim), the last row
    zero-padded: a view of the model's (B, t, heads, head_dim) layout where t fills the rows."""
    b, h, t, hd = x.shape
    x = x.transpose(1, 2)[:, start:]
    tail = -(t - start) % block
    return (F.pad(x, (0, 0, 0, 0, 0, tail)) if tail else x).reshape(b, -1, block, h, hd)


def band_blocks(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int,
                block: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The row blocks after the first window: queries (B x blocks, heads, block, head_dim) and each
    block's window of keys and values (B x blocks, heads, window + block, head_dim), one stacked copy."""
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


def band_mask(window: int, block: int, device: torch.device) -> torch.Tensor:
    """Which of its window + block keys each of a block's queries sees, as (1, 1, block, keys); the own block's first key is `window`."""
    query = torch.arange(block, device=device)[:, None]
    key = torch.arange(window + block, device=device)
    return ((key > query) & (key <= query + window))[None, None]


@functools.cache
def cpu_flash_has_masks() -> bool:
    """Whether this PyTorch's CPU flash kernel and its backward take an attention mask (BandAttention calls them)."""
    ops = [getattr(torch.ops.aten, f"_scaled_dot_product_flash_attention_for_cpu{end}", None) for end in ("", "_backward")]
    return all(op is not None and "attn_mask" in str(op.default._schema) for op in ops)


class BandAttention(torch.autograd.Function):
    """band_attention over whole rows on a CPU: PyTorch's flash kernel called directly, with a backward of its own.

    Under autograd the plain path pays for its views: every slice of q, k and v zero-fills a
    full-size gradient, which is then added up, and the window copies fold back through one more
    full tensor. This backward runs the flash kernel's own backward for the causal head and the
    row blocks and sums each of q, k and v's gradients into one tensor (measured: README, Speed).
    It keeps the forward's stacked windows (window // block + 1 times the keys and values, as
    SDPA under autograd keeps them too): stacking them again in the backward cost 7% of a layer.
    """

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int, block: int) -> torch.Tensor:
        flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
        queries, keys, values = band_blocks(q, k, v, window, block)
        first, first_lse = flash(q[:, :, :window], k[:, :, :window], v[:, :, :window], 0.0, True)
        rest, rest_lse = flash(queries, keys, values, 0.0, False, attn_mask=band_bias(window, block, q))
        ctx.save_for_backward(q, k, v, queries, keys, values, first, first_lse, rest, rest_lse)
        ctx.window, ctx.block = window, block
        return band_join(first, rest, q.shape[2])

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        q, k, v, queries, keys, values, first, first_lse, rest, rest_lse = ctx.saved_tensors
        window, block = ctx.window, ctx.block
        b, h, t, hd = q.shape
        before, blocks = window // block, (t - window) // block
        flash_backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
        dq_first, dk_first, dv_first = flash_backward(grad[:, :, :window], q[:, :, :window], k[:, :, :window],
                                                      v[:, :, :window], first, first_lse, 0.0, True)
        grad_rest = band_rows(grad, window, block).flatten(0, 1).transpose(1, 2)
        dq_rest, dk_rest, dv_rest = flash_backward(grad_rest, queries, keys, values, rest, rest_lse, 0.0, False,
                                                   attn_mask=band_bias(window, block, q))

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
                fold(dv_rest, dv_first) if needed[2] else None, None, None)


def band_bias(window: int, block: int, like: torch.Tensor) -> torch.Tensor:
    """band_mask as the additive mask (0 or -inf, `like`'s dtype) the CPU flash kernel takes when called directly."""
    mask = band_mask(window, block, like.device)
    return like.new_zeros(mask.shape).masked_fill_(~mask, -math.inf)


def flex_band_applies(q: torch.Tensor) -> bool:
    """Whether a band runs as FlexAttention instead of the blocks above: on CUDA, training in bf16/fp16.

    Its block-sparse kernel skips the masked-out tiles of the plain layout, and in bf16 ran band
    layers about twice as fast as the blocked SDPA on an H200 (bench/flex_attention.py); in fp32
    the whole training step was slower with it (bench/bench_attention.py --device cuda), so fp32
    keeps the blocks, as do column layers (the reshape is faster) and inference (its shapes vary
    with every batch and prefix; training's are fixed, so FlexAttention compiles once). Head
    sizes that are not a power of two from 16 up stay on the blocks too.
    """
    hd = q.shape[-1]
    half = q.dtype in (torch.bfloat16, torch.float16)
    return (q.is_cuda and half and torch.is_grad_enabled() and hd >= 16 and hd & (hd - 1) == 0
            and _flex_attention() is not None)


@functools.cache
def _flex_attention():
    try:
        from torch.nn.attention.flex_attention import flex_attention
    except ImportError:  # torch < 2.5
        return None
    return torch.compile(flex_attention, dynamic=False)


@functools.lru_cache(maxsize=32)
def _band_block_mask(t: int, window: int, device: str):
    from torch.nn.attention.flex_attention import create_block_mask

    def within(b, h, query, key):
        return (key <= query) & (key > query - window)

    return create_block_mask(within, None, None, t, t, device=device)


def column_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, side: int) -> torch.Tensor:
    """Causal attention of each query i to the keys j = i - m x side (its column); (B, heads, t, head_dim) in and out.

    Laid out as (columns, rows), every column is a short causal sequence of its own, so the
    work is t x rows and the plain causal kernel serves. Padding completes the last row; it
    lies after every real query of its column, so the causal mask hides it.
    """
    b, h, t, hd = q.shape
    rows = -(-t // side)

    def columns(x: torch.Tensor) -> torch.Tensor:
        return F.pad(x, (0, 0, 0, rows * side - t)).reshape(b * h, rows, side, hd).transpose(1, 2)

    y = F.scaled_dot_product_attention(columns(q), columns(k), columns(v), is_causal=True)
    return y.transpose(1, 2).reshape(b, h, rows * side, hd)[:, :, :t]


class Attention(nn.Module):
    def __init__(self, config: ImageGPTConfig, layer: int):
        super().__init__()
        d = config.n_embd
        self.n_head = config.n_head
        self.pattern, self.window = layer_pattern(config, layer)
        self.side = config.side if self.pattern != "dense" else None
        self.q = nn.Linear(d, d, bias=config.bias)
        self.k = nn.Linear(d, d, bias=config.bias)
        self.v = nn.Linear(d, d, bias=config.bias)
        self.proj = nn.Linear(d, d, bias=config.bias)

    def _stacked(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        bias = torch.cat([self.q.bias, self.k.bias, self.v.bias]) if self.q.bias is not None else None
        return torch.cat([self.q.weight, self.k.weight, self.v.weight]), bias

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        return x.view(b, t, self.n_head, d // self.n_head).transpose(1, 2)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
        """This layer's pattern over (B, heads, t, head_dim) queries, keys and values (local and strided are causal)."""
        if self.pattern == "band":
            return band_attention(q, k, v, self.window, self.side)
        if self.pattern == "column":
            return column_attention(q, k, v, self.side)
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    def forward(self, x: torch.Tensor, causal: bool) -> torch.Tensor:
        b, t, d = x.shape
        # One matrix product for q, k and v: three separate weights, one larger (faster) matmul.
        q, k, v = (self._heads(y) for y in F.linear(x, *self._stacked()).split(d, dim=-1))
        return self.proj(self.attend(q, k, v, causal).transpose(1, 2).reshape(b, t, d))


class MLP(nn.Module):
    def __init__(self, config: ImageGPTConfig):
        super().__init__()
        self.fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(quick_gelu(self.fc(x)))


class Block(nn.Module):
    def __init__(self, config: ImageGPTConfig, layer: int):
        super().__init__()
        self.ln_1 = RMSNorm(config.n_embd, eps=config.eps)
        self.attn = Attention(config, layer)
        self.ln_2 = RMSNorm(config.n_embd, eps=config.eps)
        self.mlp = MLP(config)

    def forward(self, h: torch.Tensor, causal: bool) -> torch.Tensor:
        h = h + self.attn(self.ln_1(h), causal)
        return h + self.mlp(self.ln_2(h))


def check_pool_grid(config: ImageGPTConfig, grid: int) -> None:
    """A probe's pooling grid must be 1 (the paper's mean over positions) or fit the square image."""
    if grid != 1 and not 1 <= grid <= config.side:
        raise IgptError(f"--pool-grid must lie in 1..{config.side} for this {config.side}x{config.side} model, "
                        f"got {grid}")


def pool_positions(x: torch.Tensor, grid: int) -> torch.Tensor:
    """(B, n, d) hidden states as float32 probe features: the mean over positions (grid 1), or the mean over
    each cell of a grid x grid partition of the square image (adaptive pooling: cells differ by at most a
    row or column when the side is not a multiple), flattened to (B, grid * grid * d). Input position i sits
    at pixel i's place: under causal attention it has seen the pixels before it."""
    if grid == 1:
        return x.mean(1).float()
    b, n, d = x.shape
    side = math.isqrt(n)
    image = x.transpose(1, 2).reshape(b, d, side, side)
    return F.adaptive_avg_pool2d(image, grid).flatten(1).float()


class ImageGPT(nn.Module):
    """`model(tokens)` -> logits (B, n, vocab); logits[:, i] predicts tokens[:, i] (the sos shift is inside)."""

    def __init__(self, config: ImageGPTConfig):
        super().__init__()
        self.config = config
        d = config.n_embd
        self.wte = nn.Embedding(config.vocab_size, d)
        if config.positions == "1d":
            self.wpe = nn.Parameter(torch.empty(config.n_ctx, d))
        else:
            self.wpe_row = nn.Parameter(torch.empty(config.side, d))
            self.wpe_col = nn.Parameter(torch.empty(config.side, d))
        self.sos = nn.Parameter(torch.empty(d))
        self.blocks = nn.ModuleList(Block(config, layer) for layer in range(config.n_layer))
        self.ln_f = RMSNorm(d, eps=config.eps)
        self.head = nn.Linear(d, config.vocab_size, bias=False)
        self.classifier = nn.Linear(d, config.n_classes, bias=False) if config.n_classes else None
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The released initialisation (docs/reference.md §3.2)."""
        d, n_layer = self.config.n_embd, self.config.n_layer
        nn.init.normal_(self.wte.weight, std=0.02)
        for table in self.position_tables():
            nn.init.normal_(table, std=0.01)
        nn.init.normal_(self.sos, std=0.02)
        for block in self.blocks:
            for lin in (block.attn.q, block.attn.k, block.attn.v):
                nn.init.normal_(lin.weight, std=1 / math.sqrt(d))
            nn.init.normal_(block.attn.proj.weight, std=1 / math.sqrt(d * n_layer))
            nn.init.normal_(block.mlp.fc.weight, std=0.02)
            nn.init.normal_(block.mlp.proj.weight, std=0.02)
            for norm in (block.ln_1, block.ln_2):
                nn.init.ones_(norm.weight)
        nn.init.ones_(self.ln_f.weight)
        nn.init.zeros_(self.head.weight)
        if self.classifier is not None:
            nn.init.zeros_(self.classifier.weight)
        for module in self.modules():
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)

    # ---- the forward pass ----------------------------------------------------------------------
    def position_tables(self) -> list[nn.Parameter]:
        return [self.wpe] if self.config.positions == "1d" else [self.wpe_row, self.wpe_col]

    def positions(self, start: int, stop: int) -> torch.Tensor:
        """The position vectors of input positions start..stop-1 (sos sits at 0), (stop - start, d)."""
        if self.config.positions == "1d":
            return self.wpe[start:stop]
        return self.positions_at(torch.arange(start, stop, device=self.wpe_row.device))

    def positions_at(self, index: torch.Tensor) -> torch.Tensor:
        """The position vectors of the input positions in `index`: wpe[i] (1d), or row i // side plus
        column i % side (2d), so sos at 0 and pixel x_i at i share the layout of 1-D positions."""
        if self.config.positions == "1d":
            return self.wpe.index_select(0, index)
        side = self.config.side
        return self.wpe_row.index_select(0, index // side) + self.wpe_col.index_select(0, index % side)

    def embed(self, tokens: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Input vectors: [sos, e(x_1..x_{n-1})] for ar; e(x) with masked positions zeroed for bert."""
        b, n = tokens.shape
        if n > self.config.n_ctx:
            raise IgptError(f"{n} tokens exceed the model's context of {self.config.n_ctx}")
        if self.config.objective == "ar":
            sos = self.sos.expand(b, 1, -1).to(self.wte.weight.dtype)
            h = torch.cat([sos, self.wte(tokens[:, :-1])], dim=1)
        else:
            h = self.wte(tokens)
            if mask is not None:
                h = h.masked_fill(mask[..., None], 0.0)
        return h + self.positions(0, n)

    def hidden(self, tokens: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """The final normalised hidden states (B, n, d)."""
        h = self.embed(tokens, mask)
        causal = self.config.objective == "ar"
        for block in self.blocks:
            h = block(h, causal)
        return self.ln_f(h)

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor | None = None, *, classes: bool = False):
        """Logits (B, n, vocab); with `classes`, also the classifier's logits (B, n_classes) from the same pass.

        One entry point for both, so DDP and FSDP (which hook `forward`) serve fine-tuning too.
        """
        hidden = self.hidden(tokens, mask)
        if not classes:
            return self.head(hidden)
        if self.classifier is None:
            raise IgptError("this model has no classifier head (n_classes is 0)")
        return self.head(hidden), self.classifier(hidden.mean(1))

    def loss(self, tokens: torch.Tensor, mask: torch.Tensor | None = None,
             generator: torch.Generator | None = None) -> torch.Tensor:
        """Mean NLL in nats/token: every position (ar), or the masked positions (bert).

        bert draws each position's mask with probability 0.15 from `generator` unless `mask` is
        given; a draw that masks nothing gives a zero loss (no NaN) without a data-dependent branch.
        """
        if self.config.objective == "bert" and mask is None:
            mask = bert_mask(tokens.shape, generator).to(tokens.device)
        total, count = nll(self(tokens, mask), tokens, mask)
        return total / count.clamp(min=1)

    def classify(self, tokens: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(generative logits, class logits from the mean-pooled final norm) from one pass."""
        return self(tokens, mask, classes=True)

    def features(self, tokens: torch.Tensor, layers, grid: int = 1) -> dict[int, torch.Tensor]:
        """The probe features of docs/reference.md §6.1 from one pass: f_l = mean over positions of norm(h_l).

        h_l is the residual stream after l blocks, normalised by block l+1's first norm
        (what its attention sees); for l = n_layer it is ln_f's output. l runs 0..n_layer.
        With `grid` g > 1, the mean is taken over each cell of a g x g grid laid on the image
        instead of over all of it: (B, g * g * n_embd) features (§6.1, "pooling grid").
        """
        wanted = sorted(set(int(l) for l in layers))
        if not wanted or wanted[0] < 0 or wanted[-1] > self.config.n_layer:
            raise IgptError(f"probe layers must lie in 0..{self.config.n_layer}, got {list(layers)}")
        check_pool_grid(self.config, grid)
        out = {}
        h = self.embed(tokens)
        causal = self.config.objective == "ar"
        for i, block in enumerate(self.blocks):
            if i in wanted:
                out[i] = pool_positions(block.ln_1(h), grid)
            if i >= wanted[-1]:
                break
            h = block(h, causal)
        if self.config.n_layer in wanted:
            out[self.config.n_layer] = pool_positions(self.ln_f(h), grid)
        return {l: out[l] for l in wanted}

    # ---- files -----------------------------------------------------------------------------------
    def save_pretrained(
        self, directory: str | os.PathLike, state_dict: dict | None = None, palette: Palette | None = None
    ) -> Path:
        """`config.json` + `model.safetensors` (+ `palette.npy` when given), each written atomically."""
        from safetensors.torch import save

        from igpt.fileio import atomic_write, atomic_write_json

        directory = Path(directory)
        if palette is not None:
            self.config.check_palette(palette, directory)
        state = state_dict if state_dict is not None else self.state_dict()
        tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
        payload = save(tensors, metadata={"format": "pt"})
        atomic_write(directory / WEIGHTS_NAME, lambda f: f.write(payload))
        atomic_write_json(directory / CONFIG_NAME, self.config.to_dict())
        if palette is not None:
            palette.save(directory / PALETTE_NAME)
        return directory

    @classmethod
    def from_pretrained(
        cls, directory: str | os.PathLike, map_location: str | torch.device = "cpu", palette: Palette | None = None
    ) -> "ImageGPT":
        """Load a `save_pretrained` folder; its vocabulary must match `palette` (default: the folder's palette.npy)."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        directory = Path(directory)
        if not directory.is_dir():
            raise IgptError(f"{directory} is not a folder: give a run folder or a save_pretrained folder")
        config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
        if not config_path.is_file() or not weights_path.is_file():
            hint = " (a Hugging Face model? import it with igpt convert --from-hf)" if config_path.is_file() else ""
            raise IgptError(f"{directory} is not an igpt model: it needs {CONFIG_NAME} and {WEIGHTS_NAME}{hint}")
        try:
            values = json.loads(config_path.read_text())
        except (OSError, ValueError) as err:
            raise IgptError(f"{config_path} is not readable JSON ({err})") from None
        if not isinstance(values, dict) or values.get("model_type", "igpt") != "igpt":
            raise IgptError(
                f"{config_path} describes a {values.get('model_type') if isinstance(values, dict) else 'non'}"
                " model, not igpt; import Hugging Face models with igpt convert --from-hf"
            )
        config = ImageGPTConfig.from_dict(values)
        if palette is None and (directory / PALETTE_NAME).is_file():
            palette = Palette.load(directory / PALETTE_NAME)
        if palette is not None:
            config.check_palette(palette, directory)
        try:
            state = load_file(weights_path, device=str(map_location))
        except (SafetensorError, OSError, ValueError) as err:
            raise IgptError(f"{weights_path} is damaged or truncated ({err}); re-save or re-download it") from None
        return cls.from_state_dict(config, state, source=str(weights_path))

    @classmethod
    def from_state_dict(cls, config: ImageGPTConfig, state: dict[str, torch.Tensor], source: str) -> "ImageGPT":
        """A model holding exactly `state`, checked name by name and shape by shape against `config`.

        The module is built on the meta device and takes the tensors as they are, so loading
        a large model costs neither a throwaway random initialisation nor a second copy.
        """
        with torch.device("meta"):
            model = cls(config)
        expected = model.state_dict()
        missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
        shapes = [k for k in expected if k in state and state[k].shape != expected[k].shape]
        if missing or unexpected or shapes:
            problems = [f"{what} {names[:3]}" for what, names in
                        (("missing", missing), ("unexpected", unexpected), ("wrong shape for", shapes)) if names]
            raise IgptError(f"{source} does not match its model configuration: {'; '.join(problems)}")
        model.load_state_dict(state, assign=True)
        return model

