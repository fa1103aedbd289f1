"""Forward + backward throughput: igpt against Hugging Face's ImageGPT, same configuration.

    python bench/bench_model.py [--layers 8] [--width 256] [--heads 8] [--side 32] [--batch 8] [--rounds 6]
                                [--device cpu|cuda] [--no-compile] [--json PATH]

Each implementation runs in fp32, under bf16 autocast, and bf16 + torch.compile (Hugging Face with
dropout 0: its fastest training setting); where bf16 is emulated, in fp32 and fp32 + compile. The
modes are timed in interleaved rounds of one step and each keeps its fastest, so another process
that is busy now and then costs nothing. The ratio compares best against best, and igpt against
Hugging Face in each precision. Every rate is also a fraction of its own precision's matmul peak
(a bf16 rate of the bf16 peak, an fp32 rate of the fp32 peak), both measured in the same run, best
of three (model FLOPs: 6 N + 12 L T d per token).
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.nn.functional as F

from common import (add_device_options, autocast, best_of, hf_input_ids, hf_model, machine, matmul_peaks,
                    mode_precision, model_train_flops_per_token, of_peak, peaks_line, precisions, synchronize,
                    write_training_json)
from igpt.model import ImageGPT, ImageGPTConfig


def modes(device: str, compiled: bool = True) -> list[tuple[str, bool]]:
    """fp32, then bf16 and bf16 + compile where bf16 is native; fp32 + compile where it is not.

    Without `compiled`, the eager modes alone.
    """
    if "bf16" in precisions(device):
        timed = [("fp32", False), ("bf16", False), ("bf16", True)]
    else:
        timed = [("fp32", False), ("fp32", True)]
    return [(precision, compile_it) for precision, compile_it in timed if compiled or not compile_it]


def igpt_forward(config: ImageGPTConfig, compiled: bool, device: str):
    model = ImageGPT(config).to(device)
    return torch.compile(model) if compiled else model


def hf_forward(config: ImageGPTConfig, compiled: bool, device: str):
    """Hugging Face's model behind igpt's interface: tokens in, logits out."""
    model = hf_model(config, device)
    model = torch.compile(model) if compiled else model
    return lambda tokens: model(input_ids=hf_input_ids(tokens, config.vocab_size)).logits


def training_step(forward, tokens: torch.Tensor, precision: str):
    def step():
        with autocast(tokens.device.type, precision):
            loss = F.cross_entropy(forward(tokens).float().flatten(0, 1), tokens.flatten())
        loss.backward()
        synchronize(tokens.device)

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--side", type=int, default=32)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=6, help="interleaved timing rounds (each mode keeps its best)")
    add_device_options(parser, no_compile_help="time the eager modes only (torch.compile takes tens of seconds)")
    args = parser.parse_args()
    torch.manual_seed(0)
    config = ImageGPTConfig(vocab_size=args.vocab, n_ctx=args.side**2, n_embd=args.width, n_layer=args.layers,
                            n_head=args.heads)
    tokens = torch.randint(0, config.vocab_size, (args.batch, config.n_ctx), device=args.device)
    print(f"machine: {machine(args.device)}; load average {os.getloadavg()[0]:.2f} at the start")
    print(f"config: {args.layers} layers, width {args.width}, {args.heads} heads, {args.side}x{args.side}, batch {args.batch}")
    steps, timed_modes = {}, modes(args.device, args.compile)
    for name, make in (("igpt", igpt_forward), ("hugging face", hf_forward)):
        for precision, compiled in timed_modes:
            step = training_step(make(config, compiled, args.device), tokens, precision)
            for _ in range(2):  # compiles and warms up; fails here rather than mid-measurement
                step()
            steps[name, precision + (" + compile" if compiled else "")] = step
    best = best_of(steps, args.rounds)
    rates = {key: tokens.numel() / seconds for key, seconds in best.items()}
    peaks = matmul_peaks(dict.fromkeys(precision for precision, _ in timed_modes), args.device)  # best of three
    flops = model_train_flops_per_token(config)
    print(f"  {peaks_line(peaks)}; {flops / 1e6:.1f} MFLOP/token")
    for (name, mode), rate in rates.items():
        print(f"  {name:13s} {mode:15s}: {rate:10,.0f} tokens/s  ({best[name, mode] * 1000:7.1f} ms/step)  "
              f"{of_peak(rate, flops, peaks, mode_precision(mode)):5.1%} of the {mode_precision(mode)} peak")
    for precision in peaks:
        ours, theirs = (max(v for (n, m), v in rates.items() if n == name and mode_precision(m) == precision)
                        for name in ("igpt", "hugging face"))
        print(f"  {precision}: best igpt / best Hugging Face {ours / theirs:.2f}x")
    best_key, hf_key = (max((key for key in rates if key[0] == name), key=rates.get)
                        for name in ("igpt", "hugging face"))
    ours, theirs = rates[best_key], rates[hf_key]
    theirs_eager = max(v for (n, m), v in rates.items() if n == "hugging face" and "compile" not in m)
    print(f"  best igpt ({best_key[1]}) / best Hugging Face ({hf_key[1]}): {ours / theirs:.2f}x (goal >= 3x); "
          f"/ best eager Hugging Face: {ours / theirs_eager:.2f}x")
    hf_precision = mode_precision(hf_key[1])
    print(f"  3x Hugging Face would be {3 * theirs:,.0f} tokens/s = "
          f"{of_peak(3 * theirs, flops, peaks, hf_precision):.0%} of the {hf_precision} peak; "
          f"load average {os.getloadavg()[0]:.2f} at the end")
    write_training_json(args.json, "bench_model", args.device, "forward+backward", config, best_key, ours / theirs,
                        f"{best_key[1]}; {args.layers}x{args.width}, {args.side}x{args.side}, batch {args.batch}",
                        rates, peaks)


if __name__ == "__main__":
    main()
