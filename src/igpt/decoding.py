"""Incremental decoding: the key/value cache, the decode weights and the cached passes.

A declared fast path of the model's own blocks. The model's training path knows nothing of
caches. Here a `Decoder` feeds a prefix in one pass and then one pixel per step, each step
attending over the keys and values stored so far instead of recomputing the whole sequence.
Why the block is written here a second time, with its weights folded (`DecodeWeights`): a
step at a small batch is a chain of tiny operations whose number, not their arithmetic, sets
its pace, and folding the norm gains and GELU's scale into the matrices removes a third of
them. tests/test_attention.py::test_cached_decoding_equals_the_full_forward_at_every_position
holds every pattern's steps equal to the model's forward, and this file (with its C++ step,
decode_kernel.cpp) is the only other place the block's forward is written. Three forms of the one-pixel step exist:

- eager: attention over the pixels so far only (half the work on average);
- kernel: the eager step's arithmetic in one call to decode_kernel.cpp (`KernelStep`), the
  whole step outside the Python dispatcher, and with plain temperature or greedy sampling a run
  of steps that draw their pixels and feed them on, in one call (`Decoder.feed_and_draw`): what
  CPUs run where a C++ compiler works;
- static: attention over the whole cache under a position mask, so every step has the same
  shapes and `torch.compile` (CUDA graphs on GPUs) captures one graph for the whole image.

Each layer keeps and reads only what its pattern sees (`Pattern.keep` and `Pattern.read`,
igpt/attention/patterns.py), so a local or strided step costs O(window) or O(side), not
O(pixels so far): a band layer keeps a ring of its window, a column layer reads the pixel's
column, one key per row so far.

The cache owns its position; only `KVCache.advance` moves it.
"""

from __future__ import annotations

import ctypes
import operator
import weakref
from pathlib import Path
from typing import Iterator, NamedTuple

import torch
import torch.nn.functional as F

from igpt.attention import attend, layer_pattern
from igpt.attention.patterns import KINDS
from igpt.errors import IgptError
from igpt.kernels import Kernel
from igpt.model import ImageGPT
from igpt.ops import QUICK_GELU

Affine = tuple[torch.Tensor, torch.Tensor | None]  # a weight laid out for a step and its bias


class Fold(NamedTuple):
    """One matrix of a block as a step reads it, before any layout: the model's (out, in) weight times `factor`
    (in,), float32 and contiguous, one number per input, and its bias. Both layouts form each product in float32
    and round it once to their dtype, so they hold the same numbers."""

    weight: torch.Tensor
    factor: torch.Tensor
    bias: torch.Tensor | None

    @classmethod
    def of(cls, weight: torch.Tensor, bias: torch.Tensor | None, gain: torch.Tensor | None = None,
           scale: float = 1.0) -> "Fold":
        """The weight with an RMS-norm `gain` (that reads its input) and a `scale` folded in."""
        factor = (gain.float() * scale if gain is not None
                  else torch.full(weight.shape[1:], scale, dtype=torch.float32, device=weight.device))
        return cls(weight, factor, bias)

    def stored(self, dtype: torch.dtype) -> Affine:
        """(in, out), contiguous, for torch.mm: the layout of one panel as wide as the matrix."""
        panel, bias = self.packed(dtype, self.weight.shape[0])
        return panel[0], bias

    def packed(self, dtype: torch.dtype, width: int, paired: bool = False) -> Affine:
        """As decode_kernel.cpp reads it: panels of `width` output columns, each (in, width) and contiguous, the
        last padded with zero columns, and the bias padded likewise; one pass over the weight. `paired`: each
        panel's rows two at a time, interleaved column by column, (in / 2, width, 2), a zero row after an odd `in`
        (AVX512-BF16's vdpbf16ps multiplies such pairs), in one more pass."""
        weight, (n, k) = self.weight.float(), self.weight.shape
        whole, rest = divmod(n, width)
        panels = torch.empty(whole + (rest > 0), k + (k % 2 if paired else 0), width, dtype=dtype, device=weight.device)
        panels[:, k:] = 0
        torch.mul(weight[: whole * width].reshape(whole, width, k).transpose(1, 2), self.factor[:, None],
                  out=panels[:whole, :k])
        if rest:
            panels[whole, :, rest:] = 0
            torch.mul(weight[whole * width :].t(), self.factor[:, None], out=panels[whole, :k, :rest])
        bias = F.pad(self.bias.float(), (0, -n % width)).to(dtype) if self.bias is not None else None
        if paired:
            panels = panels.unflatten(1, (-1, 2)).transpose(2, 3).contiguous()
        return panels, bias


