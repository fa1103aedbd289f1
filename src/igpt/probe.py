"""Linear probes (docs/reference.md §6.1): how much each layer of a pretrained model knows about the labels.

Features of every requested layer come from one forward pass per batch and are written into
preallocated (N, d) matrices, so memory is bounded by the features, never the activations.
Each layer gets a multinomial logistic regression on standardised features, fitted by
full-batch L-BFGS, with its L2 strength chosen on the validation split; the chosen
classifier is then scored on the test split. The same procedure runs on raw pixels and on a
randomly initialised model of the same shape, the two baselines a probe must beat.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from igpt.errors import IgptError
from igpt.model import ImageGPT

L2_GRID = (1e-1, 3e-2, 1e-2, 3e-3, 1e-3, 3e-4, 1e-4, 3e-5, 1e-5, 1e-6)  # strongest first, each fit warm-starting the next


# ---- features ---------------------------------------------------------------------------------
def parse_layers(text: str | Iterable[int] | None, n_layer: int) -> list[int]:
    """`all` (or None) -> 0..n_layer; "0,4,8" -> [0, 4, 8]; checked against the model's depth."""
    if text is None or text == "all":
        return list(range(n_layer + 1))
    try:
        layers = sorted({int(part) for part in (text.split(",") if isinstance(text, str) else text)})
    except ValueError:
        raise IgptError(f"--layers must be 'all' or comma-separated integers, got {text!r}") from None
    if not layers or layers[0] < 0 or layers[-1] > n_layer:
        raise IgptError(f"--layers must lie in 0..{n_layer} for this {n_layer}-layer model, got {text!r}")
    return layers


