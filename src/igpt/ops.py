"""The model's element-wise operations, with backwards of their own under autograd.

Each keeps the reference formula's forward, bit for bit, and replaces only the backward
that autograd would build from it: on a CPU those backwards are chains of memory-bound
element-wise passes over the block's largest activations, and one fused pass does the same
work. Compiled, RMS norm takes PyTorch's composite, which inductor fuses itself; quick GELU's
Function is traced as it is.
tests/test_model.py holds each equal to its formula (gradcheck in float64);
bench/bench_elementwise.py times each against PyTorch's own.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.autograd.function import once_differentiable

QUICK_GELU = 1.702


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """x * sigmoid(1.702 x), the released model's activation; under autograd through QuickGELUFunction."""
    if x.requires_grad and torch.is_grad_enabled():
        return QuickGELUFunction.apply(x)
    return x * torch.sigmoid(QUICK_GELU * x)


class QuickGELUFunction(torch.autograd.Function):
    """quick_gelu with a one-kernel backward.

    Its derivative is SiLU's at z = 1.702 x, so the backward is aten's fused silu_backward: one
    pass over the block's largest activation, (tokens, 4d), instead of the five element-wise
    passes autograd makes through the formula. First derivatives only: training needs no more,
    and a second backward through it raises rather than return a wrong one.
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
    (tokens, width) activations, and there are two norms a block; RMSNormFunction's makes
    about half as many. Half-precision inputs keep PyTorch's kernel (its float accumulation).
    """

    def __init__(self, width: int, eps: float):
        super().__init__(width, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        full = x.dtype in (torch.float32, torch.float64)
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