class DecodeWeights:
    """The block weights laid out for decoding steps, built once per sampling call, each layout on first use.

    A step at a small batch is a chain of tiny operations whose number, not their arithmetic, sets the pace. So each
    RMS-norm gain is folded into the matrix that reads the normalised vector, quick GELU's 1.702 into the MLP's
    matrices (it becomes one silu), and q/k/v are one matrix (`Fold`). The eager and static steps read them stored
    (in, out) for torch.mm (`blocks`, `head`); the kernel step reads them packed in panels (`panels`). Each
    layout costs one copy of the block weights (in the autocast dtype when autocasting) while it lives, and is
    built only where a step reads it, block by block, one multiply per matrix: a sample drawn from an empty prefix
    by the kernel never builds the stored layout.
    """

    def __init__(self, model: ImageGPT, dtype: torch.dtype):
        self.model, self.dtype = model, dtype
        self._stored: tuple[list[tuple[Affine, ...]], torch.Tensor] | None = None
        self._panels: dict[tuple[int, bool], tuple[list[list[Affine]], torch.Tensor]] = {}  # by width, paired

    def _block_folds(self) -> Iterator[tuple[Fold, Fold, Fold, Fold]]:
        """Per block, its qkv, attention output, fc and MLP output: one block at a time, so that only one block's
        stacked qkv lives beside the layout being built."""
        for block in self.model.blocks:
            attn, mlp = block.attn, block.mlp
            fc_bias = mlp.fc.bias.float() * QUICK_GELU if mlp.fc.bias is not None else None
            yield (Fold.of(*attn._stacked(), gain=block.ln_1.weight),
                   Fold.of(attn.proj.weight, attn.proj.bias),
                   Fold.of(mlp.fc.weight, fc_bias, block.ln_2.weight, QUICK_GELU),
                   Fold.of(mlp.proj.weight, mlp.proj.bias, scale=1 / QUICK_GELU))

    def _head_fold(self) -> Fold:
        return Fold.of(self.model.head.weight, None, self.model.ln_f.weight)

    @property
    def blocks(self) -> list[tuple[Affine, Affine, Affine, Affine]]:
        """Per block: qkv, attention output, fc and MLP output, each stored (in, out)."""
        return self._stored_layout()[0]

    @property
    def head(self) -> torch.Tensor:
        return self._stored_layout()[1]

    @torch.no_grad()
    def _stored_layout(self) -> tuple[list[tuple[Affine, ...]], torch.Tensor]:
        if self._stored is None:
            self._stored = ([tuple(fold.stored(self.dtype) for fold in block) for block in self._block_folds()],
                            self._head_fold().stored(self.dtype)[0])
        return self._stored

    def tensors(self) -> list[torch.Tensor]:
        """The stored layout's tensors (what the static step reads), built here if no step has built them."""
        return [w for block in self.blocks for pair in block for w in pair if w is not None] + [self.head]

    @torch.no_grad()
    def panels(self, width: int, paired: bool = False) -> tuple[list[list[Affine]], torch.Tensor]:
        """The blocks and the head packed in panels `width` columns wide (their rows in pairs where `paired`), as
        decode_kernel.cpp reads them, once for every Decoder that shares these weights."""
        if (width, paired) not in self._panels:
            blocks = [[fold.packed(self.dtype, width, paired) for fold in block] for block in self._block_folds()]
            self._panels[width, paired] = blocks, self._head_fold().packed(self.dtype, width, paired)[0]
        return self._panels[width, paired]


