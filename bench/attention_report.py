"""Issue 14's evidence, from the runs of bench/attention_runs.sh: which attention pattern learns most per CPU-minute.

    python bench/attention_report.py runs/attention [--data TARBALL] [--device cuda] [--plot PATH]

For every run folder under the given folder it evaluates, once (kept in the run folder, so a
second call only redraws): the test split's exact bits/pixel (`igpt eval`, written to
test.json) and the layer-sweep linear probe with its raw-pixel and random-init baselines
(`igpt probe --max-train 15000`, probe.json). Evaluation may run anywhere (--device); the
minutes in the table and the plot are the runs' own: the optimizer steps' time as logged
in metrics.jsonl (each step's tokens over its tokens/s), validation excluded; the plot puts
each validation at its step times the run's median step time.
Prints a Markdown table and draws validation bits/pixel against those minutes.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

from igpt.checkpoint import RunInfo
from igpt.model import ImageGPTConfig
from igpt.plots import curves_against_time

PROBE_TRAIN_IMAGES = 15_000  # as in the README's CIFAR-10 16x16 probe: the seeded subset of the training split


def evaluate(run: Path, data: str | None, device: str | None) -> None:
    """test.json and probe.json in the run folder, each computed only when missing."""
    common = (["--data", data] if data else []) + (["--device", device] if device else [])
    igpt = [sys.executable, "-m", "igpt.cli"]
    if not (run / "test.json").exists():
        subprocess.run(igpt + ["eval", "--ckpt", str(run), "--split", "test", "--json", str(run / "test.json")] + common,
                       check=True)
    if not (run / "probe.json").exists():
        subprocess.run(igpt + ["probe", "--ckpt", str(run), "--max-train", str(PROBE_TRAIN_IMAGES),
                               "--out", str(run / "probe.json")] + common, check=True)


def curve(run: Path, tokens_per_step: int) -> tuple[list[tuple[float, float]], list[float]]:
    """(minutes, validation bits/pixel) at each validation, and every step's seconds.

    The minutes are the step count times the run's median step time: every step of a run does
    the same work on the same shapes, and the median is what a quiet machine gives even when
    other processes slowed some of the steps (the table gives the measured sum beside it).
    """
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [tokens_per_step / r["tokens_per_s"] for r in records if "tokens_per_s" in r]
    median = statistics.median(steps)
    return [(r["step"] * median / 60, r["val_bits_per_pixel"]) for r in records if "val_bits_per_pixel" in r], steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", help="the folder of run folders (bench/attention_runs.sh's OUT)")
    parser.add_argument("--data", default=None, help="the data set, where it lies elsewhere than when trained")
    parser.add_argument("--device", default=None, help="where to evaluate (default: igpt's)")
    parser.add_argument("--no-evaluate", dest="evaluate", action="store_false", help="only read what is there")
    parser.add_argument("--plot", default="docs/attention-cifar10-32px.png")
    args = parser.parse_args()
    runs = sorted(p.parent for p in Path(args.folder).glob("*/run.json"))
    curves, rows = {}, []
    for run in runs:
        if args.evaluate:
            evaluate(run, args.data, args.device)
        config = ImageGPTConfig.from_dict(json.loads((run / "config.json").read_text()))
        points, steps = curve(run, RunInfo.read(run).config["batch_size"] * config.n_ctx)
        name = f"{config.attention}-{config.positions}" + (f" R={config.window_rows}" if config.attention == "local" else "")
        curves[name] = points
        test = json.loads((run / "test.json").read_text()) if (run / "test.json").exists() else {}
        probe = json.loads((run / "probe.json").read_text()) if (run / "probe.json").exists() else {}
        rows.append((name, len(steps), sum(steps) / 60, statistics.median(steps), points[-1][1] if points else None,
                     test.get("bits_per_pixel"), probe))
    print("| pattern | steps | s/step (median) | minutes at the median | minutes measured | validation bits/pixel "
          "(last) | test bits/pixel | best probe layer | its test accuracy % | raw pixels % | best random-init % |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, n, minutes, median, val, test, probe in rows:
        b = probe.get("baselines", {})
        cells = [name, str(n), f"{median:.2f}", f"{n * median / 60:.1f}", f"{minutes:.1f}", fmt(val, ".3f"),
                 fmt(test, ".3f"),
                 str(probe.get("best_layer", "-")), fmt(100 * probe["best_test_acc"] if probe else None, ".1f"),
                 fmt(100 * b["raw_pixels"] if "raw_pixels" in b else None, ".1f"),
                 fmt(100 * b["random_init"] if "random_init" in b else None, ".1f")]
        print("| " + " | ".join(cells) + " |")
    print(f"plot: {curves_against_time(curves, args.plot)}")


def fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


if __name__ == "__main__":
    main()
