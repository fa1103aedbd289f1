"""Sampling throughput: igpt's static KV cache against Hugging Face generate() and uncached sampling.

    python bench/bench_sample.py [--model tiny] [--side 32] [--batches 8 64] [--device cpu|cuda]

The same random weights run in both (exported through igpt.hf.to_hf). Uncached sampling
(one full forward pass per pixel, as the released code does) is timed over the first
`--uncached-pixels` pixels only, since its cost grows with the square of the image.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np
import torch

from common import best_of, machine, synchronize
from igpt.hf import to_hf
from igpt.model import ImageGPT, ImageGPTConfig
from igpt.palette import Palette
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
    parser.add_argument("--device", default="cpu", help="cpu | cuda")
    args = parser.parse_args()
    import transformers

    torch.manual_seed(0)
    n_ctx = args.side**2
    device = torch.device(args.device)
    model = ImageGPT(ImageGPTConfig.from_preset(args.model, vocab_size=512, n_ctx=n_ctx)).eval()
    with torch.no_grad():
        model.head.weight.normal_(0, 0.02)  # a zero head would make every pixel uniform noise
    palette = Palette(np.random.default_rng(0).uniform(-1, 1, (512, 3)).astype(np.float32))
    folder = tempfile.mkdtemp()
    to_hf(model, palette, folder)
    model.to(device)
    hf = transformers.ImageGPTForCausalImageModeling.from_pretrained(folder).to(device).eval()
    print(f"machine: {machine(args.device)}")
    print(f"model {args.model} ({model.config.n_layer} layers, width {model.config.n_embd}), {args.side}x{args.side}")
    for batch in args.batches:
        compile_start = time.perf_counter()  # one graph per batch size: compile it outside the timings
        sample(model, batch, torch.zeros(n_ctx - 2, dtype=torch.long), compile=True)
        synchronize(device)
        print(f"  torch.compile of the decoding step for batch {batch}: {time.perf_counter() - compile_start:.1f} s")
        start = torch.full((batch, 1), 512, device=device)
        pixels = min(args.uncached_pixels, n_ctx)

        def synced(fn):
            return lambda: (fn(), synchronize(device))

        best = best_of({
            "eager": synced(lambda: sample(model, batch, generator=torch.Generator(device).manual_seed(0))),
            "compiled": synced(lambda: sample(model, batch, generator=torch.Generator(device).manual_seed(0),
                                              compile=True)),
            "hf": synced(lambda: hf.generate(input_ids=start, max_length=n_ctx + 1, do_sample=True, top_k=0,
                                             use_cache=True, pad_token_id=0)),
            "uncached": synced(lambda: uncached(model, batch, pixels)),
        }, args.repeat)
        ours, theirs = min(best["eager"], best["compiled"]), best["hf"]
        tokens = batch * n_ctx
        print(f"  batch {batch:3d}: igpt eager {tokens / best['eager']:9,.0f} tokens/s, compiled "
              f"{tokens / best['compiled']:9,.0f} tokens/s ({batch / ours:6.2f} images/s) | "
              f"HF generate {tokens / theirs:8,.0f} tokens/s ({batch / theirs:5.2f} images/s) -> {theirs / ours:.1f}x | "
              f"uncached, first {pixels} pixels {batch * pixels / best['uncached']:8,.0f} tokens/s")

if __name__ == "__main__":
    main()