def _affine(x: torch.Tensor, weight_bias: Affine) -> torch.Tensor:
    weight, bias = weight_bias
    return torch.mm(x, weight) if bias is None else torch.addmm(bias, x, weight)


class KVCache:
    """Preallocated keys and values, one (batch, heads, slots, head_dim) tensor per layer, and the position.

    Slots are n_ctx for dense and column layers and the window for band layers (a ring).
    Separate tensors per layer, not one stacked tensor: a compiled step then writes its
    column in place instead of copying the whole cache through a view. `pos` (a Python int,
    for eager steps) and `index` (the same position as a tensor, for static steps) move together.
    """

    def __init__(self, model: ImageGPT, batch: int, weights: DecodeWeights, device: torch.device,
                 dtype: torch.dtype, static: bool = False):
        c = model.config
        self.dense = c.attention == "dense"
        self.patterns = [layer_pattern(c, layer) for layer in range(c.n_layer)]
        shapes = [(batch, c.n_head, pattern.slots(c.n_ctx), c.n_embd // c.n_head) for pattern in self.patterns]
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for shape in shapes]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for shape in shapes]
        self.weights = weights
        self.pos = 0  # input positions already processed
        self.index = torch.zeros(1, dtype=torch.long, device=device) if static else None

    @property
    def batch(self) -> int:
        return self.k[0].shape[0]

    def advance(self, n: int) -> None:
        self.pos += n
        if self.index is not None:
            self.index += n

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor a decoding step reads or writes."""
        return [*self.k, *self.v, *([self.index] if self.index is not None else []), *self.weights.tensors()]


def compute_dtype(model: ImageGPT, device: torch.device) -> torch.dtype:
    """What the keys will be: autocast's dtype when autocasting, else the weights'."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return model.wte.weight.dtype


def _blocks(model: ImageGPT, h: torch.Tensor, cache: KVCache, static: bool) -> torch.Tensor:
    """The blocks for t new positions per row, h (B, t, d), through the decode weights; logits of the last.

    One position (a step) stores its key and value and reads what its pattern sees; a prefix from
    position 0 runs the pattern's full-sequence attention and keeps what later steps read; a dense
    model's chunk after earlier context attends causally within the chunk.
    """
    b, t, d = h.shape
    heads, eps = model.config.n_head, model.config.eps
    # the static step reads its position from `cache.index`, never `cache.pos`: a compiled graph would guard on it
    position = cache.index if static else cache.pos
    h = h.reshape(b * t, d)
    for i, (qkv, proj, fc, mlp_proj) in enumerate(cache.weights.blocks):
        q, k, v = _affine(F.rms_norm(h, (d,), eps=eps), qkv).view(b, t, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
        y = _attend_cached(cache, i, q, k, v, position)
        h = h + _affine(y.transpose(1, 2).reshape(b * t, d), proj)
        h = h + _affine(F.silu(_affine(F.rms_norm(h, (d,), eps=eps), fc)), mlp_proj)
    last = h.view(b, t, d)[:, -1]
    return torch.mm(F.rms_norm(last, (d,), eps=eps), cache.weights.head)


def _attend_cached(cache: KVCache, i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   position: int | torch.Tensor) -> torch.Tensor:
    """Layer i's attention for queries (B, heads, t, head_dim) at `position`, storing their keys and values."""
    pattern, keys, values = cache.patterns[i], cache.k[i], cache.v[i]
    t = q.shape[2]
    if t == 1:
        return step_attention(q, *pattern.read(keys, values, k, v, position))
    if position == 0:
        pattern.keep(keys, values, k, v)
        return attend(q, k, v, pattern)
    end = position + t  # only dense models feed a chunk after earlier context (Decoder.feed)
    keys[:, :, position:end] = k
    values[:, :, position:end] = v
    mask = pattern.sees(torch.arange(position, end, device=q.device)[:, None], torch.arange(end, device=q.device))
    return F.scaled_dot_product_attention(q, keys[:, :, :end], values[:, :, :end], attn_mask=mask)


def step_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                   mask: torch.Tensor | None = None) -> torch.Tensor:
    """A step's attention, one query per row and head: SDPA on GPUs; on CPUs two batched products and a
    softmax, since SDPA takes its flash kernel even for one query there and its set-up outweighs the work,
    far more so in bf16 (bench/bench_sample.py times the step)."""
    if q.device.type != "cpu":
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
    scores = torch.matmul(q, keys.transpose(-1, -2)).mul_(q.shape[-1] ** -0.5)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.matmul(scores.softmax(-1), values)


