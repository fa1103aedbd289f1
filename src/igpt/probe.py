"""Linear probes (docs/reference.md §6.1): how much each layer of a pretrained model knows about the labels.

Features of every requested layer come from one forward pass per batch and are written into
preallocated (N, d) matrices, so memory is bounded by the features, never the activations.
Each layer gets a multinomial logistic regression on standardised features, fitted by
full-batch L-BFGS, with its L2 strength chosen on the validation split; the chosen
classifier is then scored on the test split. The same procedure runs on raw pixels and on a
randomly initialised model of the same shape, the two baselines a probe must beat.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from igpt.config import device_option, option, positive_int, positive_ints, seed_option
from igpt.data import SPLITS, DataConfig, labelled_splits
from igpt.errors import IgptError
from igpt.fileio import atomic_write_json
from igpt.model import ImageGPT, ImageGPTConfig
from igpt.plots import pooling_text, probe_accuracy
from igpt.precision import autocast, precision_option

L2_GRID = (1e-1, 3e-2, 1e-2, 3e-3, 1e-3, 3e-4, 1e-4, 3e-5, 1e-5, 1e-6)  # strongest first, each fit warm-starting the next
# A few hundred labelled images: below 1e-4 the fit is as good as unregularised, and the slowest to converge.
FEW_LABEL_L2_GRID = L2_GRID[:7]
# Iterations of the batched few-label fit: past this the cross-validated choice and the test accuracy move by
# well under the spread between draws, and the iterations cost the same for every problem in the batch.
FEW_LABEL_MAX_ITER = 100


# ---- features ---------------------------------------------------------------------------------
def parse_layers(text: str | Iterable[int] | None, n_layer: int, flag: str = "--layers") -> list[int]:
    """`all` (or None) -> 0..n_layer; "0,4,8" -> [0, 4, 8]; checked against the model's depth (errors name `flag`)."""
    if text is None or text == "all":
        return list(range(n_layer + 1))
    try:
        layers = sorted({int(part) for part in (text.split(",") if isinstance(text, str) else text)})
    except ValueError:
        raise IgptError(f"{flag} must be 'all' or comma-separated integers, got {text!r}") from None
    if not layers or layers[0] < 0 or layers[-1] > n_layer:
        raise IgptError(f"{flag} must lie in 0..{n_layer} for this {n_layer}-layer model, got {text!r}")
    return layers


def check_pool_grid(config: ImageGPTConfig, grid: int) -> None:
    """A probe's pooling grid must be 1 (the paper's mean over positions) or fit the square image."""
    if grid != 1 and not 1 <= grid <= config.side:
        raise IgptError(f"--pool-grid must lie in 1..{config.side} for this {config.side}x{config.side} model, "
                        f"got {grid}")


def pool_positions(x: torch.Tensor, grid: int) -> torch.Tensor:
    """(B, n, d) hidden states as float32 probe features: the mean over positions (grid 1), or the mean over
    each cell of a grid x grid partition of the square image (adaptive pooling: cells differ by at most a
    row or column when the side is not a multiple), flattened to (B, grid * grid * d). Input position i sits
    at pixel i's place: under causal attention it has seen the pixels before it."""
    if grid == 1:
        return x.mean(1).float()
    b, n, d = x.shape
    side = math.isqrt(n)
    image = x.transpose(1, 2).reshape(b, d, side, side)
    return F.adaptive_avg_pool2d(image, grid).flatten(1).float()


CPU_PIXELS_PER_PASS = 8192
GPU_IMAGES_PER_PASS = 256


