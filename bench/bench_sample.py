"""Sampling throughput against its roofline floor: igpt's KV cache, Hugging Face generate() and uncached sampling.

    python bench/bench_sample.py [--model tiny] [--layers L] [--width D] [--heads H] [--side 32] [--batches 8 64]
                                 [--precisions fp32 bf16] [--repeat 3] [--uncached-pixels 128]
                                 [--device cpu|cuda] [--no-compile] [--json PATH]

Each precision times igpt's routes for the one-pixel step: `kernel` (decode_kernel.cpp, the CPU
default), `eager` (PyTorch operators from Python) and, unless --no-compile, `compiled` (the static
step under torch.compile; CUDA graphs on GPUs). The issue's shapes:
`--layers 4 --width 256 --heads 8 --side 16 --batches 8` and
`--layers 6 --width 384 --heads 8 --side 24 --batches 32` (dense attention, 1-D positions: the
architecture Hugging Face runs). The same random weights run in both (exported through igpt.hf.to_hf).
Each precision: fp32, and bf16 where the hardware runs it natively (or the --precisions given), igpt's
sampling under bf16 autocast as its commands run it (decode weights and key/value cache in bf16) and
generate() under torch.autocast. For one batch size every contender of every precision is timed in
turns, the fastest of --repeat counting. Uncached sampling (one full forward pass per pixel, as the
released code does) runs in fp32 over the first --uncached-pixels pixels only (its cost grows with the
square of the image).

The floor of a one-pixel step at batch B is max(bytes / bandwidth, FLOPs / peak). Bytes: the decode
weights read once (12 L d^2 + d x vocab) and the keys and values the step reads (2 B d per key the
position attends, in each layer), in the compute dtype (4 bytes fp32, 2 bf16). Bandwidth: the read
bandwidth (bench/common.py bandwidth_reader) at the working set the sampler holds, those weights plus the
whole cache, the best of ten reads before the contenders run and one in each of their turns (a host's
other guests take a share that moves by the minute). FLOPs: 2 B (12 L d^2 + d x vocab), plus 4 B d per
key attended in each layer. Peak: that precision's matmul peak, for each batch size the best of the
measurement before the contenders (bench/common.py matmul_peaks: the best of three means over two seconds)
and one 2048^2 product in each of the batch's turns, as the bandwidth is taken. A sample's
floor is the sum over its positions; "of floor" is that floor's time over the measured time. The floor in
turn takes each step's products (the weights' reads and their FLOPs) and its attention (the keys' and values'
reads and theirs) each at its own roofline, one after the other, as a step that runs them in turn can at best:
"of it" says how near the kernel comes to its own design, "of floor" how near to the machine.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from common import (DTYPES, add_device_options, add_precisions_option, attended_keys, autocast, bandwidth_reader,
                    best_of, decode_weight_count, exported_to_hf, hf_input_ids, machine, matmul_call, matmul_peaks,
                    peaks_line, result_row, step_bytes, synchronize, timed_precisions, write_json)
from igpt.attention import layer_pattern
from igpt.model import ImageGPT, ImageGPTConfig
from igpt.sample import sample

MiB = 2**20
ROUTES = ("kernel", "eager", "compiled")  # igpt's one-pixel steps; igpt/HF and "of floor" take the fastest
HEADER = """  tokens/s; floor: the roofline's rate; of floor: the measured rate / the floor's; in turn: the floor's rate
  with the products and the attention one after the other, each at its own roofline (of it: the measured rate /
  its); MiB/step and GB/s: an average step's reads and the bandwidth at the sampler's working set; mem: the share
  of steps their reads bound; kernel, eager, compiled: igpt's routes for the one-pixel step
  batch  prec  {routes}  HF generate  igpt/HF      floor  of floor    in turn  of it  MiB/step    GB/s   mem"""


@torch.no_grad()
def uncached(model: ImageGPT, batch: int, pixels: int) -> None:
    tokens = torch.zeros(batch, pixels, dtype=torch.long, device=model.wte.weight.device)
    for i in range(pixels):
        probs = model(tokens[:, : i + 1])[:, i].softmax(-1)
        tokens[:, i] = torch.multinomial(probs, 1).squeeze(1)


def step_costs(config: ImageGPTConfig, batch: int, element: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Bytes read and FLOPs of the one-pixel step at each position, for each of its parts: the products (the decode
    weights read once) and the attention (the keys and values each layer's pattern attends at that position, for
    every row of the batch)."""
    keys = attended_keys(config).sum(0)  # over the layers
    reads, weights = step_bytes(config, batch, element, keys), decode_weight_count(config)
    return {"products": (np.full(reads.shape, float(weights * element)), np.full(reads.shape, 2.0 * batch * weights)),
            "attention": (reads - weights * element, 4.0 * batch * config.n_embd * keys)}