def static_step(model: ImageGPT, tokens: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """One token per row (B,) at position `cache.index`; logits (B, vocab) for the next. Fixed shapes.

    The cache must start zeroed (masked entries are multiplied by 0). Does not advance the
    cache: the caller does, outside the compiled graph.
    """
    h = model.wte(tokens) + model.positions_at(cache.index)
    return _blocks(model, h[:, None], cache, static=True)


_COMPILED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _compiled_static_step(model: ImageGPT):
    """`static_step` compiled once per model: static shapes, so one graph serves every pixel."""
    if model not in _COMPILED:
        mode = "reduce-overhead" if next(model.parameters()).is_cuda else None  # CUDA graphs on GPUs
        _COMPILED[model] = torch.compile(lambda tokens, cache: static_step(model, tokens, cache), fullgraph=True,
                                         dynamic=False, mode=mode)
    return _COMPILED[model]


def check_temperature(temperature: float) -> None:
    """Sampling divides the logits by the temperature: it must be positive."""
    if temperature <= 0:
        raise IgptError(f"temperature must be > 0, got {temperature} (use greedy=True for argmax decoding)")


_STEP_ARGUMENTS = ([ctypes.c_void_p] + [ctypes.c_int64] * 3 + [ctypes.c_int, ctypes.c_void_p] + [ctypes.c_int64] * 6
                   + [ctypes.c_float] + [ctypes.c_void_p] * 5 + [ctypes.c_float, ctypes.c_void_p]
                   + [ctypes.c_int])  # see decode_kernel.cpp's steps
KERNEL = Kernel(Path(__file__).with_name("decode_kernel.cpp"),
                {"decode_steps": _STEP_ARGUMENTS, "decode_steps_bf16": _STEP_ARGUMENTS, "decode_panel_width": [],
                 "decode_paired": [], "decode_work_floats": [ctypes.c_int64] * 5},
                {"decode_work_floats": ctypes.c_int64})


class KernelStep:
    """The one-pixel step as one call to decode_kernel.cpp: the eager step's arithmetic on the same cache, from
    the tokens to float32 logits (`__call__`), or a run of such steps that each draw the next pixel and feed it
    on (`draw`), with no Python between their operations.

    Built per Decoder: it holds the addresses of the decode weights packed in the kernel's panels
    (`DecodeWeights.panels`) and of this cache's tensors, which nothing reallocates while it lives.
    """

    @staticmethod
    def applies(cache: KVCache) -> bool:
        """A CPU cache in float32 or bfloat16 whose decode weights share its dtype, and the kernel built."""
        dtype = cache.k[0].dtype
        return cache.k[0].device.type == "cpu" and dtype in (torch.float32, torch.bfloat16) \
            and cache.weights.dtype == dtype and KERNEL.available()

    def __init__(self, model: ImageGPT, cache: KVCache):
        c = model.config
        self.config, self.cache = c, cache
        self.threads = torch.get_num_threads()
        lib = KERNEL.library()
        width = lib.decode_panel_width()
        with torch.no_grad():
            self.embed = torch.cat([model.wte.weight, model.sos[None]]).float().contiguous()  # position 0 feeds sos
            self.positions = model.positions(0, c.n_ctx).float().contiguous()
        paired = cache.weights.dtype == torch.bfloat16 and bool(lib.decode_paired())
        self.blocks, self.head = cache.weights.panels(width, paired)
        rows = cache.batch
        self.work = torch.zeros(lib.decode_work_floats(rows, c.n_embd, c.n_ctx, c.vocab_size, self.threads),
                                dtype=torch.float32)  # zero: the kernel's thread rates start unknown
        layers = []
        for block, pattern, keys, values in zip(self.blocks, cache.patterns, cache.k, cache.v):
            addresses = [x.data_ptr() if x is not None else 0 for pair in block for x in pair]
            layers.append(addresses + [keys.data_ptr(), values.data_ptr(), KINDS.index(pattern.kind), pattern.side,
                                       keys.shape[2]])
        self.layers = torch.tensor(layers, dtype=torch.int64)
        self.function = lib.decode_steps_bf16 if cache.k[0].dtype == torch.bfloat16 else lib.decode_steps

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits (B, vocab) after feeding tokens (B,) at the cache's position. Does not advance the cache."""
        if tokens.shape != (self.cache.batch,):
            raise IgptError(f"the decoder holds {self.cache.batch} rows; it was fed tokens of shape "
                            f"{tuple(tokens.shape)}")
        return self._run(tokens.to(torch.int64).contiguous(), 1, 1, False, None, 1.0)

    def draw(self, out: torch.Tensor, steps: int, uniforms: torch.Tensor | None, temperature: float) -> torch.Tensor:
        """For the `steps` positions p from the cache's: feed out[:, p - 1] and write the next pixel to out[:, p],
        drawn as sample.draw draws from softmax(logits / temperature) with that step's `uniforms` (steps, B), or
        greedy without, in one call. out: (B, n_ctx) int64 on the CPU, contiguous. Returns the last step's
        logits; does not advance the cache. Checks all it hands the kernel, which reads and writes in place."""
        batch, n_ctx, pos = self.cache.batch, self.config.n_ctx, self.cache.pos
        steps = operator.index(steps)
        if out.shape != (batch, n_ctx) or out.dtype != torch.int64 or not out.is_contiguous() \
                or out.device.type != "cpu":
            raise IgptError(f"feed_and_draw fills a contiguous CPU int64 tensor of shape ({batch}, {n_ctx}), "
                            f"not {out.device.type} {out.dtype} {tuple(out.shape)}")
        if uniforms is not None:
            if uniforms.shape != (steps, batch) or uniforms.device.type != "cpu":
                raise IgptError(f"feed_and_draw takes one uniform number per step and row, a CPU tensor of shape "
                                f"({steps}, {batch}), not {uniforms.device.type} {tuple(uniforms.shape)}")
            check_temperature(temperature)
        if not (0 < pos and 0 < steps and pos + steps <= n_ctx):
            raise IgptError(f"feed_and_draw draws pixels after the prefix and within the context of {n_ctx}, "
                            f"not {steps} from position {pos}")
        return self._run(out[:, pos - 1 :], n_ctx, steps, True, uniforms, temperature)

    def _run(self, tokens: torch.Tensor, stride: int, steps: int, draw: bool, uniforms: torch.Tensor | None,
             temperature: float) -> torch.Tensor:
        c, cache = self.config, self.cache
        logits = torch.empty(cache.batch, c.vocab_size, dtype=torch.float32)
        if uniforms is not None:
            uniforms = uniforms.to(torch.float32).contiguous()
        status = self.function(tokens.data_ptr(), stride, cache.pos, steps, draw, self.layers.data_ptr(), c.n_layer,
                               cache.batch, c.n_embd, c.n_head, c.vocab_size, c.n_ctx, c.eps, self.embed.data_ptr(),
                               self.positions.data_ptr(), self.head.data_ptr(), logits.data_ptr(),
                               uniforms.data_ptr() if uniforms is not None else None, temperature,
                               self.work.data_ptr(), self.threads)
        if status:
            raise IgptError(f"a token outside the vocabulary of {c.vocab_size} (or at position 0 other than sos) "
                            "was fed to the decoder")
        return logits


class Decoder:
    """Feeds an ar model a prefix, then one pixel per step, and returns the next pixel's logits each time
    (`feed`), or with the kernel step draws a run of pixels, each fed to the next step, in one call
    (`feed_and_draw`).

    `weights`: the decode weights of an earlier Decoder of the same model and dtype, so a
    sampling call lays them out once for all its batches. `static`: one-pixel steps through
    the static step; `compile`: that step compiled (CUDA graphs on GPUs, where it removes the
    launch overhead). Otherwise `kernel`: steps through decode_kernel.cpp where it applies (a CPU, a
    float32 or bfloat16 cache, a C++ compiler: `KernelStep.applies`), else the eager step.
    """

    def __init__(self, model: ImageGPT, batch: int, *, weights: DecodeWeights | None = None,
                 static: bool = False, compile: bool = False, kernel: bool = True):
        if model.config.objective != "ar":
            raise IgptError("incremental decoding needs an autoregressive (ar) model")
        self.model = model
        device = model.wte.weight.device
        dtype = compute_dtype(model, device)
        self.weights = weights or DecodeWeights(model, dtype)
        self.cache = KVCache(model, batch, self.weights, device, dtype, static=static or compile)
        self.static_step = None
        self.kernel_step = None
        if compile:
            for tensor in self.cache.tensors():  # fixed addresses: CUDA graphs write and read them in place
                torch._dynamo.mark_static_address(tensor)
            self.static_step = _compiled_static_step(model)
        elif static:
            self.static_step = lambda tokens, cache: static_step(model, tokens, cache)
        elif kernel and KernelStep.applies(self.cache):
            self.kernel_step = KernelStep(model, self.cache)

    @property
    def draws_in_kernel(self) -> bool:
        """Whether `feed_and_draw` runs here: the kernel's step can pick the next pixel itself."""
        return self.kernel_step is not None

    @torch.no_grad()
    def feed_and_draw(self, out: torch.Tensor, steps: int, uniforms: torch.Tensor | None, temperature: float) -> None:
        """Continue the images in `out` (B, n_ctx) int64 by `steps` pixels in one kernel call: feed the last pixel
        known, out[:, p - 1] at the cache's position p, write the next to out[:, p], drawn as sample.draw draws
        from softmax(logits / temperature) with `uniforms[s]` (B,) at step s, or greedy without, and go on from
        it (`KernelStep.draw`). Per-step Python (the operators of a sampling step, the call itself) took a
        sizeable share of a small model's step."""
        if not self.draws_in_kernel:
            raise IgptError("this decoder has no kernel step to draw in; feed it and draw from the logits")
        self.kernel_step.draw(out, steps, uniforms, temperature)
        self.cache.advance(steps)

    @torch.no_grad()
    def feed(self, tokens: torch.Tensor | None) -> torch.Tensor:
        """Feed the next tokens (B, T) (None at the start: the empty prefix); logits (B, vocab) for the next pixel.

        The first call also feeds sos, so a prefix of p pixels costs one pass and yields the
        prediction for pixel p; later calls take the pixels just sampled.
        """
        model, cache = self.model, self.cache
        n_ctx = model.config.n_ctx
        t = (tokens.shape[1] if tokens is not None else 0) + (cache.pos == 0)
        if t == 0:
            raise IgptError("feed needs tokens once decoding has started")
        if cache.pos + t > n_ctx:
            raise IgptError(f"decoding past the context of {n_ctx} pixels")
        if not cache.dense and cache.pos > 0 and t > 1:  # a chunk after earlier context: pixel by pixel
            for j in range(t):
                logits = self.feed(tokens[:, j : j + 1])
            return logits
        if self.kernel_step is not None and t == 1:  # position 0 feeds sos, the kernel's token after the vocabulary
            logits = self.kernel_step(tokens[:, 0] if cache.pos
                                      else torch.full((cache.batch,), model.config.vocab_size))
        elif self.static_step is not None and cache.pos > 0 and t == 1:
            if tokens.is_cuda:  # a new CUDA-graph step: the last step's logits have been consumed
                torch.compiler.cudagraph_mark_step_begin()
            logits = self.static_step(tokens[:, 0], cache)
        else:
            parts = [model.sos.expand(cache.batch, 1, -1).to(model.wte.weight.dtype)] if cache.pos == 0 else []
            if tokens is not None and tokens.shape[1]:
                parts.append(model.wte(tokens))
            h = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
            logits = _blocks(model, h + model.positions(cache.pos, cache.pos + t), cache, static=False)
        cache.advance(t)
        return logits
