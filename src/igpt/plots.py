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


def _figure(width: float = 6.0, height: float = 3.6):
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

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


def probe_accuracy(report: dict, path: str | Path) -> Path:
    """Linear-probe accuracy against layer, best layer marked, baselines as horizontal lines."""
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
    ax.set_xticks(layers if len(layers) <= 25 else layers[:: math.ceil(len(layers) / 25)])
    ax.legend(loc="lower right", fontsize=7)
    return _save(plt, fig, path)


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