def working_set(config: ImageGPTConfig, batch: int, element: int) -> int:
    """Bytes the sampler holds: the decode weights and the whole key/value cache (what each layer's pattern keeps)."""
    slots = sum(layer_pattern(config, layer).slots(config.n_ctx) for layer in range(config.n_layer))
    return (decode_weight_count(config) + 2 * batch * config.n_embd * slots) * element


def floor(config: ImageGPTConfig, batch: int, precision: str, peak: float, bandwidth: float) -> dict:
    """Seconds a whole sample of `batch` images takes at the roofline: each step at the slower of its reads (at
    `bandwidth`, bytes/s) and its FLOPs, summed over the positions. Also the floor in turn: the products, then the
    attention, each at the slower of its own reads and FLOPs, as a step that runs them one after the other (as
    decode_kernel.cpp does, a barrier apart) can at best; the floor proper overlaps the one with the other."""
    element = DTYPES[precision].itemsize
    parts = step_costs(config, batch, element)
    reads, flops = (parts["products"][i] + parts["attention"][i] for i in (0, 1))
    memory_bound = reads / bandwidth >= flops / peak
    in_turn = sum(np.maximum(part_reads / bandwidth, part_flops / peak) for part_reads, part_flops in parts.values())
    return {"floor_seconds": float(np.maximum(reads / bandwidth, flops / peak).sum()),
            "in_turn_floor_seconds": float(in_turn.sum()), "bandwidth": bandwidth, "peak": peak,
            "working_set_bytes": working_set(config, batch, element), "bytes_per_step": float(reads.mean()),
            "flops_per_step": float(flops.mean()), "memory_bound_steps": float(memory_bound.mean())}


def model_config(args) -> ImageGPTConfig:
    """--model's preset, its shape overridden by --layers/--width/--heads, at --side (dense, 1-D: Hugging Face's)."""
    shape = {field: value for field, value in (("n_layer", args.layers), ("n_embd", args.width),
                                               ("n_head", args.heads)) if value is not None}
    return ImageGPTConfig.from_preset(args.model, vocab_size=512, n_ctx=args.side**2, **shape)


def contenders(model: ImageGPT, hf, batch: int, modes: tuple[str, ...], compiled: bool, pixels: int,
               device: torch.device) -> dict:
    """Every timed call of one batch size, keyed (precision, who), each warmed up (and compiled) once here."""
    n_ctx, vocab = model.config.n_ctx, model.config.vocab_size
    start = hf_input_ids(torch.zeros(batch, 1, dtype=torch.long, device=device), vocab)

    def igpt(compile_it: bool, prefix=None, kernel: bool = False):
        return lambda: sample(model, batch, prefix, compile=compile_it, kernel=kernel,
                              generator=torch.Generator(device).manual_seed(0))

    def hf_generate(length: int):
        return lambda: hf.generate(input_ids=start, max_length=length, do_sample=True, top_k=0, use_cache=True,
                                   pad_token_id=0)

    def timed(precision: str, work, warm=None):
        def call():
            with autocast(device.type, precision):
                work()
            synchronize(device)

        if warm is not None:
            with autocast(device.type, precision):
                warm()
        return call

    calls = {}
    for precision in modes:
        near_end = torch.zeros(n_ctx - 2, dtype=torch.long)  # a prefix pass and two steps: builds what the run uses
        if device.type == "cpu":
            calls[precision, "kernel"] = timed(precision, igpt(False, kernel=True), igpt(False, near_end, kernel=True))
        calls[precision, "eager"] = timed(precision, igpt(False), igpt(False, near_end))
        if compiled:
            compile_start = time.perf_counter()
            calls[precision, "compiled"] = timed(precision, igpt(True), igpt(True, near_end))
            print(f"  torch.compile of the decoding step, batch {batch}, {precision}: "
                  f"{time.perf_counter() - compile_start:.1f} s")
        calls[precision, "hf"] = timed(precision, hf_generate(n_ctx + 1), hf_generate(3))
    calls["fp32", "uncached"] = timed("fp32", lambda: uncached(model, batch, pixels))
    return calls


def bandwidths(config: ImageGPTConfig, batch: int, modes: tuple[str, ...], device: str) -> tuple[dict, dict]:
    """Per precision, the read bandwidth at the sampler's working set measured now (the best of ten reads), and a
    call that reads it once more in the contenders' turns, with the bytes that call reads."""
    now, readers = {}, {}
    for precision in modes:
        held = working_set(config, batch, DTYPES[precision].itemsize)
        read, amount = readers[precision] = bandwidth_reader(held, device)
        now[precision] = amount / best_of({"read": read}, 10)["read"]
    return now, readers


