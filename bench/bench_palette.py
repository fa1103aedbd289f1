"""Palette benchmarks: k-means to equal inertia against scikit-learn, encoding against Hugging Face.

    python bench/bench_palette.py [--pixels 1000000] [--clusters 512] [--seeds 1] [--sklearn-algorithm lloyd]
                                  [--repeat 3]

Uses CIFAR-10 from ../shared when present (random training pixels), else the bundled digits
upscaled with noise.

The fit compares like with like: both sides get the same distinct colours of the sampled
pixels with their counts as weights (what Palette.fit hands igpt.palette.kmeans), the same K
and a seed each, and run Lloyd iterations to strict convergence (no point changes cluster;
scikit-learn with tol=0). Their final inertias differ a little, so speed is measured at equal
inertia: the target is the worse (higher) of the two converged inertias, and each side's time
is that of its shortest run reaching it. That run's length is found by bisection on max_iter
(every run starts afresh from the same seed, so a run of m iterations is the first m
iterations of the full one), then it is timed, seeding included, as the best of --repeat
runs taken in turns with the other side's. The speed-up is the ratio of those times summed
over the seeds. Inertias are computed the same way for both: float64, exact nearest centre,
weighted by count.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from common import best_of, cifar10_or_digits
from igpt import Palette, data
from igpt.palette import kmeans, nearest_exact

MAX_ITER = 300  # Palette.fit's cap on Lloyd iterations, on both sides


def inertia(points: np.ndarray, weights: np.ndarray, centers: np.ndarray) -> float:
    assign = nearest_exact(points, centers)
    return float((weights * ((points - centers.astype(np.float64)[assign]) ** 2).sum(1)).sum())


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def load_images() -> tuple[np.ndarray, np.ndarray, str]:
    source = cifar10_or_digits()
    if source != "digits":
        return data.load(source, "train", 32).images, data.load(source, "test", 32).images, "CIFAR-10"
    rng = np.random.default_rng(0)
    digits = data.load("digits", "train", 8).images
    noisy = np.clip(digits.astype(int) + rng.integers(-40, 40, digits.shape), 0, 255).astype(np.uint8)
    return noisy, noisy, "digits + noise"


def distinct_colours(pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The distinct colours as float64 points in [-1, 1] and their counts: the weighted problem both sides solve."""
    colours, counts = np.unique(pixels.reshape(-1, 3), axis=0, return_counts=True)
    return colours.astype(np.float64) / 127.5 - 1.0, counts.astype(np.float64)


def sklearn_fit(points, weights, k: int, seed: int, algorithm: str):
    """fit(max_iter) -> (centres, iterations run) for scikit-learn's KMeans on the weighted colours."""
    from sklearn.cluster import KMeans

    x = points.astype(np.float32)  # igpt computes its distances in float32 too

    def fit(max_iter: int):
        km = KMeans(k, n_init=1, random_state=seed, max_iter=max_iter, tol=0.0, algorithm=algorithm)
        km.fit(x, sample_weight=weights)
        return km.cluster_centers_, km.n_iter_

    return fit


def igpt_fit(points, weights, k: int, seed: int):
    """fit(max_iter) -> (centres, iterations run) for igpt.palette.kmeans, as Palette.fit calls it on a CPU."""
    x, w = torch.from_numpy(points), torch.from_numpy(weights)

    def fit(max_iter: int):
        centers, _, iterations = kmeans(x, w, k, generator=torch.Generator().manual_seed(seed), max_iter=max_iter)
        return centers.numpy(), iterations

    return fit


def iterations_to_reach(fit, points, weights, target: float, converged_iterations: int) -> int:
    """The fewest iterations whose run ends at an inertia of at most `target`, by bisection on max_iter.

    Lloyd's inertia never rises from one iteration to the next, so the runs that reach the
    target are those of at least some number of iterations.
    """
    reached, not_reached = converged_iterations, 0
    while reached - not_reached > 1:
        middle = (reached + not_reached) // 2
        centers, _ = fit(middle)
        if inertia(points, weights, centers) <= target * (1 + 1e-12):
            reached = middle
        else:
            not_reached = middle
    return reached


def bench_fit(train: np.ndarray, n_pixels: int, k: int, seeds: int, algorithm: str, repeat: int) -> None:
    rng = np.random.default_rng(0)
    flat = train.reshape(-1, 3)
    pixels = flat[rng.choice(len(flat), min(n_pixels, len(flat)), replace=False)]
    points, weights = distinct_colours(pixels)
    print(f"\nk-means fit: {len(pixels):,} pixels = {len(points):,} distinct colours weighted by count (both sides), "
          f"K={k}, torch threads {torch.get_num_threads()}")
    print("  rule: both run to convergence; target = the worse of the two final inertias; each side's time is its "
          f"shortest run (fewest iterations, from the same seed) reaching the target; times: best of {repeat}")
    sklearn_name, igpt_name = f"sklearn KMeans({algorithm})", "igpt kmeans"
    seconds_to_target, quality = {sklearn_name: 0.0, igpt_name: 0.0}, []
    for seed in range(seeds):
        fits = {sklearn_name: sklearn_fit(points, weights, k, seed, algorithm),
                igpt_name: igpt_fit(points, weights, k, seed)}
        converged = {}
        for name, fit in fits.items():
            centers, iterations = fit(MAX_ITER)
            converged[name] = {"iterations": iterations, "inertia": inertia(points, weights, centers)}
        target = max(result["inertia"] for result in converged.values())
        needed = {name: iterations_to_reach(fit, points, weights, target, converged[name]["iterations"])
                  for name, fit in fits.items()}
        converged_seconds = best_of({name: lambda fit=fit: fit(MAX_ITER) for name, fit in fits.items()}, repeat)
        target_seconds = best_of({name: lambda fit=fit, n=needed[name]: fit(n) for name, fit in fits.items()}, repeat)
        print(f"  seed {seed}, target inertia {target:.2f}:")
        for name, result in converged.items():
            print(f"    {name:22s} converged: {converged_seconds[name]:7.2f} s, {result['iterations']:3d} iterations, "
                  f"inertia {result['inertia']:10.2f} | target reached: {target_seconds[name]:7.2f} s, "
                  f"{needed[name]:3d} iterations")
            seconds_to_target[name] += target_seconds[name]
        quality.append(converged[igpt_name]["inertia"] / converged[sklearn_name]["inertia"])
    speedup = seconds_to_target[sklearn_name] / seconds_to_target[igpt_name]
    print(f"  igpt vs KMeans at equal inertia: {speedup:.1f}x faster (total time over the seeds); "
          f"converged inertia ratio {np.mean(quality):.4f} (goal: >= 5x, <= 1.0)")


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
    parser.add_argument("--sklearn-algorithm", choices=("lloyd", "elkan"), default="lloyd")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per fit, taken in turns; the fastest counts")
    args = parser.parse_args()
    train, test, source = load_images()
    print(f"data: {source}")
    bench_encode(test, train, args.clusters)
    bench_fit(train, args.pixels, args.clusters, args.seeds, args.sklearn_algorithm, args.repeat)


if __name__ == "__main__":
    main()
