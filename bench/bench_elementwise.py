"""The block's memory-bound layers, forward + backward: igpt's own backwards against PyTorch's.

    python bench/bench_elementwise.py [--tokens 4096] [--width 128] [--repeat 20] [--device cpu|cuda]
                                      [--precisions fp32 bf16]

- Quick GELU: `igpt.ops.quick_gelu` trains through `QuickGELUFunction`, whose backward is
  PyTorch's fused `silu_backward` at z = 1.702 x (the same derivative); the reference is
  x * sigmoid(1.702 x) differentiated by autograd, five element-wise passes in the backward.
  It runs on the MLP's hidden layer, (tokens, 4 x width), which is bf16 under bf16 autocast (the
  output of a matrix product), so it is timed in each precision.
- RMS norm: `igpt.ops.RMSNorm` trains through `RMSNormFunction`, whose backward keeps the
  normalised input and makes about half the passes of PyTorch's composite; the reference is
  `torch.nn.RMSNorm`. It runs on the residual stream, (tokens, width), which stays float32 under
  autocast (the weights and the sums into the stream are float32), so it is timed in fp32 only.

Defaults: `tiny` at 16x16 and batch 16, or 64x64 and batch 1 (4,096 tokens x 128). Each pair runs
in turns, best of --repeat. These layers are memory-bound, so the machine's limit is a bandwidth
floor: the tensors any forward and backward must touch (quick GELU: read x, write the output, keep
one tensor, then read the gradient and the kept tensor, write the input's gradient: 6; RMS norm:
the same 6, the weight and per-row scales being small), read at the bandwidth measured in the same
run for a working set of that size. "of floor" is the floor's time over the measured time.
"""

from __future__ import annotations

import argparse

import torch

from common import DTYPES, add_precisions_option, best_of, machine, read_bandwidth, synchronize, timed_precisions
from igpt.ops import QUICK_GELU, RMSNorm, quick_gelu


def formula(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(QUICK_GELU * x)


def best_times(contenders: dict, x: torch.Tensor, grad: torch.Tensor, repeat: int) -> dict[str, float]:
    """Seconds per forward + backward of each contender on x, the best of `repeat` in turns."""
    device = x.device.type

    def reset() -> None:
        x.grad = None
        synchronize(device)

    def run(layer) -> None:
        layer(x).backward(grad)
        synchronize(device)

    return best_of({name: lambda layer=layer: run(layer) for name, layer in contenders.items()}, repeat + 1, pause=reset)


def report(title: str, best: dict[str, float], x: torch.Tensor) -> None:
    device = x.device.type
    bandwidth = read_bandwidth(x.nbytes, device)
    floor = 6 * x.nbytes / bandwidth
    print(f"{title} over {tuple(x.shape)} {str(x.dtype).removeprefix('torch.')}; read bandwidth at {x.nbytes / 2**20:.0f} MiB: "
          f"{bandwidth / 1e9:.1f} GB/s, floor {floor * 1e3:.2f} ms")
    reference = next(iter(best.values()))
    for name, seconds in best.items():
        print(f"  {name:42s} {seconds * 1e3:8.2f} ms  {reference / seconds:5.2f}x  {floor / seconds:6.1%} of floor")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--width", type=int, default=128, help="n_embd (the MLP's hidden layer is 4 x n_embd)")
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--device", default="cpu", help="cpu | cuda")
    add_precisions_option(parser)
    args = parser.parse_args()
    device = args.device
    print(f"{machine(device)}; forward + backward, best of {args.repeat}, in turns")

    for precision in timed_precisions(args):
        hidden = torch.randn(args.tokens, 4 * args.width, device=device, dtype=DTYPES[precision], requires_grad=True)
        report("quick GELU", best_times({"autograd through the formula (reference)": formula,
                                         "igpt (one-pass backward)": quick_gelu},
                                        hidden, torch.randn_like(hidden), args.repeat), hidden)

    stream = torch.randn(args.tokens, args.width, device=device, requires_grad=True)
    ours, reference = RMSNorm(args.width, eps=1e-5).to(device), torch.nn.RMSNorm(args.width, eps=1e-5).to(device)
    report("RMS norm", best_times({"torch.nn.RMSNorm (reference)": reference, "igpt (own backward)": ours},
                                  stream, torch.randn_like(stream), args.repeat), stream)


if __name__ == "__main__":
    main()
