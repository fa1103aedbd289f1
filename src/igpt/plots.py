"""PNG figures for people: the learning curve of a run and the probe's accuracy against depth.

matplotlib runs on its file-only Agg backend (no screen needed); every figure is rendered in
memory and written atomically.
"""

from __future__ import annotations

import io
import math
from pathlib import Path

from igpt.fileio import atomic_write

LN2 = math.log(2.0)


def _figure(width: float = 6.0, height: float = 3.6, rows: int = 0, columns: int = 0):
    """One gridded plot, or with `rows` and `columns` a (rows, columns) array of bare axes."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    if rows and columns:
        fig, axes = plt.subplots(rows, columns, figsize=(width, height), dpi=110, squeeze=False)
        return plt, fig, axes
    fig, ax = plt.subplots(figsize=(width, height), dpi=110)
    ax.grid(True, alpha=0.3)
    return plt, fig, ax


def _save(plt, fig, path: str | Path) -> Path:
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    path = Path(path)
    atomic_write(path, lambda f: f.write(buffer.getvalue()))
    return path


def learning_curve(records: list[dict], path: str | Path, baselines: dict[str, float] | None = None) -> Path:
    """Training and validation bits/pixel against step, from `metrics.jsonl` records."""
    plt, fig, ax = _figure()
    train = [(r["step"], r["loss"] / LN2) for r in records if "loss" in r and math.isfinite(r["loss"])]
    val = [(r["step"], r["val_bits_per_pixel"]) for r in records if "val_bits_per_pixel" in r]
    if train:
        window = max(1, len(train) // 50)  # a running mean keeps the curve readable
        steps = [s for s, _ in train][window - 1 :]
        values = [sum(v for _, v in train[i - window + 1 : i + 1]) / window for i in range(window - 1, len(train))]
        ax.plot(steps, values, label="train", color="tab:blue", linewidth=1)
    if val:
        ax.plot(*zip(*val), "o-", label="validation", color="tab:orange", markersize=4)
    for i, (name, value) in enumerate((baselines or {}).items()):
        ax.axhline(value, linestyle="--", color=f"C{i + 2}", linewidth=1, label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("bits per pixel")
    ax.legend(loc="upper right", fontsize=8)
    return _save(plt, fig, path)


def pooling_text(grid: int) -> str:
    """How a report names a pooling grid other than the paper's: "" for 1, else ", features pooled over a GxG grid"."""
    return f", features pooled over a {grid}x{grid} grid" if grid > 1 else ""


