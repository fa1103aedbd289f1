"""Issue 15's study: what raises linear-probe accuracy per CPU-minute of pretraining.

    python bench/probe_study.py --plan cifar10 --data ../shared/datasets/cifar10/cifar10-jpeg.tar.gz --minutes 10 \
        [--only base bert]
    python bench/probe_study.py --plan fashion-mnist --data-dir ../shared/datasets/fashion-mnist --minutes 30

Every variant is the base recipe (the demo plan's resolution and palette size for the data set,
then the study's own base: `tiny`, batch 64, lr 3e-3, the paper's 1-D positions and dense
attention) with one thing changed. Each gets the same wall-clock budget of optimizer
steps: its step is timed alone first (after a warm-up, best of 3) and the run takes
budget / step time steps, so the schedule completes inside the budget on this machine. Then
`igpt probe` measures the layer sweep with all labels and the low-data protocol
(--labels-per-class), and the table gives the best validation bits/pixel, the best layer's
test accuracy and its layer, and the few-label accuracies. Baselines (raw pixels, random-init
network) are probed for the base run only (or, with --no-base, the first variant): the other
variants share its data and, apart from the architecture rows, its network. Finished runs are
kept and reused, so a study can be stopped and continued. The plot puts best-layer accuracy against validation bits/pixel,
the paper's "better generative models learn better representations" at this scale
(bits/pixel compare only between autoregressive runs of one palette and resolution: the others
stay in the table only), with the rank correlation of the two over the comparable runs; `--plot-with`
adds the finished runs of other studies: a panel per data set, its budgets together.

`--compile` times and trains every variant compiled (more steps in the same minutes where that makes the step
faster; `--time-steps` measures whether it does, eager against compiled, without training); `--no-baselines`
skips the baselines where another study has them on the same splits.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from common import step_seconds
from igpt.runtime import reuse_freed_memory
from igpt.demo import PLANS
from igpt.pretrain import PretrainConfig

BASE = {"model": "tiny", "batch_size": 64, "lr": 3e-3, "positions": "1d", "attention": "dense"}  # the paper's
VARIANTS = {  # name: changes to the base (PretrainConfig fields, and "resolution")
    "base": {},
    "2d positions": {"positions": "2d"},
    "strided-2d": {"positions": "2d", "attention": "strided"},
    "local-2d R=2": {"positions": "2d", "attention": "local", "window_rows": 2},
    "bert": {"objective": "bert"},
    "deep 8x96": {"n_layer": 8, "n_embd": 96, "n_head": 4},
    "wide 2x192": {"n_layer": 2, "n_embd": 192, "n_head": 4},
    "lr 1e-3": {"lr": 1e-3},
    "lr 1e-2": {"lr": 1e-2},
    "no warm-up": {"warmup": 0},
    "batch 16": {"batch_size": 16},
    "batch 256": {"batch_size": 256},
    "augment": {"augment": True},
    "resolution 32": {"resolution": 32},
    "palette 16": {"clusters": 16},
    "palette 512": {"clusters": 512},
    "strided-2d batch 16": {"positions": "2d", "attention": "strided", "batch_size": 16},  # two winners together
    "strided-2d batch 16 wide 2x192": {"positions": "2d", "attention": "strided", "batch_size": 16,
                                       "n_layer": 2, "n_embd": 192, "n_head": 4},  # and the width winner
    "strided-2d batch 16 4x192": {"positions": "2d", "attention": "strided", "batch_size": 16,  # wider, not shallower
                                  "n_layer": 4, "n_embd": 192, "n_head": 6},
    "strided-2d batch 16 4x256": {"positions": "2d", "attention": "strided", "batch_size": 16,  # wider still
                                  "n_layer": 4, "n_embd": 256, "n_head": 8},
}
# Variants whose bits/pixel do not compare with the base's: other tokens, or BERT's masked-pixel loss.
INCOMPARABLE = {"resolution", "clusters", "objective"}


def flags(changes: dict) -> list[str]:
    out = []
    for name, value in changes.items():
        flag = "--" + name.replace("_", "-")
        if value is True:
            out.append(flag)
        else:
            out += [flag, str(value)]
    return out


def folder_name(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name)


def variant_shape(plan: str, name: str) -> tuple[dict, int]:
    """A variant's PretrainConfig fields (the base's, changed) and its resolution."""
    sizing = PLANS[plan]
    changes = {**BASE, "clusters": sizing.clusters, "resolution": sizing.resolution, **VARIANTS[name]}
    resolution = changes.pop("resolution")
    return changes, resolution


def median_step(changes: dict, resolution: int, compiled: bool, steps: int) -> float:
    """The median of `steps` of the variant's optimizer steps alone, on random tokens (common.step_seconds)."""
    config = PretrainConfig(**changes).model_config(changes["clusters"], resolution)
    return step_seconds(config, changes["batch_size"], "cpu", "fp32", steps=steps, compile=compiled)


