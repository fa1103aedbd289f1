"""Probe throughput: feature extraction and the logistic-regression fits, against the references.

    python bench/bench_probe.py [--model mini] [--side 16] [--images 512] [--batch-size N] [--train 5000]

Features: igpt.probe.extract_features (every layer from one pass) against Hugging Face's
ImageGPTModel with output_hidden_states=True, whose hidden states then go through each
block's ln_1 (and ln_f for the last) and a mean over positions to give the same
features (docs/reference.md §6.1); the two are checked to agree. Each side's rate is also given as a fraction of the
matmul peak measured in the same run (forward FLOPs: a third of common.pattern_train_flops_per_token).

Fits: the whole L2 grid (igpt.probe.L2_GRID, strongest first) on both sides, each fit
warm-started from the previous strength's solution as igpt's probe sweeps it: igpt's float64
L-BFGS against scikit-learn's LogisticRegression(solver="lbfgs", warm_start=True). Both
minimise mean cross-entropy + l2/2 |W|^2 (C = 1 / (l2 n)), stop at the same gradient
tolerance and iteration cap, and start the first fit from zero, so they solve the same
sequence of problems from the same starting points; the largest gap between their objectives
is printed to show it.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from common import (autocast, best_of, exported_to_hf, hf_input_ids, machine, matmul_peak,
                    pattern_train_flops_per_token, precisions)
from igpt.model import ImageGPT, ImageGPTConfig
from igpt.probe import L2_GRID, LogisticRegression, Standardizer, extract_features, feature_batch_size

GRADIENT_TOLERANCE = 1e-5  # igpt's L-BFGS stops at max |gradient| below this; scikit-learn's tol tests the same
MAX_ITER = 300  # igpt.probe.LogisticRegression's default cap


@torch.no_grad()
def hf_features(hf, tokens: np.ndarray, sos: int, batch_size: int, precision: str) -> dict[int, np.ndarray]:
    out: dict[int, list] = {}
    n_layer = len(hf.h)
    for start in range(0, len(tokens), batch_size):
        ids = hf_input_ids(torch.from_numpy(tokens[start : start + batch_size].astype(np.int64)), sos)
        with autocast("cpu", precision):
            states = hf(input_ids=ids, output_hidden_states=True).hidden_states
            for layer in range(n_layer + 1):
                norm = hf.h[layer].ln_1 if layer < n_layer else (lambda h: h)  # last state is ln_f's output
                out.setdefault(layer, []).append(norm(states[layer]).mean(1).float().numpy())
    return {layer: np.concatenate(parts) for layer, parts in out.items()}


def objective(weight: np.ndarray, bias: np.ndarray, x: np.ndarray, y: np.ndarray, l2: float) -> float:
    """Mean cross-entropy + l2/2 |W|^2: what both sides minimise, weight laid out (features, classes)."""
    logits = x @ weight + bias
    logits -= logits.max(1, keepdims=True)
    log_probs = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    return float(-log_probs[np.arange(len(y)), y].mean() + 0.5 * l2 * (weight * weight).sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mini")
    parser.add_argument("--side", type=int, default=16)
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=None, help="images per pass on both sides "
                        "(default: igpt's, igpt.probe.feature_batch_size)")
    parser.add_argument("--train", type=int, default=5000, help="samples for the logistic-regression fits")
    args = parser.parse_args()
    from sklearn.linear_model import LogisticRegression as SkLogisticRegression

    torch.manual_seed(0)
    model = ImageGPT(ImageGPTConfig.from_preset(args.model, vocab_size=512, n_ctx=args.side**2)).eval()
    args.batch_size = args.batch_size or feature_batch_size(model.config.n_ctx, torch.device("cpu"))
    hf = exported_to_hf(model, "ImageGPTModel")
    sos = model.config.vocab_size
    tokens = np.random.default_rng(0).integers(0, 512, (args.images, args.side**2)).astype(np.uint16)
    layers = list(range(model.config.n_layer + 1))
    print(f"machine: {machine()}")
    print(f"features: model {args.model} ({model.config.n_layer} layers, width {model.config.n_embd}), "
          f"{args.side}x{args.side}, {args.images} images, batch {args.batch_size}, all {len(layers)} layers")
    ours_features = extract_features(model, tokens, layers, batch_size=args.batch_size)
    theirs = hf_features(hf, tokens, sos, args.batch_size, "fp32")
    worst = max(float(np.abs(ours_features[l] - theirs[l]).max()) for l in layers)
    print(f"  features agree with Hugging Face's to {worst:.1e} (max abs difference, fp32)")
    rows = {}
    for precision in precisions():
        seconds = best_of({
            "igpt": lambda: extract_features(model, tokens, layers, batch_size=args.batch_size, precision=precision),
            "hugging face": lambda: hf_features(hf, tokens, sos, args.batch_size, precision),
        })
        rows.update({(who, precision): s for who, s in seconds.items()})
    peaks = {precision: matmul_peak({"fp32": torch.float32, "bf16": torch.bfloat16}[precision])
             for precision in {p for _, p in rows}}
    forward_flops = pattern_train_flops_per_token(model.config) / 3 * model.config.n_ctx  # per image, no head
    for (who, precision), seconds in rows.items():
        print(f"  {who:13s} {precision}: {args.images / seconds:8.1f} images/s, "
              f"{forward_flops * args.images / seconds / peaks[precision]:.0%} of the {precision} matmul peak")
    print(f"  ({forward_flops / 1e6:.0f} MFLOP per image; matmul peaks measured in this run: "
          + ", ".join(f"{p} {v / 1e9:.0f} GFLOP/s" for p, v in peaks.items()) + ")")
    best_ours = min(v for (who, _), v in rows.items() if who == "igpt")
    best_hf = min(v for (who, _), v in rows.items() if who != "igpt")
    print(f"  ratio best vs best: {best_hf / best_ours:.2f}x")

    rng = np.random.default_rng(1)
    classes, d = 10, model.config.n_embd
    centres = rng.normal(0, 1, (classes, d))
    y = rng.integers(0, classes, args.train)
    x = (centres[y] * 0.3 + rng.normal(0, 1, (args.train, d))).astype(np.float32)
    scale = Standardizer.fit(x)
    xs, yt = scale(x), torch.as_tensor(y)
    x64 = xs.numpy()
    print(f"logistic regression: {args.train} samples x {d} features, {classes} classes, {len(L2_GRID)} L2 strengths, "
          f"each fit warm-started from the last on both sides")
    solutions: dict[str, list] = {}

    def ours():
        previous, found = None, []
        for l2 in L2_GRID:
            previous = LogisticRegression(l2, max_iter=MAX_ITER).fit(xs, yt, classes, init=previous)
            found.append((previous.weight.numpy(), previous.bias.numpy()))
        solutions["igpt"] = found

    def sklearn():
        classifier, found = SkLogisticRegression(max_iter=MAX_ITER, tol=GRADIENT_TOLERANCE, warm_start=True), []
        for l2 in L2_GRID:
            classifier.set_params(C=1 / (l2 * args.train)).fit(x64, y)
            found.append((classifier.coef_.T.copy(), classifier.intercept_.copy()))
        solutions["sklearn"] = found

    seconds = best_of({"ours": ours, "sklearn": sklearn}, 2)
    t_ours, t_sk = seconds["ours"], seconds["sklearn"]
    gaps = [objective(*solutions["igpt"][i], x64, y, l2) - objective(*solutions["sklearn"][i], x64, y, l2)
            for i, l2 in enumerate(L2_GRID)]
    worst_gap = max(gaps, key=abs)
    print(f"  igpt L-BFGS, warm-started grid:          {t_ours:6.2f} s")
    print(f"  scikit-learn LogisticRegression, same:   {t_sk:6.2f} s")
    print(f"  ratio: {t_sk / t_ours:.2f}x; objectives agree to {abs(worst_gap):.1e} "
          f"(largest igpt - scikit-learn gap over the grid: {worst_gap:+.1e})")


if __name__ == "__main__":
    main()