@torch.no_grad()
def extract_features(
    model: ImageGPT,
    tokens: np.ndarray,
    layers: Sequence[int],
    *,
    batch_size: int = 256,
    precision: str = "fp32",
    on_batch: Callable[[int], None] | None = None,
) -> dict[int, np.ndarray]:
    """{layer: float32 (N, n_embd)} of the probe features (docs/reference.md §6.1) for every row of `tokens`, one pass per batch.

    BERT-objective models see their input unmasked, as the paper probes them.
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    n, width = len(tokens), model.config.n_embd
    out = {layer: np.empty((n, width), dtype=np.float32) for layer in layers}
    try:
        for start in range(0, n, batch_size):
            batch = torch.from_numpy(np.asarray(tokens[start : start + batch_size]).astype(np.int64)).to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
                features = model.features(batch, layers)
            for layer, values in features.items():
                out[layer][start : start + len(batch)] = values.float().cpu().numpy()
            if on_batch is not None:
                on_batch(len(batch))
    finally:
        model.train(was_training)
    return out


# ---- the classifier ---------------------------------------------------------------------------
@dataclass
class Standardizer:
    """Per-feature mean and scale of the training features; constant features keep scale 1."""

    mean: torch.Tensor
    scale: torch.Tensor

    @classmethod
    def fit(cls, x: np.ndarray) -> "Standardizer":
        t = torch.as_tensor(np.asarray(x), dtype=torch.float64)
        std = t.std(0, unbiased=False)
        return cls(t.mean(0), torch.where(std > 1e-8, std, torch.ones_like(std)))

    def __call__(self, x: np.ndarray) -> torch.Tensor:
        return (torch.as_tensor(np.asarray(x), dtype=torch.float64) - self.mean) / self.scale


class LogisticRegression:
    """Multinomial logistic regression: mean cross-entropy + l2/2 * |W|^2 (bias unpenalised).

    The same optimum as scikit-learn's LogisticRegression(C=1 / (l2 * n_samples)), found by
    full-batch L-BFGS with a strong-Wolfe line search in float64.
    """

    def __init__(self, l2: float, max_iter: int = 300):
        self.l2, self.max_iter = l2, max_iter
        self.weight: torch.Tensor | None = None
        self.bias: torch.Tensor | None = None

    def fit(self, x: torch.Tensor, y: torch.Tensor, n_classes: int,
            init: "LogisticRegression | None" = None) -> "LogisticRegression":
        d = x.shape[1]
        if init is not None and init.weight is not None:
            w, b = init.weight.clone(), init.bias.clone()
        else:
            w, b = torch.zeros(d, n_classes, dtype=x.dtype), torch.zeros(n_classes, dtype=x.dtype)
        optimizer = torch.optim.LBFGS([w, b], lr=1.0, max_iter=self.max_iter, history_size=20,
                                      tolerance_grad=1e-5, tolerance_change=1e-9, line_search_fn="strong_wolfe")
        onehot = F.one_hot(y, n_classes).to(x.dtype)
        n = len(x)

        def closure():  # loss and its gradient in closed form: no autograd graph per evaluation
            logits = torch.addmm(b, x, w)
            logp = logits.log_softmax(1)
            residual = (logp.exp() - onehot) / n
            w.grad = torch.addmm(w, x.T, residual, beta=self.l2)
            b.grad = residual.sum(0)
            return float(-(logp * onehot).sum() / n + 0.5 * self.l2 * (w * w).sum())

        optimizer.step(closure)
        self.weight, self.bias = w.detach(), b.detach()
        return self

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight + self.bias

    def accuracy(self, x: torch.Tensor, y: torch.Tensor) -> float:
        return float((self.logits(x).argmax(1) == y).double().mean())


@dataclass
class LayerProbe:
    val_acc: float
    test_acc: float
    l2: float


def probe_features(
    train: np.ndarray, y_train: np.ndarray, val: np.ndarray, y_val: np.ndarray, test: np.ndarray,
    y_test: np.ndarray, n_classes: int, grid: Sequence[float] = L2_GRID,
) -> LayerProbe:
    """Fit on train for L2 strengths along `grid`, keep the best on val, score it on test.

    The grid runs strongest first, each fit warm-started from the last, and stops once two
    weaker strengths in a row have not beaten the best: the weakest fits are the slowest.
    """
    scale = Standardizer.fit(train)
    xt, xv, xs = scale(train), scale(val), scale(test)
    yt, yv, ys = (torch.tensor(np.asarray(y), dtype=torch.int64) for y in (y_train, y_val, y_test))
    best, best_acc, previous, worse = None, -1.0, None, 0
    for l2 in grid:
        previous = LogisticRegression(l2).fit(xt, yt, n_classes, init=previous)
        acc = previous.accuracy(xv, yv)
        if acc > best_acc:
            best, best_acc, worse = previous, acc, 0
        else:
            worse += 1
            if worse == 2:  # validation accuracy is unimodal in the strength: past the peak, stop
                break
    return LayerProbe(val_acc=best_acc, test_acc=best.accuracy(xs, ys), l2=best.l2)


# ---- the whole probe --------------------------------------------------------------------------
@dataclass
class Split:
    """One labelled split: tokens (N, n_ctx), labels (N,) and the pixels (N, R, R, 3) behind them."""

    tokens: np.ndarray
    labels: np.ndarray
    pixels: np.ndarray

    @classmethod
    def of(cls, tokenset, limit: int | None = None, seed: int = 0) -> "Split":
        """A data.TokenSet as a Split; with `limit`, a seeded subset of at most `limit` images."""
        n = len(tokenset.tokens)
        if limit is None or limit >= n:
            return cls(tokenset.tokens, np.asarray(tokenset.labels), tokenset.images.images)
        rows = np.sort(np.random.default_rng(seed).permutation(n)[:limit])
        return cls(np.asarray(tokenset.tokens[rows]), np.asarray(tokenset.labels)[rows],
                   np.asarray(tokenset.images.images[rows]))


def _layer_sweep(model, splits: dict[str, Split], layers, n_classes, batch_size, precision, log, progress,
                 desc: str) -> list[dict]:
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=sum(len(s.labels) for s in splits.values()), desc=desc, unit="img", dynamic_ncols=True,
                   leave=False)
    try:
        features = {
            name: extract_features(model, split.tokens, layers, batch_size=batch_size, precision=precision,
                                   on_batch=bar.update if bar is not None else None)
            for name, split in splits.items()
        }
    finally:
        if bar is not None:
            bar.close()
    rows = []
    for layer in layers:
        result = probe_features(
            features["train"][layer], splits["train"].labels, features["val"][layer], splits["val"].labels,
            features["test"][layer], splits["test"].labels, n_classes,
        )
        rows.append({"layer": layer, "val_acc": result.val_acc, "test_acc": result.test_acc, "l2": result.l2})
        log(f"  layer {layer:3d}: val {100 * result.val_acc:5.1f}%  test {100 * result.test_acc:5.1f}%")
    return rows


def _best(rows: list[dict]) -> dict:
    return max(rows, key=lambda row: (row["val_acc"], -row["layer"]))


def linear_probe(
    model: ImageGPT,
    splits: dict[str, Split],
    *,
    n_classes: int,
    layers: Sequence[int] | None = None,
    batch_size: int = 256,
    precision: str = "fp32",
    baselines: bool = True,
    seed: int = 0,
    log: Callable[[str], None] = print,
    progress: bool = False,
) -> dict:
    """Probe every layer in `layers` (default: all) and, with `baselines`, raw pixels and a random-init model.

    `splits` maps "train", "val" and "test" to labelled Splits. The layer whose validation
    accuracy is highest is the best layer; its test accuracy is the probe's result.
    """
    missing = {"train", "val", "test"} - set(splits)
    if missing:
        raise IgptError(f"the probe needs train, val and test splits; missing {', '.join(sorted(missing))}")
    layers = parse_layers(layers, model.config.n_layer)
    log(f"probing {len(layers)} layers on {len(splits['train'].labels):,} training images")
    rows = _layer_sweep(model, splits, layers, n_classes, batch_size, precision, log, progress, "features")
    best = _best(rows)
    report = {"layers": rows, "best_layer": best["layer"], "best_test_acc": best["test_acc"], "n_classes": n_classes,
              "n_train": len(splits["train"].labels), "n_val": len(splits["val"].labels),
              "n_test": len(splits["test"].labels)}
    if baselines:
        log("baseline: raw pixels")
        flat = {name: s.pixels.reshape(len(s.pixels), -1).astype(np.float32) / 255.0 for name, s in splits.items()}
        raw = probe_features(flat["train"], splits["train"].labels, flat["val"], splits["val"].labels,
                             flat["test"], splits["test"].labels, n_classes)
        log(f"  raw pixels: val {100 * raw.val_acc:5.1f}%  test {100 * raw.test_acc:5.1f}%")
        log("baseline: randomly initialised model of the same shape")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            random_model = ImageGPT(model.config).to(next(model.parameters()).device)
        random_rows = _layer_sweep(random_model, splits, layers, n_classes, batch_size, precision, log, progress,
                                   "random-init features")
        random_best = _best(random_rows)
        report["baselines"] = {
            "raw_pixels": raw.test_acc, "raw_pixels_val": raw.val_acc,
            "random_init": random_best["test_acc"], "random_init_layer": random_best["layer"],
            "random_init_layers": random_rows, "chance": 1.0 / n_classes,
        }
    return report


def summary(report: dict) -> str:
    """A few lines for the terminal."""
    best = next(row for row in report["layers"] if row["layer"] == report["best_layer"])
    last = report["layers"][-1]
    lines = [f"best layer {best['layer']}: test accuracy {100 * best['test_acc']:.1f}% "
             f"(val {100 * best['val_acc']:.1f}%); layer {last['layer']}: {100 * last['test_acc']:.1f}%"]
    if "baselines" in report:
        b = report["baselines"]
        lines.append(f"baselines: raw pixels {100 * b['raw_pixels']:.1f}%, random-init model "
                     f"{100 * b['random_init']:.1f}% (layer {b['random_init_layer']}), chance {100 * b['chance']:.1f}%")
    return "\n".join(lines)

