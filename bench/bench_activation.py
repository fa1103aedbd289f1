"""The MLP's activation, quick GELU, forward + backward: igpt's one-pass backward against autograd through the formula.

    python bench/bench_activation.py [--tokens 4096] [--width 512] [--repeat 20] [--device cpu|cuda]

`igpt.model.quick_gelu` trains through `QuickGELUFunction`, whose backward is PyTorch's fused
`silu_backward` at z = 1.702 x (the same derivative); the reference is x * sigmoid(1.702 x)
differentiated by autograd, five element-wise passes in the backward. Both run on the same
(tokens, width) activation, `tiny`'s MLP hidden layer at 16x16 and batch 16 by default (4,096
tokens x 512), in turns, best of --repeat. The activation is memory-bound, so the machine's limit
is a bandwidth floor: the three tensors any forward must touch (read x, write the output, keep
z or x for the backward) and the three of any backward (read the gradient and the kept tensor,
write the input's gradient), read at the bandwidth measured in the same run for a working set of
that size. "of floor" is the floor's time over the measured time.
"""

from __future__ import annotations

import argparse
import time

import torch

from common import machine, read_bandwidth, synchronize
from igpt.model import QUICK_GELU, quick_gelu


def formula(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(QUICK_GELU * x)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--width", type=int, default=512, help="the MLP's hidden width, 4 x n_embd")
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--device", default="cpu", help="cpu | cuda")
    args = parser.parse_args()
    device = args.device
    x = torch.randn(args.tokens, args.width, device=device, requires_grad=True)
    grad = torch.randn_like(x)
    best = {}
    for _ in range(args.repeat + 1):
        for name, activation in (("autograd through the formula (reference)", formula),
                                 ("igpt (one-pass backward)", quick_gelu)):
            x.grad = None
            synchronize(device)
            start = time.perf_counter()
            activation(x).backward(grad)
            synchronize(device)
            best[name] = min(best.get(name, float("inf")), time.perf_counter() - start)
    bandwidth = read_bandwidth(x.nbytes, device)
    floor = 6 * x.nbytes / bandwidth
    print(f"{machine(device)}; quick GELU forward + backward over ({args.tokens}, {args.width}) fp32, best of "
          f"{args.repeat}; read bandwidth at {x.nbytes / 2**20:.0f} MiB: {bandwidth / 1e9:.1f} GB/s, floor "
          f"{floor * 1e3:.2f} ms")
    reference = best["autograd through the formula (reference)"]
    for name, seconds in best.items():
        print(f"  {name:42s} {seconds * 1e3:8.2f} ms  {reference / seconds:5.2f}x  {floor / seconds:6.1%} of floor")


if __name__ == "__main__":
    main()