def report(config: ImageGPTConfig, batch: int, precision: str, best: dict, bound: dict, notes: str) -> dict:
    """Print one batch size's line in one precision; return its JSON row."""
    tokens = batch * config.n_ctx
    modes = [mode for mode in ROUTES if (precision, mode) in best]
    ours_mode = min(modes, key=lambda mode: best[precision, mode])
    ours, theirs = best[precision, ours_mode], best[precision, "hf"]
    of_floor, of_in_turn = bound["floor_seconds"] / ours, bound["in_turn_floor_seconds"] / ours
    rates = "  ".join(f"{tokens / best[precision, mode]:10,.0f}" for mode in modes)
    print(f"  {batch:5d}  {precision:4s}  {rates}  {tokens / theirs:11,.0f}  {theirs / ours:6.2f}x  "
          f"{tokens / bound['floor_seconds']:9,.0f}  {of_floor:8.0%}  {tokens / bound['in_turn_floor_seconds']:9,.0f}"
          f"  {of_in_turn:5.0%}  {bound['bytes_per_step'] / MiB:8.1f}  "
          f"{bound['bandwidth'] / 1e9:6.1f}  {bound['memory_bound_steps']:4.0%}")
    row = result_row(f"sampling, batch {batch}, {precision}", tokens_per_s=tokens / ours, images_per_s=batch / ours,
                     vs_hugging_face=theirs / ours, notes=f"{ours_mode}; {notes}; {of_floor:.0%} of the floor")
    row.update(precision=precision, of_floor=of_floor, of_in_turn_floor=of_in_turn, hf_tokens_per_s=tokens / theirs,
               **{f"{mode}_tokens_per_s": tokens / best[precision, mode] for mode in modes}, **bound)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny", help="a preset; --layers, --width and --heads override its shape")
    parser.add_argument("--layers", type=int, default=None)
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--heads", type=int, default=None)
    parser.add_argument("--side", type=int, default=32)
    parser.add_argument("--batches", type=int, nargs="+", default=[8, 64])
    parser.add_argument("--uncached-pixels", type=int, default=128)
    parser.add_argument("--repeat", type=int, default=3, help="runs per contender, taken in turns; the fastest counts")
    add_precisions_option(parser)
    add_device_options(parser, no_compile_help="leave out the compiled decoding step (torch.compile takes tens "
                       "of seconds)")
    args = parser.parse_args()
    torch.manual_seed(0)
    config = model_config(args)
    device = torch.device(args.device)
    model = ImageGPT(config).eval()
    with torch.no_grad():
        model.head.weight.normal_(0, 0.02)  # a zero head would make every pixel uniform noise
    hf = exported_to_hf(model).to(device)
    model.to(device)
    modes = timed_precisions(args)
    print(f"machine: {machine(args.device)}")
    shape = f"{config.n_layer}x{config.n_embd}, {config.n_head} heads, {args.side}x{args.side}"
    print(f"model {shape} (dense, 1-D positions), vocabulary {config.vocab_size}")
    peaks = matmul_peaks(modes, args.device, repeat=min(3, args.repeat))
    print(f"  {peaks_line(peaks)} before the contenders (each row's floor takes the best of this and its turns)")
    products = {precision: matmul_call(DTYPES[precision], device=args.device) for precision in modes}
    rows = []
    for batch in args.batches:
        pixels = min(args.uncached_pixels, config.n_ctx)
        before, readers = bandwidths(config, batch, modes, args.device)
        calls = contenders(model, hf, batch, modes, args.compile, pixels, device)
        calls.update({(precision, "read"): read for precision, (read, _) in readers.items()})
        calls.update({(precision, "peak"): product for precision, (product, _) in products.items()})
        best = best_of(calls, args.repeat)
        routes = [mode for mode in ROUTES if any((precision, mode) in best for precision in modes)]
        print(HEADER.format(routes="  ".join(f"{mode:>10s}" for mode in routes)))
        for precision in modes:
            bandwidth = max(before[precision], readers[precision][1] / best[precision, "read"])
            peak = max(peaks[precision], products[precision][1] / best[precision, "peak"])
            bound = floor(config, batch, precision, peak, bandwidth)
            rows.append(report(config, batch, precision, best, bound, shape))
        print(f"  {batch:5d}  fp32  uncached, first {pixels} pixels: "
              f"{batch * pixels / best['fp32', 'uncached']:9,.0f} tokens/s")
    write_json(args.json, "bench_sample", args.device, rows, peaks=peaks)


if __name__ == "__main__":
    main()
