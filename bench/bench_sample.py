"""Sampling throughput: igpt's static KV cache against Hugging Face generate() and uncached sampling.

    python bench/bench_sample.py [--model tiny] [--side 32] [--batches 8 64]

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

from common import machine
from igpt.hf import to_hf
from igpt.model import ImageGPT, ImageGPTConfig
from igpt.palette import Palette
from igpt.sample import sample


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


@torch.no_grad()
def uncached(model: ImageGPT, batch: int, pixels: int) -> None:
    tokens = torch.zeros(batch, pixels, dtype=torch.long)
    for i in range(pixels):
        probs = model(tokens[:, : i + 1])[:, i].softmax(-1)
        tokens[:, i] = torch.multinomial(probs, 1).squeeze(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--side", type=int, default=32)
    parser.add_argument("--batches", type=int, nargs="+", default=[8, 64])
    parser.add_argument("--uncached-pixels", type=int, default=128)
    args = parser.parse_args()
    import transformers

    torch.manual_seed(0)
    n_ctx = args.side**2
    model = ImageGPT(ImageGPTConfig.from_preset(args.model, vocab_size=512, n_ctx=n_ctx)).eval()
    with torch.no_grad():
        model.head.weight.normal_(0, 0.02)  # a zero head would make every pixel uniform noise
    palette = Palette(np.random.default_rng(0).uniform(-1, 1, (512, 3)).astype(np.float32))
    folder = tempfile.mkdtemp()
    to_hf(model, palette, folder)
    hf = transformers.ImageGPTForCausalImageModeling.from_pretrained(folder).eval()
    print(f"machine: {machine()}")
    print(f"model {args.model} ({model.config.n_layer} layers, width {model.config.n_embd}), {args.side}x{args.side}")
    compile_start = time.perf_counter()
    sample(model, 1, generator=torch.Generator().manual_seed(0), compile=True)  # compile once, outside the timings
    print(f"  torch.compile of the decoding step: {time.perf_counter() - compile_start:.1f} s, once per model")
    for batch in args.batches:
        eager = timed(lambda: sample(model, batch, generator=torch.Generator().manual_seed(0)))
        compiled = timed(lambda: sample(model, batch, generator=torch.Generator().manual_seed(0), compile=True))
        ours = min(eager, compiled)
        start = torch.full((batch, 1), 512)
        theirs = timed(lambda: hf.generate(input_ids=start, max_length=n_ctx + 1, do_sample=True, top_k=0,
                                           use_cache=True, pad_token_id=0))
        pixels = min(args.uncached_pixels, n_ctx)
        slow = timed(lambda: uncached(model, batch, pixels))
        tokens = batch * n_ctx
        print(f"  batch {batch:3d}: igpt eager {tokens / eager:9,.0f} tokens/s, compiled {tokens / compiled:9,.0f} "
              f"tokens/s ({batch / ours:6.2f} images/s) | "
              f"HF generate {tokens / theirs:8,.0f} tokens/s ({batch / theirs:5.2f} images/s) -> {theirs / ours:.1f}x | "
              f"uncached, first {pixels} pixels {batch * pixels / slow:8,.0f} tokens/s")


if __name__ == "__main__":
    main()
