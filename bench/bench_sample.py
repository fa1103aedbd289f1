"""Sampling throughput: igpt's static KV cache against Hugging Face generate() and uncached sampling.

    python bench/bench_sample.py [--model tiny] [--side 32] [--batches 8 64] [--device cpu|cuda] [--no-compile]
                                 [--json PATH]

The same random weights run in both (exported through igpt.hf.to_hf). Uncached sampling
(one full forward pass per pixel, as the released code does) is timed over the first
`--uncached-pixels` pixels only, since its cost grows with the square of the image.
"""

from __future__ import annotations

import argparse
import time

import torch

from common import (add_device_options, best_of, exported_to_hf, hf_input_ids, machine, result_row, synchronize,
                    write_json)
from igpt.model import ImageGPT, ImageGPTConfig
from igpt.sample import sample


@torch.no_grad()
def uncached(model: ImageGPT, batch: int, pixels: int) -> None:
    tokens = torch.zeros(batch, pixels, dtype=torch.long, device=model.wte.weight.device)
    for i in range(pixels):
        probs = model(tokens[:, : i + 1])[:, i].softmax(-1)
        tokens[:, i] = torch.multinomial(probs, 1).squeeze(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--side", type=int, default=32)
    parser.add_argument("--batches", type=int, nargs="+", default=[8, 64])
    parser.add_argument("--uncached-pixels", type=int, default=128)
    parser.add_argument("--repeat", type=int, default=3, help="runs per contender, taken in turns; the fastest counts")
    add_device_options(parser, no_compile_help="leave out the compiled decoding step (torch.compile takes tens "
                       "of seconds)")
    args = parser.parse_args()
    torch.manual_seed(0)
    n_ctx = args.side**2
    device = torch.device(args.device)
    model = ImageGPT(ImageGPTConfig.from_preset(args.model, vocab_size=512, n_ctx=n_ctx)).eval()
    with torch.no_grad():
        model.head.weight.normal_(0, 0.02)  # a zero head would make every pixel uniform noise
    hf = exported_to_hf(model).to(device)
    model.to(device)
    print(f"machine: {machine(args.device)}")
    print(f"model {args.model} ({model.config.n_layer} layers, width {model.config.n_embd}), {args.side}x{args.side}")
    rows = []
    for batch in args.batches:
        if args.compile:
            compile_start = time.perf_counter()  # one graph per batch size: compile it outside the timings
            sample(model, batch, torch.zeros(n_ctx - 2, dtype=torch.long), compile=True)
            synchronize(device)
            seconds = time.perf_counter() - compile_start
            print(f"  torch.compile of the decoding step for batch {batch}: {seconds:.1f} s")
        start = hf_input_ids(torch.zeros(batch, 1, dtype=torch.long, device=device), model.config.vocab_size)
        pixels = min(args.uncached_pixels, n_ctx)

        def synced(fn):
            return lambda: (fn(), synchronize(device))

        contenders = {"eager": synced(lambda: sample(model, batch, generator=torch.Generator(device).manual_seed(0)))}
        if args.compile:
            contenders["compiled"] = synced(lambda: sample(model, batch, compile=True,
                                                           generator=torch.Generator(device).manual_seed(0)))
        contenders["hf"] = synced(lambda: hf.generate(input_ids=start, max_length=n_ctx + 1, do_sample=True, top_k=0,
                                                      use_cache=True, pad_token_id=0))
        contenders["uncached"] = synced(lambda: uncached(model, batch, pixels))
        best = best_of(contenders, args.repeat)
        ours_mode = min((mode for mode in ("eager", "compiled") if mode in best), key=best.get)
        ours, theirs = best[ours_mode], best["hf"]
        tokens = batch * n_ctx
        compiled = f", compiled {tokens / best['compiled']:9,.0f} tokens/s" if args.compile else ""
        print(f"  batch {batch:3d}: igpt eager {tokens / best['eager']:9,.0f} tokens/s{compiled} "
              f"({batch / ours:6.2f} images/s) | "
              f"HF generate {tokens / theirs:8,.0f} tokens/s ({batch / theirs:5.2f} images/s) "
              f"-> {theirs / ours:.1f}x | "
              f"uncached, first {pixels} pixels {batch * pixels / best['uncached']:8,.0f} tokens/s")
        rows.append(result_row(f"sampling, batch {batch}", tokens_per_s=tokens / ours, images_per_s=batch / ours,
                               vs_hugging_face=theirs / ours,
                               notes=f"{ours_mode}; {args.model}, {args.side}x{args.side}"))
    write_json(args.json, "bench_sample", args.device, rows)


if __name__ == "__main__":
    main()
