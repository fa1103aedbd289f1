"""Data pipeline throughput: is loading + augmenting + encoding ever what training waits for?

    python bench/bench_data.py [--batch 128]

Measures, on CIFAR-10 from ../shared (digits otherwise): building the decoded cache from the
archive, tokenising it, and per-batch augment + encode (igpt's vectorised path) against a
reference per-image pipeline (PIL crop/resize, then Hugging Face's nearest-colour search).
Compare the batches/s with a training step's rate from bench_train.py.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np

from common import cifar10_or_digits, machine, seconds_per_call
from igpt import Palette, data


def reference_batch(images: np.ndarray, out_res: int, rng: np.random.Generator, centers: np.ndarray) -> np.ndarray:
    """The usual per-image path: PIL crop + resize, then |x - c|^2 by expansion, as Hugging Face does."""
    from PIL import Image
    from transformers.models.imagegpt.image_processing_pil_imagegpt import color_quantize

    tokens = []
    for image in images:
        h, w = image.shape[:2]
        side = int(rng.integers(h // 2, h + 1))
        top, left = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
        crop = Image.fromarray(image[top : top + side, left : left + side]).resize((out_res, out_res), Image.BOX)
        x = np.asarray(crop, dtype=np.float32) / 127.5 - 1
        tokens.append(color_quantize(x, centers))
    return np.stack(tokens)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=128)
    args = parser.parse_args()
    print(f"machine: {machine()}")
    source = cifar10_or_digits()
    with tempfile.TemporaryDirectory() as cache:
        os.environ["IGPT_CACHE"] = cache
        start = time.perf_counter()
        train = data.load(source, "train", None)
        print(f"decode {train.describe()} into the cache: {time.perf_counter() - start:.1f} s")
        start = time.perf_counter()
        data.load(source, "train", None)
        print(f"reopen the cached split: {time.perf_counter() - start:.3f} s")
        palette = Palette.fit(train.images, 512, max_pixels=200_000)
        start = time.perf_counter()
        tokens = data.load_tokens(source, "train", None, palette)
        print(f"tokenise {len(tokens):,} images with a 512-colour palette: {time.perf_counter() - start:.1f} s")
        pixels = np.asarray(train.images)
        rng = np.random.default_rng(0)
        native = pixels.shape[1]
        for res in sorted({native, max(1, native // 2)}, reverse=True):
            def ours():
                idx = rng.choice(len(pixels), args.batch, replace=False)
                palette.encode(data.random_resized_crop(pixels[idx], res, rng))

            def theirs():
                idx = rng.choice(len(pixels), args.batch, replace=False)
                reference_batch(pixels[idx], res, rng, palette.centers)

            t_ours, t_ref = seconds_per_call(ours, min_time=2), seconds_per_call(theirs, min_time=2)
            print(f"augment + encode, batch {args.batch} at {res}x{res}: igpt {1 / t_ours:7.1f} batches/s, "
                  f"reference {1 / t_ref:6.1f} batches/s ({t_ref / t_ours:.1f}x)")
            fine = seconds_per_call(lambda: palette.encode(data.pad_crop_flip(pixels[:args.batch], rng)), min_time=2)
            print(f"pad-crop-flip + encode (fine-tuning), batch {args.batch}: {1 / fine:7.1f} batches/s")


if __name__ == "__main__":
    main()
