"""Training in fp32 and in bf16 autocast: every attention pattern and objective, and igpt against Hugging Face.

    python bench/bench_precision.py [--sides 16 32] [--batch 16 8] [--rounds 3] [--precisions fp32 bf16]
                                    [--device cpu|cuda] [--json PATH] [--quick]

Patterns: a model of 4 layers x 192 (6 heads of 32: the width docs/results/2026-11-27-cifar10-hour.md
trains), dense (1-D positions, the paper's), local and strided (2-D positions, as `igpt train` defaults
them) under the ar objective, and dense under bert (which sees every pixel, so dense only), at each of
--sides with its --batch (one batch for every side, or one per side). Each case's step is
igpt.train.train_step (forward, backward, clipping, AdamW) on random tokens; its fp32 and bf16 steps
are timed in turns, the order reversed every other round, the fastest of --rounds counting. Printed:
tokens/s, each rate's fraction of its own precision's matmul peak (model FLOPs per token: 6 N plus
12 d per key attended, bench/common.py pattern_train_flops_per_token; both peaks measured in this
run, best of three), bf16 / fp32, and the attention backend igpt chooses for each layer kind in each
precision (igpt.attention.choose_backend on queries of that dtype).

The paper's architecture (dense, 1-D positions, 6 layers x 384, 8 heads, 24x24, batch 8): igpt and
Hugging Face's ImageGPT with the same weights (exported through igpt.hf.to_hf), both through igpt's
training step, in each precision, all four in turns; igpt / Hugging Face per precision (goal in bf16:
>= 1.3x). --quick: one small case of each section (8x8), a smoke check.
"""

from __future__ import annotations

import argparse
import os

import torch

from common import (DTYPES, HuggingFaceAsIgpt, add_device_options, add_precisions_option, best_of, exported_to_hf,
                    machine, matmul_peaks, of_peak, optimizer_step, pattern_train_flops_per_token, peaks_line,
                    random_batch, result_row, seeded_model, timed_precisions, write_json)
from igpt.attention import choose_backend, layer_pattern
from igpt.model import ImageGPTConfig

PATTERN_SHAPE = dict(n_layer=4, n_embd=192, n_head=6)
PAPER_SHAPE = dict(n_layer=6, n_embd=384, n_head=8)
CASES = {  # name: objective, attention, positions
    "dense-1d ar": ("ar", "dense", "1d"),
    "local-2d ar": ("ar", "local", "2d"),
    "strided-2d ar": ("ar", "strided", "2d"),
    "dense-1d bert": ("bert", "dense", "1d"),
}
QUICK_CASE = "strided-2d ar"


def warmed(steps: dict, times: int = 2) -> dict:
    """The steps, each run `times` first: kernels built, buffers allocated, failures raised before any timing."""
    for step in steps.values():
        for _ in range(times):
            step()
    return steps


