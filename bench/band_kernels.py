"""The band's attention kernels alone on a CPU: igpt's own kernel, the blocked SDPA, and an exact split into two triangles.

    python bench/band_kernels.py [--side 64] [--window-rows 2] [--batch 1] [--heads 4] [--head-dim 32] [--repeat 5]

A local layer with R window rows attends, for each query i, to the keys i - R x side < j <= i.
Three ways to compute it, forward and backward:
- igpt's band kernel (igpt/attention/band_kernel.cpp, what `igpt.attention.band_attention` runs for float32 on a
  CPU): tiles of 16 queries, each reading its window + 15 keys, no copies, no mask.
- The blocked SDPA (`igpt.attention.backends.BandAttention`, what runs where the kernel cannot be built): one-row
  blocks of queries, each attending to its own row and the R rows before under a small mask
  through PyTorch's CPU flash kernel, (R + 1) x side keys computed per query for the R x side it
  needs.
- Two triangles, exact and not in the library because it measured no faster than the blocks:
  blocks of the whole window (R rows), each attending causally to itself and, with keys and
  queries flipped, to the block before where the key lies after the query, so both are plain
  top-left causal SDPA calls with no mask and no surplus keys; the two halves are merged by their
  log-sum-exp, and the backward runs PyTorch's flash backward per half with the merged output and
  log-sum-exp, as ring attention does. The CPU flash kernel takes as long for a causal block as for
  a full one at these sizes (the last lines).

Prints milliseconds, the ratio against dense causal SDPA (the paper's layer, the reference), and
the rate of the useful work (the window's keys only: 12 x keys x head_dim FLOPs per query and
head) against the fp32 matmul peak measured in the same run, and the largest difference of the
others' outputs and gradients from the kernel's, then the kernel's time on sharp scores (a trained
model's: probabilities and their gradients under float's normal range, where x86 arithmetic on
subnormals and glibc's vector exp leave their fast paths) against its time on random ones. The
`tiny` preset's shapes by default (4 heads of 32) at 64x64, batch 1; q, k and v come as the model
makes them, (B, heads, t, head_dim) views of (B, t, heads, head_dim) tensors. Run it when nothing
else does: two cores shared with another process make every figure noise.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from common import band_kernel_state, machine, matmul_peak, seconds_per_call
from flex_attention import fwd_bwd_ms
from igpt.attention import Pattern, band_kernel
from igpt.attention.backends import BandAttention

FLASH = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
FLASH_BACKWARD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
SHARP = 40  # the queries' scale for the sharp-score line: score gaps beyond 87, where exp leaves float's normal range


class TwoTriangles(torch.autograd.Function):
    """Exact band attention of window w over blocks of w positions, as two unmasked causal calls (see above)."""

    @staticmethod
    def forward(ctx, q, k, v, window: int):
        b, h, t, hd = q.shape
        blocks = t // window
        q, k, v = (x.reshape(b * h, blocks, window, hd) for x in (q, k, v))
        own, own_lse = FLASH(q, k, v, 0.0, True)
        # Block m's queries against block m-1's keys where key > query: flipped, and the queries shifted
        # by one, that is top-left causal; the block's last query has no such key.
        q2, k2, v2 = q[:, 1:].flip(-2)[:, :, 1:], k[:, :-1].flip(-2), v[:, :-1].flip(-2)
        before, before_lse = FLASH(q2, k2, v2, 0.0, True)
        before, before_lse = before.flip(-2), before_lse.flip(-1)
        lse = own_lse.clone()
        lse[:, 1:, :-1] = torch.logaddexp(own_lse[:, 1:, :-1], before_lse)
        out = own * torch.exp(own_lse - lse).unsqueeze(-1)
        out[:, 1:, :-1] += before * torch.exp(before_lse - lse[:, 1:, :-1]).unsqueeze(-1)
        ctx.save_for_backward(q, k, v, q2, k2, v2, out, lse)
        ctx.shape = (b, h, t, hd)
        return out.reshape(ctx.shape)

    @staticmethod
    def backward(ctx, grad):
        q, k, v, q2, k2, v2, out, lse = ctx.saved_tensors
        grad = grad.reshape(out.shape)
        dq, dk, dv = FLASH_BACKWARD(grad, q, k, v, out, lse, 0.0, True)

        def flipped(x):  # block m >= 1, queries 0..w-2, in the second call's order
            return x[:, 1:, :-1].flip(-2).contiguous()

        dq2, dk2, dv2 = FLASH_BACKWARD(flipped(grad), q2, k2, v2, flipped(out),
                                       lse[:, 1:, :-1].flip(-1).contiguous(), 0.0, True)
        dq[:, 1:, :-1] += dq2.flip(-2)
        dk[:, :-1] += dk2.flip(-2)
        dv[:, :-1] += dv2.flip(-2)
        return dq.reshape(ctx.shape), dk.reshape(ctx.shape), dv.reshape(ctx.shape), None


def heads(attention):
    """attention over (B, heads, t, head_dim) views of (B, t, heads, head_dim) tensors, as the model calls it."""
    return lambda q, k, v: attention(*(x.transpose(1, 2) for x in (q, k, v))).transpose(1, 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--side", type=int, default=64)
    parser.add_argument("--window-rows", type=int, default=2)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    side, window = args.side, args.window_rows * args.side
    t = side * side
    if window >= t or t % window:
        parser.error("--window-rows must leave the window smaller than the image and divide its rows")
    peak = matmul_peak(torch.float32)
    if not band_kernel.available():
        parser.error(band_kernel_state())
    print(f"{machine()}, fp32 matmul peak {peak / 1e9:.0f} GFLOP/s; {side}x{side}, "
          f"window {args.window_rows} rows ({window} keys), batch {args.batch}, {args.heads} heads of {args.head_dim}; "
          f"forward + backward of one layer's attention, best of {args.repeat}")
    shape = (args.batch, t, args.heads, args.head_dim)  # the model's layout: (B, heads, t, head_dim) views of it
    q, k, v = (torch.randn(shape, requires_grad=True) for _ in range(3))
    grad = torch.randn(shape)
    contenders = {  # name: (attention, keys computed per query)
        "dense causal SDPA (reference)": (heads(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True)),
                                          (t + 1) / 2),
        "igpt's band kernel": (heads(lambda q, k, v: band_kernel.band_attention(q, k, v, window)), window + 15),
        "blocked SDPA (BandAttention)": (heads(lambda q, k, v: BandAttention.apply(q, k, v, Pattern("band", side, window))),
                                         window + side),
        "exact two triangles": (heads(lambda q, k, v: TwoTriangles.apply(q, k, v, window)), window),
    }
    results = {}
    for name in list(contenders)[1:]:
        for x in (q, k, v):
            x.grad = None
        out = contenders[name][0](q, k, v)
        out.backward(grad)
        results[name] = [out.detach(), q.grad, k.grad, v.grad]
    per_query_head = args.batch * args.heads * t * 12 * args.head_dim  # FLOPs per key attended, all queries
    times = {name: fwd_bwd_ms(fn, q, k, v, args.repeat) for name, (fn, _) in contenders.items()}
    reference = times["dense causal SDPA (reference)"]
    print(f"  {'kernel':30s} {'ms':>8s} {'vs dense':>9s} {'keys/query':>11s} {'useful GFLOP/s':>15s} {'of peak':>8s}")
    for name, (_, keys) in contenders.items():
        useful = per_query_head * ((t + 1) / 2 if name.startswith("dense") else window)
        rate = useful / (times[name] / 1e3)
        print(f"  {name:30s} {times[name]:8.2f} {reference / times[name]:8.2f}x {keys:11.0f} {rate / 1e9:15.1f} "
              f"{rate / peak:8.1%}")
    kernel = results.pop("igpt's band kernel")
    for name, other in results.items():
        diff = max((a - b).abs().max().item() for a, b in zip(kernel, other))
        print(f"  {name} against the kernel: max |difference| of outputs and gradients {diff:.1e}")
    sharp_q = (q * SHARP).detach().requires_grad_()
    ours = "igpt's band kernel"
    sharp = fwd_bwd_ms(contenders[ours][0], sharp_q, k, v, args.repeat)
    print(f"  {ours}, scores {SHARP}x sharper (probabilities under float's range, as in a trained model): "
          f"{sharp:.2f} ms, {sharp / times[ours]:.2f}x its time on the random scores")
    blocks = torch.randn(args.batch * args.heads, t // window, window, args.head_dim)
    causal, full = (seconds_per_call(lambda c=c: FLASH(blocks, blocks, blocks, 0.0, c), min_time=1.0) * 1e3
                    for c in (True, False))
    print(f"  CPU flash kernel, forward over {window}-position blocks: causal {causal:.2f} ms, full {full:.2f} ms "
          f"(causal/full {causal / full:.2f}: what skipping the masked triangle saves at this size)")


if __name__ == "__main__":
    main()
