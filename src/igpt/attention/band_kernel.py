"""Band attention's own CPU kernel (band_kernel.cpp): compiled on first use, run as PyTorch custom operators.

Each query i attends to the keys i - window < j <= i. PyTorch's CPU flash kernel, which the
blocked backends call, computes a whole block of queries against every key any of them sees
under a mask: (rows + 1) x side keys per query where the window holds rows x side, plus the
window copies. This kernel reads only each 16-query tile's window and its backward writes each
gradient once (bench/band_kernels.py times it against them).

It is built on first use (igpt/kernels.py) and called through ctypes inside two custom
operators (igpt::band_forward, igpt::band_backward), which eager autograd and torch.compile both
run. It takes float32 or bfloat16 with head sizes 16, 32, 48, 64, 96 and 128, and sums in float
either way; in bf16 on a CPU with AVX512-BF16 the products run in its bf16 dot instruction, with the
probabilities and the scores' gradients rounded to bf16 as flash attention rounds them, elsewhere in float.
Where no compiler works, or with IGPT_BAND_KERNEL=0, `available()` is False and the other backends
serve. The (batch, head) pairs are shared out over torch's own OpenMP threads (a pool of Python
threads competed with them, and lost the kernel's gain inside a training step).
"""

from __future__ import annotations

import ctypes
import math
from pathlib import Path

import torch

from igpt.kernels import Kernel

HEAD_DIMS = (16, 32, 48, 64, 96, 128)
DTYPES = (torch.float32, torch.bfloat16)
# pointers, then pairs, heads, t, head_dim, window, scale, threads
_POINTERS, _TAIL = [ctypes.c_void_p], [ctypes.c_int64] * 5 + [ctypes.c_float, ctypes.c_int]
KERNEL = Kernel(Path(__file__).with_name("band_kernel.cpp"), {
    name + suffix: _POINTERS * pointers + _TAIL
    for suffix in ("", "_bf16") for name, pointers in (("band_forward", 6), ("band_backward", 10))})


def applies(q: torch.Tensor) -> bool:
    """Whether band attention over these queries (B, heads, t, head_dim) runs in this kernel."""
    return q.device.type == "cpu" and q.dtype in DTYPES and q.shape[-1] in HEAD_DIMS and available()


@torch.compiler.assume_constant_result  # compiled graphs ask once, at trace time
def available() -> bool:
    return KERNEL.available()


def band_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int) -> torch.Tensor:
    """Band attention of `window` keys over (B, heads, t, head_dim) float32 or bfloat16 tensors, in the kernel both ways.

    The output comes in the model's (B, t, heads, head_dim) layout, as SDPA's does; the backward
    recomputes the probabilities from the saved log-sum-exp, as flash attention does. Both are
    PyTorch custom operators, so torch.compile calls them as they are.
    """
    if window < 1:
        raise ValueError(f"a band needs a window of at least one position, not {window}")
    return torch.ops.igpt.band_forward(q, k, v, min(window, q.shape[2]))[0]


def check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int) -> None:
    """What the kernel reads without asking: one shape, one of DTYPES, CPU memory, a window within the sequence."""
    if not (q.shape == k.shape == v.shape and q.dim() == 4):
        raise ValueError(f"igpt's band kernel takes q, k and v of one (B, heads, t, head_dim) shape, "
                         f"not {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if q.dtype not in DTYPES or any(x.dtype != q.dtype or x.device.type != "cpu" for x in (q, k, v)):
        raise ValueError("igpt's band kernel takes q, k and v on the CPU, all float32 or all bfloat16")
    if not 1 <= window <= max(q.shape[2], 1):
        raise ValueError(f"igpt's band kernel takes a window from 1 to t = {q.shape[2]}, not {window}")


def heads_layout(q: torch.Tensor) -> torch.Tensor:
    """A new (B, heads, t, head_dim) tensor laid out as (B, t, heads, head_dim), as the model's q/k/v product is."""
    b, h, t, hd = q.shape
    return q.new_empty(b, t, h, hd).transpose(1, 2)


@torch.library.custom_op("igpt::band_forward", mutates_args=())
def band_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int) -> tuple[torch.Tensor, torch.Tensor]:
    q, k, v = (unit_stride(x) for x in (q, k, v))
    out, lse = band_forward_shapes(q, k, v, window)  # the checks, and the outputs to fill
    call(kernel("band_forward", q), [q, k, v, out, lse], [q, k, v, out], q.shape, window)
    return out, lse


@band_forward.register_fake
def band_forward_shapes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The outputs, empty, for tracing and for the kernel to fill: out in the model's layout, the log-sum-exp."""
    check_inputs(q, k, v, window)
    return heads_layout(q), q.new_empty(q.shape[:3], dtype=torch.float32)


@torch.library.custom_op("igpt::band_backward", mutates_args=())
def band_backward(grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                  lse: torch.Tensor, window: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    grad, q, k, v, out = (unit_stride(x.to(q.dtype)) for x in (grad, q, k, v, out))
    dq, dk, dv = band_backward_shapes(grad, q, k, v, out, lse, window)
    call(kernel("band_backward", q), [q, k, v, out, lse.contiguous(), grad, dq, dk, dv],
         [q, k, v, out, grad, dq, dk, dv], q.shape, window)
    return dq, dk, dv


@band_backward.register_fake
def band_backward_shapes(grad, q, k, v, out, lse, window) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return tuple(heads_layout(q) for _ in range(3))


def save_for_backward(ctx, inputs: tuple, output: tuple) -> None:
    q, k, v, window = inputs
    ctx.save_for_backward(q, k, v, *output)
    ctx.mark_non_differentiable(output[1])  # the log-sum-exp is the backward's, not a result to train through
    ctx.window = window


def gradients(ctx, grad: torch.Tensor, lse_grad: None) -> tuple[torch.Tensor, ...]:
    q, k, v, out, lse = ctx.saved_tensors
    return *band_backward(grad, q, k, v, out, lse, ctx.window), None


band_forward.register_autograd(gradients, setup_context=save_for_backward)


def kernel(name: str, like: torch.Tensor):
    """The kernel's function `name` for `like`'s dtype."""
    return getattr(KERNEL.library(), name + ("_bf16" if like.dtype == torch.bfloat16 else ""))


def unit_stride(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def call(function, tensors: list[torch.Tensor], strided: list[torch.Tensor], shape: torch.Size, window: int) -> None:
    """Call the kernel over every (batch, head) pair, on torch's threads."""
    b, h, t, hd = shape
    strides = torch.tensor([s for x in strided for s in x.stride()[:3]], dtype=torch.int64)
    status = function(*(x.data_ptr() for x in tensors), strides.data_ptr(), b * h, h, t, hd, window,
                      1 / math.sqrt(hd), torch.get_num_threads())
    if status == 1:
        raise ValueError(f"igpt's band kernel has no case for head size {hd} (it takes {HEAD_DIMS})")
    if status:
        raise MemoryError("igpt's band kernel could not allocate its working memory")