def feature_batch_size(n_ctx: int, device: torch.device) -> int:
    """Images per forward pass when none is asked for. On a CPU a pass of about CPU_PIXELS_PER_PASS pixels:
    larger ones spill their activations out of the caches and into fresh pages of memory, which slows the
    pass; a GPU wants large batches."""
    return GPU_IMAGES_PER_PASS if device.type == "cuda" else max(1, CPU_PIXELS_PER_PASS // n_ctx)


@torch.no_grad()
def extract_features(
    model: ImageGPT,
    tokens: np.ndarray,
    layers: Sequence[int],
    *,
    batch_size: int | None = None,
    precision: str = "fp32",
    grid: int = 1,
    on_batch: Callable[[int], None] | None = None,
) -> dict[int, np.ndarray]:
    """{layer: float32 (N, grid * grid * n_embd)} of the probe features (docs/reference.md §6.1) for every row of
    `tokens`, one pass per batch.

    BERT-objective models see their input unmasked, as the paper probes them. `batch_size`: images per
    pass (default: `feature_batch_size`); `grid`: the pooling grid (1: the paper's mean over positions).
    """
    check_pool_grid(model.config, grid)
    device = next(model.parameters()).device
    batch_size = feature_batch_size(model.config.n_ctx, device) if batch_size is None else batch_size
    was_training = model.training
    model.eval()
    n, width = len(tokens), grid * grid * model.config.n_embd
    out = {layer: np.empty((n, width), dtype=np.float32) for layer in layers}
    try:
        for start in range(0, n, batch_size):
            batch = torch.from_numpy(np.asarray(tokens[start : start + batch_size]).astype(np.int64)).to(device)
            with autocast(device, precision):
                features = model.features(batch, layers, functools.partial(pool_positions, grid=grid))
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

    The same objective as scikit-learn's LogisticRegression(C=1 / (l2 * n_samples)), minimised by
    full-batch L-BFGS with a strong-Wolfe line search in float64 for at most `max_iter` iterations
    (weak strengths on tens of thousands of images stop there, short of the optimum; the results
    documents say how little a longer fit moves the figures). Hand-written rather than
    scikit-learn's for speed: the gradient in closed form on torch's threaded matmuls, warm
    starts along the L2 grid, and a whole cross-validation grid fitted as one batched problem.
    """

    def __init__(self, l2: float | torch.Tensor, max_iter: int = 300):
        self.l2, self.max_iter = l2, max_iter
        self.weight: torch.Tensor | None = None
        self.bias: torch.Tensor | None = None

    def fit(self, x: torch.Tensor, y: torch.Tensor, n_classes: int, init: "LogisticRegression | None" = None,
            weights: torch.Tensor | None = None) -> "LogisticRegression":
        """Fit on (n, d) features. `weights` (..., n), each row summing to 1 (default: 1/n each), and an `l2`
        tensor of shape (..., 1, 1) make a batch of independent problems on the same x, fitted at once."""
        weights = torch.full((len(x),), 1.0 / len(x), dtype=x.dtype) if weights is None else weights.to(x.dtype)
        l2 = torch.as_tensor(self.l2, dtype=x.dtype)
        batch = torch.broadcast_shapes(weights.shape[:-1], l2.shape[:-2] if l2.dim() >= 2 else ())
        if init is not None and init.weight is not None:
            w, b = init.weight.clone(), init.bias.clone()
        else:
            w, b = torch.zeros(*batch, x.shape[1], n_classes, dtype=x.dtype), torch.zeros(*batch, n_classes, dtype=x.dtype)
        optimizer = torch.optim.LBFGS([w, b], lr=1.0, max_iter=self.max_iter, history_size=20,
                                      tolerance_grad=1e-5, tolerance_change=1e-9, line_search_fn="strong_wolfe")
        onehot = F.one_hot(y, n_classes).to(x.dtype)
        weights = weights.unsqueeze(-1)

        def across(a: torch.Tensor, m: torch.Tensor) -> torch.Tensor:  # a @ m[i] for every problem i, as one GEMM
            return (a @ m.movedim(-2, 0).reshape(m.shape[-2], -1)).view(len(a), *batch, -1).movedim(0, -2)

        def closure():  # loss and its gradient in closed form: no autograd graph per evaluation
            logp = (across(x, w) + b.unsqueeze(-2)).log_softmax(-1)
            residual = (logp.exp() - onehot) * weights
            w.grad = (across(x.T, residual) + l2 * w).contiguous()
            b.grad = residual.sum(-2)
            return float(-(logp * onehot * weights).sum() + 0.5 * (l2 * w * w).sum())

        optimizer.step(closure)
        self.weight, self.bias = w.detach(), b.detach()
        return self

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight + self.bias.unsqueeze(-2)

    def accuracy(self, x: torch.Tensor, y: torch.Tensor) -> float:
        return float((self.logits(x).argmax(-1) == y).double().mean())


@dataclass
class LayerProbe:
    val_acc: float
    test_acc: float
    l2: float


def probe_features(
    train: np.ndarray, y_train: np.ndarray, val: np.ndarray, y_val: np.ndarray, test: np.ndarray,
    y_test: np.ndarray, n_classes: int, grid: Sequence[float] = L2_GRID, scale: Standardizer | None = None,
) -> LayerProbe:
    """Fit on train for L2 strengths along `grid`, keep the best on val, score it on test.

    The grid runs strongest first, each fit warm-started from the last, and stops once two
    weaker strengths in a row have not beaten the best: the weakest fits are the slowest.
    """
    scale = scale or Standardizer.fit(train)
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


def few_label_draws(labels: np.ndarray, per_class: int, n_classes: int, draws: int, seed: int) -> list[np.ndarray]:
    """`draws` seeded sets of row indices holding `per_class` training images of every class."""
    labels = np.asarray(labels)
    counts = np.bincount(labels, minlength=n_classes)
    if counts.min() < per_class:
        raise IgptError(f"--labels-per-class {per_class} needs {per_class} training images of every class, but class "
                        f"{int(counts.argmin())} has {int(counts.min())}: lower it or raise --max-train")
    rng = np.random.default_rng(seed)
    by_class = [np.flatnonzero(labels == c) for c in range(n_classes)]
    return [np.sort(np.concatenate([rng.choice(rows, per_class, replace=False) for rows in by_class]))
            for _ in range(draws)]


def _fold_of(labels: np.ndarray, folds: int) -> np.ndarray:
    """Each image's fold: its rank among the images of its class, modulo `folds` (every fold holds every class)."""
    fold = np.empty(len(labels), dtype=np.int64)
    for c in np.unique(labels):
        rows = np.flatnonzero(labels == c)
        fold[rows] = np.arange(len(rows)) % folds
    return fold


def probe_few_labels(
    train: np.ndarray, y_train: np.ndarray, test: np.ndarray, y_test: np.ndarray, n_classes: int,
    draws: Sequence[np.ndarray], scale: Standardizer | None = None, grid: Sequence[float] = FEW_LABEL_L2_GRID,
) -> dict:
    """The low-data probe (docs/reference.md §6.1): for each draw of a few labelled training images, fit on
    them alone and score on the whole test split; mean and spread over the draws.

    The L2 strength is chosen by stratified cross-validation inside the draw (min(per class, 5)
    folds), so no label beyond the draw's is used; standardisation may use the statistics of
    all training features (`scale`), which need no labels.
    """
    scale = scale or Standardizer.fit(train)
    xs, ys = scale(test), torch.tensor(np.asarray(y_test), dtype=torch.int64)
    strengths = torch.tensor(list(grid), dtype=torch.float64).view(-1, 1, 1, 1)
    cv_accs, test_accs, chosen = [], [], []
    for rows in draws:
        x, y = scale(np.asarray(train)[rows]), torch.tensor(np.asarray(y_train)[rows], dtype=torch.int64)
        fold = torch.as_tensor(_fold_of(y.numpy(), min(5, int(np.bincount(y.numpy()).max()))))
        folds = int(fold.max()) + 1
        fitted = torch.stack([fold != f for f in range(folds)] + [torch.ones_like(fold, dtype=torch.bool)])
        # one batched fit: every strength x (each fold's complement, then all the draw's images)
        fit = LogisticRegression(strengths, FEW_LABEL_MAX_ITER).fit(x, y, n_classes,
                                                                    weights=fitted / fitted.sum(-1, keepdim=True))
        correct = fit.logits(x)[:, :folds].argmax(-1) == y  # (strengths, folds, images)
        cv = (correct & ~fitted[:folds]).sum((1, 2)).double() / len(y)  # every image is held out once
        best = int(cv.argmax())  # the strongest of the tied
        cv_accs.append(float(cv[best]))
        test_accs.append(float(((xs @ fit.weight[best, -1] + fit.bias[best, -1]).argmax(-1) == ys).double().mean()))
        chosen.append(float(grid[best]))
    return {"cv_acc": float(np.mean(cv_accs)), "test_acc": float(np.mean(test_accs)),
            "test_std": float(np.std(test_accs)), "test_accs": test_accs, "l2s": chosen}


# ---- the whole probe --------------------------------------------------------------------------
@dataclass
class LabelledSplit:
    """One labelled split as the probe reads it: tokens (N, n_ctx), labels (N,) and the pixels (N, R, R, 3)
    behind them."""

    tokens: np.ndarray
    labels: np.ndarray
    pixels: np.ndarray

    @classmethod
    def of(cls, tokenset, limit: int | None = None, seed: int = 0) -> "LabelledSplit":
        """A data.TokenSet as a LabelledSplit; with `limit`, a seeded subset of at most `limit` images."""
        n = len(tokenset.tokens)
        if limit is None or limit >= n:
            return cls(tokenset.tokens, np.asarray(tokenset.labels), tokenset.images.images)
        rows = np.sort(np.random.default_rng(seed).permutation(n)[:limit])
        return cls(np.asarray(tokenset.tokens[rows]), np.asarray(tokenset.labels)[rows],
                   np.asarray(tokenset.images.images[rows]))


@dataclass
class Protocols:
    """Which probes run on each feature set: the full-label sweep always; the low-data probe with
    `labels_per_class`, over `draws` seeded draws; one more probe on the concatenated `concat_layers`.
    `pool_grid`: the network's features pool over each cell of this grid (1: the paper's mean over positions)."""

    labels_per_class: tuple[int, ...] = option((), "also the low-data probe: K labelled training images per class, "
                                               "such as 4,25,100", type=positive_ints, metavar="K[,K...]")
    draws: int = option(5, "seeded draws per K", type=positive_int)
    concat_layers: tuple[int, ...] | str = option((), "also probe these layers' features concatenated, such as 2,3,4",
                                                  type=str, metavar="L,L[,...]")
    pool_grid: int = option(1, "pool each layer over a GxG grid of image cells, G*G*n_embd features (1: the paper's "
                            "mean over all positions)", type=positive_int, metavar="G")

    def check(self, config: ImageGPTConfig) -> "Protocols":
        check_pool_grid(config, self.pool_grid)
        if any(k < 2 for k in self.labels_per_class):
            raise IgptError("--labels-per-class needs at least 2 images per class (its L2 is cross-validated)")
        if self.draws < 1:
            raise IgptError(f"--draws must be positive, got {self.draws}")
        if self.concat_layers:
            layers = parse_layers(self.concat_layers, config.n_layer, "--concat-layers")
            if len(layers) < 2:
                raise IgptError(f"--concat-layers needs at least two layers, got {self.concat_layers!r}")
            self.concat_layers = tuple(layers)
        return self


def _features(model, splits: dict[str, LabelledSplit], layers, batch_size, precision, grid, progress, desc: str):
    """{split: {layer: (N, grid * grid * d)}} for every layer in `layers`, one forward pass per batch."""
    bar = None
    if progress:
        from igpt.progress import progress_bar

        bar = progress_bar(sum(len(s.labels) for s in splits.values()), desc=desc, unit="img", leave=False)
    try:
        return {name: extract_features(model, split.tokens, layers, batch_size=batch_size, precision=precision, grid=grid,
                                       on_batch=bar.update if bar is not None else None)
                for name, split in splits.items()}
    finally:
        if bar is not None:
            bar.close()


def _probe_sets(sets: dict, splits: dict[str, LabelledSplit], n_classes: int, draws: dict[int, list], log,
                name: Callable[[object], str]) -> tuple[list[dict], dict[int, list[dict]]]:
    """Full-label rows and, per labels-per-class K, few-label rows for each feature set {key: {split: (N, d)}}."""
    full, few = [], {k: [] for k in draws}
    train, test = splits["train"].labels, splits["test"].labels
    for key, features in sets.items():
        scale = Standardizer.fit(features["train"])  # one per feature set, shared by every protocol
        result = probe_features(features["train"], train, features["val"], splits["val"].labels, features["test"],
                                test, n_classes, scale=scale)
        row = {"layer": key, "val_acc": result.val_acc, "test_acc": result.test_acc, "l2": result.l2}
        text = f"  {name(key)}: val {100 * row['val_acc']:5.1f}%  test {100 * row['test_acc']:5.1f}%"
        full.append(row)
        for k, chosen in draws.items():
            few[k].append({"layer": key, **probe_few_labels(features["train"], train, features["test"], test,
                                                            n_classes, chosen, scale=scale)})
            text += f"  | {k}/class {100 * few[k][-1]['test_acc']:5.1f}% +- {100 * few[k][-1]['test_std']:.1f}"
        log(text)
    return full, few


def _best(rows: list[dict], score: str = "val_acc") -> dict:
    return max(rows, key=lambda row: (row[score], -row["layer"]))


def _by_layer(features: dict[str, dict[int, np.ndarray]], layers) -> dict[int, dict[str, np.ndarray]]:
    return {layer: {split: f[layer] for split, f in features.items()} for layer in layers}


def linear_probe(
    model: ImageGPT,
    splits: dict[str, LabelledSplit],
    *,
    n_classes: int,
    layers: Sequence[int] | None = None,
    protocols: Protocols | None = None,
    batch_size: int | None = None,
    precision: str = "fp32",
    baselines: bool = True,
    seed: int = 0,
    log: Callable[[str], None] = print,
    progress: bool = False,
) -> dict:
    """Probe every layer in `layers` (default: all) and, with `baselines`, raw pixels and a random-init model.

    `splits` maps "train", "val" and "test" to LabelledSplits. The layer whose validation
    accuracy is highest is the best layer; its test accuracy is the probe's result. With
    `protocols`, also the low-data probe of every feature set (its best layer chosen by
    cross-validated accuracy on the draws, never by test) and the concatenated layers.
    """
    missing = [name for name in SPLITS if name not in splits]
    if missing:
        raise IgptError(f"the probe needs {', '.join(SPLITS)} splits; missing {', '.join(missing)}")
    layers = parse_layers(layers, model.config.n_layer)
    protocols = (protocols or Protocols()).check(model.config)
    labels = splits["train"].labels
    draws = {k: few_label_draws(labels, k, n_classes, protocols.draws, seed) for k in protocols.labels_per_class}
    grid = protocols.pool_grid
    log(f"probing {len(layers)} layers on {len(labels):,} training images"
        + pooling_text(grid)
        + (f"; {', '.join(map(str, draws))} labels per class, {protocols.draws} draws each" if draws else ""))
    concat = list(protocols.concat_layers)
    features = _features(model, splits, sorted(set(layers) | set(concat)), batch_size, precision, grid, progress,
                         "features")
    rows, few = _probe_sets(_by_layer(features, layers), splits, n_classes, draws, log, lambda k: f"layer {k:3d}")
    best = _best(rows)
    report = {"layers": rows, "best_layer": best["layer"], "best_test_acc": best["test_acc"], "n_classes": n_classes,
              "pool_grid": grid,
              "n_train": len(labels), "n_val": len(splits["val"].labels), "n_test": len(splits["test"].labels)}
    if concat:
        joined = {split: np.concatenate([f[layer] for layer in concat], 1) for split, f in features.items()}
        (concat_full,), concat_few = _probe_sets({0: joined}, splits, n_classes, draws, log,
                                                 lambda _: "layers " + "+".join(map(str, concat)))
        report["concat"] = {**concat_full, "layer": concat}
    del features
    if baselines:
        log("baseline: raw pixels")
        flat = {name: s.pixels.reshape(len(s.pixels), -1).astype(np.float32) / 255.0 for name, s in splits.items()}
        (raw_full,), raw_few = _probe_sets({-1: flat}, splits, n_classes, draws, log, lambda _: "raw pixels")
        log("baseline: randomly initialised model of the same shape")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            random_model = ImageGPT(model.config).to(next(model.parameters()).device)
        random_features = _features(random_model, splits, layers, batch_size, precision, grid, progress,
                                    "random-init features")
        random_rows, random_few = _probe_sets(_by_layer(random_features, layers), splits, n_classes, draws, log,
                                              lambda k: f"random-init layer {k:3d}")
        random_best = _best(random_rows)
        report["baselines"] = {
            "raw_pixels": raw_full["test_acc"], "raw_pixels_val": raw_full["val_acc"],
            "random_init": random_best["test_acc"], "random_init_layer": random_best["layer"],
            "random_init_layers": random_rows, "chance": 1.0 / n_classes,
        }
    if draws:
        report["few_label"] = {"draws": protocols.draws, "seed": seed, "protocols": []}
        for k in draws:
            chosen = _best(few[k], "cv_acc")
            entry = {"labels_per_class": k, "best_layer": chosen["layer"], "test_acc": chosen["test_acc"],
                     "test_std": chosen["test_std"], "layers": few[k]}
            if concat:
                entry["concat"] = {**concat_few[k][0], "layer": concat}
            if baselines:
                entry["raw_pixels"] = {key: raw_few[k][0][key] for key in ("test_acc", "test_std", "test_accs")}
                entry["over_raw_pixels"] = paired_gain(chosen["test_accs"], entry["raw_pixels"]["test_accs"])
                random_chosen = _best(random_few[k], "cv_acc")
                entry["random_init"] = {"layer": random_chosen["layer"], "test_acc": random_chosen["test_acc"],
                                        "test_std": random_chosen["test_std"]}
            report["few_label"]["protocols"].append(entry)
    return report


@dataclass(kw_only=True)
class ProbeConfig:
    """`igpt probe`'s settings besides its Protocols: which run, layers and images, how, and where the report goes."""

    ckpt: str = option(help="run folder")
    layers: str = option("all", "all, or comma-separated layers such as 0,4,8")
    max_train: int | None = option(None, "cap the training images (seeded subset)", type=positive_int)
    max_images: int | None = None  # every split's images, at most (the demo's probe on a budget); not a flag
    fit_labels_per_class: bool = False  # keep only the Ks every class has training images for (the demo's); not a flag
    batch_size: int | None = option(None, "images per forward pass (default: sized for the device, "
                                    "igpt.probe.feature_batch_size)", type=positive_int)
    baselines: bool = option(True, "the raw-pixel and random-init probes beside the network's")
    device: str | None = device_option()
    precision: str = precision_option()
    seed: int = seed_option("seed of the training subset, the few-label draws and the random-init network")
    out: str = option("probe.json", "report JSON; the plot goes beside it")


def run_probe(model: ImageGPT, palette, data: DataConfig, cfg: ProbeConfig, protocols: Protocols | None = None, *,
              log: Callable[[str], None] = print, progress: bool = True) -> dict:
    """The probe's whole job: `model`'s layers probed on `data`'s labelled splits with `protocols`, against the
    baselines; the report is written to `cfg.out` (JSON), its plot beside it (.png), and returned."""
    out = Path(cfg.out)
    if out.suffix.lower() != ".json":
        raise IgptError(f"--out {out} must name a .json file (probe.png is written beside it)")
    layers = parse_layers(cfg.layers, model.config.n_layer)  # bad settings fail before any data work
    protocols = (protocols or Protocols()).check(model.config)
    tokensets = labelled_splits(data, palette)
    limits = {"train": cfg.max_train or cfg.max_images}
    splits = {name: LabelledSplit.of(s, limits.get(name, cfg.max_images), cfg.seed) for name, s in tokensets.items()}
    if cfg.fit_labels_per_class:
        fewest = int(np.bincount(splits["train"].labels).min())
        protocols = replace(protocols, labels_per_class=tuple(k for k in protocols.labels_per_class if k <= fewest))
    classes = tokensets["train"].classes
    report = linear_probe(model, splits, n_classes=len(classes), layers=layers, protocols=protocols,
                          batch_size=cfg.batch_size, precision=cfg.precision, baselines=cfg.baselines, seed=cfg.seed,
                          log=log, progress=progress)
    report.update(ckpt=cfg.ckpt, data=data.name, classes=list(classes), objective=model.config.objective)
    atomic_write_json(out, report)
    probe_accuracy(report, out.with_suffix(".png"))
    return report


def paired_gain(ours: Sequence[float], theirs: Sequence[float]) -> dict:
    """Test accuracy gained over a baseline probed on the same draws of labels: the mean of the per-draw
    differences, its standard error, and the draws won. Pairing removes the spread that comes from which
    images were drawn (both probes see the same ones), so a gain smaller than either spread can still be sure."""
    if len(ours) != len(theirs):
        raise ValueError(f"paired_gain needs the same draws: {len(ours)} results against {len(theirs)}")
    gains = np.asarray(ours, dtype=np.float64) - np.asarray(theirs, dtype=np.float64)
    stderr = float(gains.std(ddof=1) / np.sqrt(len(gains))) if len(gains) > 1 else None  # one draw: no spread
    return {"mean": float(gains.mean()), "stderr": stderr, "won": int((gains > 0).sum()), "draws": len(gains)}


def gain_text(gain: dict, plus_minus: str = "+-") -> str:
    """A paired_gain in points: "+1.4 +- 0.4 (standard error), 15 of 20 draws won"."""
    spread = f" {plus_minus} {100 * gain['stderr']:.1f} (standard error)" if gain["stderr"] is not None else ""
    return f"{100 * gain['mean']:+.1f}{spread}, {gain['won']} of {gain['draws']} draws won"


def summary(report: dict) -> str:
    """A few lines for the terminal."""
    best = next(row for row in report["layers"] if row["layer"] == report["best_layer"])
    last = report["layers"][-1]
    lines = [f"best layer {best['layer']}: test accuracy {100 * best['test_acc']:.1f}% "
             f"(val {100 * best['val_acc']:.1f}%); layer {last['layer']}: {100 * last['test_acc']:.1f}%"
             + pooling_text(report.get("pool_grid", 1))]
    if "baselines" in report:
        b = report["baselines"]
        lines.append(f"baselines: raw pixels {100 * b['raw_pixels']:.1f}%, random-init model "
                     f"{100 * b['random_init']:.1f}% (layer {b['random_init_layer']}), chance {100 * b['chance']:.1f}%")
    if "concat" in report:
        c = report["concat"]
        lines.append(f"layers {'+'.join(map(str, c['layer']))} concatenated: test accuracy {100 * c['test_acc']:.1f}% "
                     f"(val {100 * c['val_acc']:.1f}%)")
    for few in report.get("few_label", {}).get("protocols", []):
        line = (f"{few['labels_per_class']} labels per class: layer {few['best_layer']} "
                f"{_mean_spread(few)}")
        if "concat" in few:
            line += f", concatenated {_mean_spread(few['concat'])}"
        if "raw_pixels" in few:
            line += (f"; raw pixels {_mean_spread(few['raw_pixels'])}, random-init "
                     f"{_mean_spread(few['random_init'])}")
        if "over_raw_pixels" in few:
            line += f"; over raw pixels on the same draws {gain_text(few['over_raw_pixels'])}"
        lines.append(line)
    return "\n".join(lines)


def _mean_spread(result: dict) -> str:
    return f"{100 * result['test_acc']:.1f}% +- {100 * result['test_std']:.1f}"