def probe_accuracy(report: dict, path: str | Path) -> Path:
    """Linear-probe accuracy against layer, best layer marked, baselines as horizontal lines; with the
    low-data protocol, a second panel of accuracy against labels per class beside it."""
    few = report.get("few_label", {}).get("protocols", [])
    if few:
        plt, fig, axes = _figure(11.0, 3.8, rows=1, columns=2)
        ax = axes[0, 0]
        for panel in axes[0]:
            panel.grid(True, alpha=0.3)
    else:
        plt, fig, ax = _figure()
    layers = [row["layer"] for row in report["layers"]]
    ax.plot(layers, [100 * row["test_acc"] for row in report["layers"]], "o-", label="probe (test)", color="tab:blue")
    ax.plot(layers, [100 * row["val_acc"] for row in report["layers"]], "o:", label="probe (validation)",
            color="tab:blue", alpha=0.5, markersize=3)
    best = next(row for row in report["layers"] if row["layer"] == report["best_layer"])
    ax.plot([best["layer"]], [100 * best["test_acc"]], "*", markersize=16, color="tab:red",
            label=f"best layer ({best['layer']}): {100 * best['test_acc']:.1f}%")
    baselines = report.get("baselines", {})
    if "random_init_layers" in baselines:
        rows = baselines["random_init_layers"]
        ax.plot([r["layer"] for r in rows], [100 * r["test_acc"] for r in rows], "s-", color="tab:gray",
                markersize=3, linewidth=1, label=f"random-init model (best {100 * baselines['random_init']:.1f}%)")
    if "raw_pixels" in baselines:
        ax.axhline(100 * baselines["raw_pixels"], linestyle="--", color="tab:green",
                   label=f"raw pixels: {100 * baselines['raw_pixels']:.1f}%")
    if "chance" in baselines:
        ax.axhline(100 * baselines["chance"], linestyle=":", color="black", linewidth=1, label="chance")
    ax.set_xlabel("layer (0 = embeddings)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(f"all {report['n_train']:,} training labels" + pooling_text(report.get("pool_grid", 1)), fontsize=9)
    ax.set_xticks(layers if len(layers) <= 25 else layers[:: math.ceil(len(layers) / 25)])
    ax.legend(loc="lower right", fontsize=7)
    if few:
        _few_label_panel(axes[0, 1], few)
    return _save(plt, fig, path)


def _few_label_panel(ax, protocols: list[dict]) -> None:
    """Test accuracy (mean +- std over the draws) against labels per class, each feature set a line."""
    ks = [p["labels_per_class"] for p in protocols]
    lines = [("pretrained, best layer", lambda p: p, "tab:blue", "o-"),
             ("layers concatenated", lambda p: p.get("concat"), "tab:purple", "d-"),
             ("raw pixels", lambda p: p.get("raw_pixels"), "tab:green", "s--"),
             ("random-init model", lambda p: p.get("random_init"), "tab:gray", "s-")]
    for name, pick, colour, style in lines:
        points = [(k, pick(p)) for k, p in zip(ks, protocols) if pick(p) is not None]
        if points:
            ax.errorbar([k for k, _ in points], [100 * r["test_acc"] for _, r in points],
                        yerr=[100 * r["test_std"] for _, r in points], fmt=style, color=colour, capsize=3,
                        markersize=4, label=name)
    ax.set_xscale("log")
    ax.minorticks_off()
    ax.set_xticks(ks)
    ax.set_xticklabels([str(k) for k in ks])
    ax.set_xlabel("labelled training images per class")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("few labels (mean +- std over seeded draws)", fontsize=9)
    ax.legend(loc="lower right", fontsize=7)


def curves_against_time(curves: dict[str, list[tuple[float, float]]], path: str | Path,
                        ylabel: str = "validation bits per pixel") -> Path:
    """Several runs' (minutes, value) curves on one axis: which learns most per minute of compute."""
    plt, fig, ax = _figure()
    for i, (name, points) in enumerate(curves.items()):
        if points:
            ax.plot(*zip(*points), "o-", label=name, color=f"C{i}", markersize=3, linewidth=1.2)
    ax.set_xlabel("minutes of optimizer steps")
    ax.set_ylabel(ylabel)
    ax.legend(loc="upper right", fontsize=8)
    return _save(plt, fig, path)


def surprise_maps(images, bits, names: list[str], path: str | Path) -> Path:
    """Each image beside its per-pixel bits under the model (one colour scale for all), with its mean bits/pixel."""
    import numpy as np

    bits = np.asarray(bits)
    n = len(images)
    plt, fig, axes = _figure(width=5.2, height=2.4 * n, rows=n, columns=2)
    top = float(np.percentile(bits, 99)) or 1.0
    for row, image, pixel_bits, name in zip(axes, images, bits, names):
        row[0].imshow(image, interpolation="nearest")
        row[0].set_title(name if len(name) <= 28 else "..." + name[-25:], fontsize=8)
        shown = row[1].imshow(pixel_bits, cmap="magma", vmin=0, vmax=top, interpolation="nearest")
        row[1].set_title(f"{pixel_bits.mean():.2f} bits/pixel", fontsize=8)
        fig.colorbar(shown, ax=row[1], fraction=0.046, pad=0.04).set_label("bits", fontsize=7)
        for ax in row:
            ax.set_xticks([])
            ax.set_yticks([])
    return _save(plt, fig, path)