def time_steps(names: list[str], plan: str, rounds: int = 3) -> None:
    """Each variant's step eager and compiled, in turns (the best of `rounds` medians of 8 steps each): whether
    --compile buys steps for it on this machine."""
    print("| variant | eager s/step | compiled s/step | compiled speed-up |\n|---|---|---|---|")
    for name in names:
        changes, resolution = variant_shape(plan, name)
        times = {False: [], True: []}
        for _ in range(rounds):
            for compiled in (False, True):
                times[compiled].append(median_step(changes, resolution, compiled, steps=8))
        eager_s, compiled_s = min(times[False]), min(times[True])
        print(f"| {name} | {eager_s:.3f} | {compiled_s:.3f} | {eager_s / compiled_s:.2f}x |", flush=True)


def run_variant(name: str, args, out: Path, baselines: bool) -> Path:
    """Train and probe one variant into out/<name>, each step only when its result is missing.

    baselines: probe raw pixels and the random-init network beside it (one row per study does)."""
    changes, resolution = variant_shape(args.plan, name)
    run = out / folder_name(name)
    data = ["--data", args.data or args.plan] + (["--data-dir", args.data_dir] if args.data_dir else [])
    igpt = [sys.executable, "-m", "igpt.cli"]
    if not (run / "study.json").exists():
        seconds = min(median_step(changes, resolution, args.compile, steps=2) for _ in range(3))
        steps = max(10, int(args.minutes * 60 / seconds))
        print(f"== {name}: {seconds:.3f} s/step alone, {steps} steps for {args.minutes:g} minutes", flush=True)
        subprocess.run(igpt + ["train", *data, "--resolution", str(resolution), *flags(changes), "--steps", str(steps),
                               "--eval-every", str(max(1, steps // 10)), "--eval-batches", "8", "--save-every",
                               str(steps), "--sample-every", str(steps), "--device", "cpu", "--out", str(run)]
                       + (["--compile"] if args.compile else []),
                       check=True)
        (run / "study.json").write_text(json.dumps({"name": name, "changes": VARIANTS[name], "seconds_per_step":
                                                    seconds, "steps": steps, "minutes": args.minutes,
                                                    "compile": args.compile}))
    if not (run / "probe.json").exists():
        subprocess.run(igpt + ["probe", "--ckpt", str(run), "--max-train", str(args.probe_train), "--labels-per-class",
                               args.labels_per_class, "--out", str(run / "probe.json")]
                       + ([] if baselines else ["--no-baselines"]), check=True)
    return run


def row(run: Path) -> dict:
    study = json.loads((run / "study.json").read_text())
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    probe = json.loads((run / "probe.json").read_text())
    data = json.loads((run / "run.json").read_text())["data"]
    few = {p["labels_per_class"]: p for p in probe.get("few_label", {}).get("protocols", [])}
    return {**study, "data": (Path(data["name"]).name.split(".")[0], data["resolution"]), "val_bits_per_pixel": min(r["val_bits_per_pixel"] for r in records if "val_bits_per_pixel" in r),
            "best_layer": probe["best_layer"], "best_test_acc": probe["best_test_acc"], "few": few,
            "baselines": probe.get("baselines"), "comparable": not INCOMPARABLE & set(study["changes"])}


def base_row(rows: list[dict]) -> dict | None:
    """The row probed with the baselines (the study's base run), where there is one."""
    return next((r for r in rows if r["baselines"]), None)


def table(rows: list[dict]) -> str:
    ks = sorted({k for r in rows for k in r["few"]})
    head = ["variant", "s/step", "steps", "val bits/pixel", "best layer", "test acc %"] + [f"{k}/class %" for k in ks]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        few = [f"{100 * r['few'][k]['test_acc']:.1f} ± {100 * r['few'][k]['test_std']:.1f}" if k in r["few"] else "-"
               for k in ks]
        name = r["name"] + (" (compiled)" if r.get("compile") else "")
        lines.append("| " + " | ".join([name, f"{r['seconds_per_step']:.3f}", str(r["steps"]),
                                        f"{r['val_bits_per_pixel']:.3f}" + ("" if r["comparable"] else " *"),
                                        str(r["best_layer"]), f"{100 * r['best_test_acc']:.1f}"] + few) + " |")
    base = base_row(rows)
    if base:
        b = base["baselines"]
        lines.append(f"\nBaselines (base run's splits): raw pixels {100 * b['raw_pixels']:.1f}%, random-init network "
                     f"{100 * b['random_init']:.1f}% (layer {b['random_init_layer']}); few labels: " + ", ".join(
                         f"{k}/class raw {100 * p['raw_pixels']['test_acc']:.1f}%, random-init "
                         f"{100 * p['random_init']['test_acc']:.1f}%" for k, p in sorted(base["few"].items())))
    lines.append("* another palette or resolution, or BERT's masked-pixel loss: compares with no other row.")
    return "\n".join(lines)


def finished(out: Path) -> list[dict]:
    """The rows of every trained and probed variant in a study folder, base first."""
    runs = [run for run in sorted(out.iterdir()) if (run / "study.json").exists() and (run / "probe.json").exists()]
    return sorted((row(run) for run in runs), key=lambda r: r["name"] != "base")


def rank_correlation(rows: list[dict]) -> float | None:
    """Spearman's rho between -bits/pixel and probe accuracy over the comparable rows (None below 3)."""
    import numpy as np

    rows = [r for r in rows if r["comparable"]]
    if len(rows) < 3:
        return None
    ranks = [np.argsort(np.argsort(v)) for v in ([-r["val_bits_per_pixel"] for r in rows],
                                                 [r["best_test_acc"] for r in rows])]
    return float(np.corrcoef(*ranks)[0, 1])


def panels(rows: list[dict]) -> dict[tuple[str, int], list[dict]]:
    """The rows by (data set, resolution), as their run.json records them: the budgets of one data set
    share its palette and validation images, so their bits/pixel compare."""
    by_data: dict[tuple[str, int], list[dict]] = {}
    for r in rows:
        by_data.setdefault(r["data"], []).append(r)
    return by_data


def plot(rows: list[dict], path: str) -> None:
    """One panel per data set: best-layer accuracy against validation bits/pixel, a point per comparable variant."""
    from igpt.plots import _figure, _save

    by_data = panels(rows)
    plt, fig, axes = _figure(width=5.0 * len(by_data), height=3.8, rows=1, columns=len(by_data))
    for ax, ((data, resolution), panel) in zip(axes[0], by_data.items()):
        budgets = sorted({r["minutes"] for r in panel})
        ax.grid(True, alpha=0.3)
        colours = {m: f"C{i + (i >= 3)}" for i, m in enumerate(budgets)}  # C3 is the raw-pixel line's red
        for minutes in budgets:
            ax.plot([], [], "o", color=colours[minutes], label=f"{minutes:g} minutes")
        for r in (r for r in panel if r["comparable"]):  # the others' bits/pixel count other tokens or pixels
            ax.plot(r["val_bits_per_pixel"], 100 * r["best_test_acc"], "o", color=colours[r["minutes"]])
            ax.annotate(r["name"], (r["val_bits_per_pixel"], 100 * r["best_test_acc"]), fontsize=6,
                        textcoords="offset points", xytext=(3, 3))
        base = base_row(panel)
        if base:
            ax.axhline(100 * base["baselines"]["raw_pixels"], color="tab:red", linestyle="--", linewidth=1, label="raw pixels")
        ax.legend(fontsize=7, loc="best")
        rho = rank_correlation(panel)
        title = f"{data} at {resolution}x{resolution}, {', '.join(f'{m:g}' for m in budgets)} min"
        ax.set_title(title + ("" if rho is None else f" (rank correlation {rho:+.2f})"), fontsize=8)
        ax.set_xlabel("best validation bits per pixel (autoregressive runs of the study's palette)", fontsize=8)
        ax.set_ylabel("best-layer probe, test accuracy (%)", fontsize=8)
    _save(plt, fig, path)
    print(f"plot: {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plan", default="cifar10", choices=sorted(PLANS), help="the demo plan: data set, resolution, "
                        "palette size")
    parser.add_argument("--data", default=None, help="another copy of the plan's data (an image folder or archive); "
                        "default: the named data set")
    parser.add_argument("--data-dir", default=None, help="folder holding existing copies of the named data set")
    parser.add_argument("--minutes", type=float, default=10.0, help="optimizer-step budget per run, on this CPU")
    parser.add_argument("--only", nargs="*", default=None, choices=sorted(VARIANTS), help="these variants only")
    parser.add_argument("--compile", action="store_true", help="train (and time the step) with torch.compile: "
                        "more steps in the same minutes where it makes the step faster")
    parser.add_argument("--time-steps", action="store_true", help="only time each variant's step, eager and "
                        "compiled (no training)")
    parser.add_argument("--out", default=None, help="default: runs/study-<data>-<minutes>min")
    parser.add_argument("--probe-train", type=int, default=15_000, help="training images for the probe")
    parser.add_argument("--labels-per-class", default="4,25")
    parser.add_argument("--no-base", action="store_true", help="leave the base run out (a long budget spent on "
                        "the winners only); the first variant then carries the baselines")
    parser.add_argument("--no-baselines", action="store_true", help="probe no baselines (another study has them on "
                        "the same splits: the probe's splits depend only on the data and --probe-train)")
    parser.add_argument("--plot", default=None, help="default: <out>/probe-vs-bpp.png")
    parser.add_argument("--plot-with", nargs="*", default=[], help="other studies' folders: their finished variants "
                        "join the plot, a panel per data set")
    args = parser.parse_args()
    for other in args.plot_with:
        if not Path(other).is_dir():
            parser.error(f"--plot-with {other}: no such study folder (a runs/study-<data>-<minutes>min)")
    reuse_freed_memory()  # as in the `igpt train` it times the step for
    if args.time_steps:
        time_steps(args.only or list(VARIANTS), args.plan)
        return
    out = Path(args.out or f"runs/study-{args.plan}-{args.minutes:g}min")
    names = ([] if args.no_base else ["base"]) + [n for n in (args.only or VARIANTS) if n != "base"]
    rows = [row(run_variant(name, args, out, baselines=name == names[0] and not args.no_baselines)) for name in names]
    print(table(rows))
    rows += [r for other in args.plot_with for r in finished(Path(other))]
    for (data, _), panel in panels(rows).items():
        rho = rank_correlation(panel)
        if rho is not None:
            print(f"{data}: rank correlation of -bits/pixel and probe accuracy over the comparable rows: {rho:+.2f}")
    plot(rows, args.plot or str(out / "probe-vs-bpp.png"))


if __name__ == "__main__":
    main()