def backends(config: ImageGPTConfig, batch: int, modes: tuple[str, ...], device: str) -> str:
    """Which attention backend each distinct layer pattern runs in, per precision: the rule's choice for the training
    step's queries (grad on, in the dtype autocast gives them)."""
    shape = (batch, config.n_head, config.n_ctx, config.n_embd // config.n_head)
    queries = {precision: torch.empty(shape, dtype=DTYPES[precision], device=device) for precision in modes}
    patterns = dict.fromkeys(layer_pattern(config, layer) for layer in range(config.n_layer))
    return "; ".join(f"{pattern.kind}{'' if pattern.causal else ' (bidirectional)'}: "
                     + ", ".join(f"{precision} {choose_backend(q, pattern)}" for precision, q in queries.items())
                     for pattern in patterns)


def pattern_case(name: str, side: int, batch: int, modes: tuple[str, ...], rounds: int, peaks: dict,
                 device: str) -> list[dict]:
    """One pattern, side and batch in every precision, timed in turns; its printed line; its JSON rows."""
    objective, attention, positions = CASES[name]
    config = ImageGPTConfig(vocab_size=512, n_ctx=side**2, objective=objective, attention=attention,
                            positions=positions, **PATTERN_SHAPE)
    tokens, mask = random_batch(config, batch, device)
    steps = warmed({p: optimizer_step(seeded_model(config, device), tokens, p, mask) for p in modes})
    best = best_of(steps, rounds, alternate=True)
    flops = pattern_train_flops_per_token(config)
    rates = {p: tokens.numel() / best[p] for p in modes}
    cells = "  ".join(f"{rates[p]:10,.0f} {of_peak(rates[p], flops, peaks, p):7.1%}" for p in modes)
    ratio = f"  {rates['bf16'] / rates['fp32']:8.2f}x" if {"fp32", "bf16"} <= set(modes) else ""
    chosen = backends(config, batch, modes, device)
    print(f"  {name:14s} {side:2d}x{side:<2d} {batch:5d}  {cells}{ratio}", flush=True)
    print(f"      attention: {chosen}", flush=True)
    return [result_row(f"train {side}x{side}, {name}, {p}", tokens_per_s=rates[p], images_per_s=rates[p] / config.n_ctx,
                       mfu=of_peak(rates[p], flops, peaks, p), notes=f"batch {batch}, {p}; {chosen}") for p in modes]


def paper_section(side: int, batch: int, modes: tuple[str, ...], rounds: int, peaks: dict, device: str) -> list[dict]:
    """igpt against Hugging Face on the paper's architecture, same weights, igpt's training step, every precision."""
    config = ImageGPTConfig(vocab_size=512, n_ctx=side**2, **PAPER_SHAPE)
    tokens, _ = random_batch(config, batch, device)
    steps = {}
    for precision in modes:
        model = seeded_model(config, "cpu")  # exported from the CPU, then both moved
        hf = HuggingFaceAsIgpt(exported_to_hf(model).to(device).train(), config.vocab_size)
        steps["igpt", precision] = optimizer_step(model.to(device), tokens, precision)
        steps["hugging face", precision] = optimizer_step(hf, tokens, precision)
    best = best_of(warmed(steps), rounds, alternate=True)
    rates = {key: tokens.numel() / seconds for key, seconds in best.items()}
    flops = pattern_train_flops_per_token(config)
    print(f"\nThe paper's architecture: dense, 1-D positions, {config.n_layer} layers x {config.n_embd}, "
          f"{config.n_head} heads, {side}x{side}, batch {batch}; same weights, forward + backward + AdamW step")
    print("  precision       igpt  of peak  Hugging Face  of peak  igpt / HF")
    rows = []
    for precision in modes:
        ours, theirs = rates["igpt", precision], rates["hugging face", precision]
        goal = " (goal >= 1.3x)" if precision == "bf16" else ""
        print(f"  {precision:9s} {ours:10,.0f}  {of_peak(ours, flops, peaks, precision):7.1%}  {theirs:12,.0f}  "
              f"{of_peak(theirs, flops, peaks, precision):7.1%}  {ours / theirs:8.2f}x{goal}")
        rows.append(result_row(f"paper {side}x{side}, {precision}", tokens_per_s=ours, images_per_s=ours / config.n_ctx,
                               mfu=of_peak(ours, flops, peaks, precision), vs_hugging_face=ours / theirs,
                               notes=f"batch {batch}; Hugging Face {theirs:,.0f} tokens/s"))
    print(f"  attention: {backends(config, batch, modes, device)}")
    return rows


def sides_and_batches(args) -> list[tuple[int, int]]:
    if args.quick:
        return [(8, 4)]
    if len(args.batch) not in (1, len(args.sides)):
        raise SystemExit(f"give one --batch or one per side ({len(args.sides)}), not {len(args.batch)}")
    return list(zip(args.sides, args.batch * len(args.sides) if len(args.batch) == 1 else args.batch))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sides", type=int, nargs="+", default=[16, 32])
    parser.add_argument("--batch", type=int, nargs="+", default=[16, 8], help="one for every side, or one per side")
    parser.add_argument("--rounds", type=int, default=3, help="timing rounds in turns; each step keeps its fastest")
    parser.add_argument("--quick", action="store_true", help="one small case of each section only: a smoke check")
    add_precisions_option(parser)
    add_device_options(parser)
    args = parser.parse_args()
    settings = sides_and_batches(args)
    modes = timed_precisions(args)
    print(f"machine: {machine(args.device)}; load average {os.getloadavg()[0]:.2f} at the start")
    peaks = matmul_peaks(modes, args.device, repeat=1 if args.quick else 3)
    print(f"  {peaks_line(peaks)}")
    shape = PATTERN_SHAPE
    print(f"\nPatterns and objectives: {shape['n_layer']} layers x {shape['n_embd']}, {shape['n_head']} heads; "
          f"tokens/s in each precision and its fraction of that precision's matmul peak")
    print(f"  {'case':14s} {'side':5s} {'batch':>5s}  " + "  ".join(f"{p:>10s} {'of peak':>7s}" for p in modes)
          + ("  bf16/fp32" if {"fp32", "bf16"} <= set(modes) else ""))
    rows = []
    for side, batch in settings:
        for name in [QUICK_CASE] if args.quick else CASES:
            rows += pattern_case(name, side, batch, modes, args.rounds, peaks, args.device)
    rows += paper_section(8 if args.quick else 24, 2 if args.quick else 8, modes, args.rounds, peaks, args.device)
    print(f"load average {os.getloadavg()[0]:.2f} at the end")
    write_json(args.json, "bench_precision", args.device, rows, peaks=peaks)


if __name__ == "__main__":
    main()
