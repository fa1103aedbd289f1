"""Palette benchmarks: k-means fit against scikit-learn, encoding against Hugging Face.

    python bench/bench_palette.py [--pixels 1000000] [--clusters 512] [--seeds 1]

Uses CIFAR-10 from ../shared when present (random training pixels), else the bundled digits
upscaled with noise. Prints times, inertias (computed the same way for every method) and ratios.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from igpt import Palette, data
from igpt.palette import nearest_exact

CIFAR = Path(__file__).resolve().parents[1].parent / "shared" / "datasets" / "cifar10" / "cifar10-jpeg.tar.gz"


def inertia(pixels: np.ndarray, centers: np.ndarray) -> float:
    x = pixels.astype(np.float64) / 127.5 - 1.0
    assign = nearest_exact(x, centers)
    return float(((x - centers.astype(np.float64)[assign]) ** 2).sum())


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def load_images() -> tuple[np.ndarray, np.ndarray, str]:
    if CIFAR.exists():
        return data.load(str(CIFAR), "train", 32).images, data.load(str(CIFAR), "test", 32).images, "CIFAR-10"
    rng = np.random.default_rng(0)
    digits = data.load("digits", "train", 8).images
    noisy = np.clip(digits.astype(int) + rng.integers(-40, 40, digits.shape), 0, 255).astype(np.uint8)
    return noisy, noisy, "digits + noise (../shared absent)"


def bench_fit(train: np.ndarray, n_pixels: int, k: int, seeds: int) -> None:
    from sklearn.cluster import KMeans, MiniBatchKMeans

    rng = np.random.default_rng(0)
    flat = train.reshape(-1, 3)
    pixels = flat[rng.choice(len(flat), min(n_pixels, len(flat)), replace=False)]
    x = pixels.astype(np.float32) / 127.5 - 1.0
    print(f"\nk-means fit: {len(pixels):,} pixels, K={k}, torch threads {torch.get_num_threads()}")
    rows = []
    for seed in range(seeds):
        km, t = timed(lambda: KMeans(k, n_init=1, random_state=seed).fit(x))
        rows.append((f"sklearn KMeans(n_init=1) seed {seed}", t, inertia(pixels, km.cluster_centers_)))
        mb, t = timed(lambda: MiniBatchKMeans(k, n_init=1, random_state=seed).fit(x))
        rows.append((f"sklearn MiniBatchKMeans seed {seed}", t, inertia(pixels, mb.cluster_centers_)))
        ours, t = timed(lambda: Palette.fit(pixels, k, max_pixels=len(pixels), seed=seed, device="cpu"))
        rows.append((f"igpt Palette.fit seed {seed}", t, inertia(pixels, ours.centers)))
    for name, t, value in rows:
        print(f"  {name:38s} {t:8.2f} s   inertia {value:10.2f}")
    mean = {m: np.mean([(t, v) for n, t, v in rows if n.startswith(m)], axis=0) for m in ("sklearn KMeans", "igpt")}
    speed = mean["sklearn KMeans"][0] / mean["igpt"][0]
    quality = mean["igpt"][1] / mean["sklearn KMeans"][1]
    print(f"  igpt vs KMeans: {speed:.1f}x faster, inertia ratio {quality:.4f} (goal: >= 5x, <= 1.0)")


def bench_encode(test: np.ndarray, train: np.ndarray, k: int) -> None:
    from transformers import ImageGPTImageProcessor

    palette = Palette(np.random.default_rng(0).uniform(-1, 1, (k, 3)).astype(np.float32))
    images = np.ascontiguousarray(test[:1000])
    processor = ImageGPTImageProcessor(clusters=palette.centers, do_resize=False)
    processor([images[0]], return_tensors="np")
    theirs, t_hf = timed(lambda: processor(list(images), return_tensors="np")["input_ids"])
    _, t_cold = timed(lambda: palette.encode(images))
    ours, t_warm = timed(lambda: palette.encode(images))
    agree = (np.stack(theirs) == ours).mean()
    print(f"\nencode {len(images)} images {images.shape[1]}x{images.shape[2]}, K={k}:")
    print(f"  Hugging Face ImageGPTImageProcessor {len(images) / t_hf:12,.0f} images/s")
    print(f"  igpt Palette.encode, cold table     {len(images) / t_cold:12,.0f} images/s  ({t_hf / t_cold:.0f}x)")
    print(f"  igpt Palette.encode, warm table     {len(images) / t_warm:12,.0f} images/s  ({t_hf / t_warm:.0f}x)")
    print(f"  token agreement with Hugging Face: {agree:.5f} (theirs rounds |x-c|^2 in float32)")
    everything = np.concatenate([train, test])
    fresh = Palette(palette.centers)
    _, t_all = timed(lambda: fresh.encode(everything))
    print(f"  all {len(everything):,} images from a cold table: {t_all:.2f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pixels", type=int, default=1_000_000)
    parser.add_argument("--clusters", type=int, default=512)
    parser.add_argument("--seeds", type=int, default=1)
    args = parser.parse_args()
    train, test, source = load_images()
    print(f"data: {source}")
    bench_encode(test, train, args.clusters)
    bench_fit(train, args.pixels, args.clusters, args.seeds)


if __name__ == "__main__":
    main()
