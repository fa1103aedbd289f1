"""FlexAttention block masks against igpt's blocked SDPA, per attention pattern: which is faster on this device.

    python bench/flex_attention.py --device cuda [--sides 32 64] [--batch 16] [--heads 8] [--head-dim 32]

igpt's local and strided layers run, among igpt.attention's backends, `blocked` (bands) and `sdpa`
(columns, reshaped): plain SDPA over blocked or reshaped tensors, which has a backward on every
device. On CUDA, the `flex` backend (FlexAttention, compiled, masked by the pattern's own `sees`)
can skip the masked-out blocks of a dense layout instead. This times forward + backward of the
attention alone for both backends, called directly, on the same q, k, v, checks that they agree,
and prints the ratio; dense causal SDPA (the paper's layer) is
the baseline row. FlexAttention has no backward on the CPU in torch 2.13: there the script times
the blocked kernels only (--device cpu is for checking the script itself).
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from igpt.attention import ATTENTION_BACKENDS, Pattern


def contenders(side: int, window_rows: int):
    """Each pattern with its blocked backend's call and the flex backend's, computed without the rule's choice."""
    patterns = {f"local R={window_rows}": Pattern("band", side, window_rows * side),
                "strided: row layer": Pattern("band", side, side), "strided: column layer": Pattern("column", side)}

    def call(name, pattern):
        return lambda q, k, v: ATTENTION_BACKENDS[name].compute(q, k, v, pattern)

    return {label: (call("blocked" if pattern.kind == "band" else "sdpa", pattern), call("flex", pattern))
            for label, pattern in patterns.items()}


def fwd_bwd_ms(fn, q, k, v, repeat: int) -> float:
    """Best of `repeat` forward + backward passes, in milliseconds."""
    grad = torch.randn_like(q)
    best = float("inf")
    for i in range(repeat + 2):  # two warm-ups (compilation, autotuning)
        for x in (q, k, v):
            x.grad = None
        sync(q.device)
        start = time.perf_counter()
        fn(q, k, v).backward(grad)
        sync(q.device)
        if i >= 2:
            best = min(best, (time.perf_counter() - start) * 1e3)
    return best


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--sides", type=int, nargs="+", default=[32, 64])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=32, help="32: the `mini` preset (width 256, 8 heads)")
    parser.add_argument("--window-rows", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--json", default=None, help="also write the rows as JSON")
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"{name}, torch {torch.__version__}, {dtype}, batch {args.batch}, {args.heads} heads of {args.head_dim}; "
          f"forward + backward of attention alone, best of {args.repeat}")
    print(f"  {'side':>4s}  {'pattern':22s} {'dense SDPA ms':>13s} {'blocked ms':>10s} {'flex ms':>8s} "
          f"{'flex/blocked':>12s}  {'max |diff|':>10s}  faster")
    rows = []
    for side in args.sides:
        t = side * side
        shape = (args.batch, args.heads, t, args.head_dim)
        q, k, v = (torch.randn(shape, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
        dense = fwd_bwd_ms(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True), q, k, v,
                           args.repeat)
        for pattern, (blocked, flex) in contenders(side, args.window_rows).items():
            blocked_ms = fwd_bwd_ms(blocked, q, k, v, args.repeat)
            flex_ms = diff = None
            if device.type == "cuda":
                flex_ms = fwd_bwd_ms(flex, q, k, v, args.repeat)
                with torch.no_grad():
                    diff = (flex(q, k, v).float() - blocked(q, k, v).float()).abs().max().item()
            faster = "-" if flex_ms is None else ("flex" if flex_ms < blocked_ms else "blocked")
            rows.append({"side": side, "pattern": pattern, "dense_ms": dense, "blocked_ms": blocked_ms,
                         "flex_ms": flex_ms, "max_diff": diff, "faster": faster})
            print(f"  {side:4d}  {pattern:22s} {dense:13.3f} {blocked_ms:10.3f} "
                  f"{'-' if flex_ms is None else f'{flex_ms:.3f}':>8s} "
                  f"{'-' if flex_ms is None else f'{flex_ms / blocked_ms:.2f}':>12s}  "
                  f"{'-' if diff is None else f'{diff:.1e}':>10s}  {faster}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
