"""Issue 14's evidence, from the runs of bench/attention_runs.sh: which attention pattern learns most per CPU-minute.

    python bench/attention_report.py runs/attention [--data TARBALL] [--device cuda] [--plot PATH]

For every run folder under the given folder it evaluates, once (kept in the run folder, so a
second call only redraws): the test split's exact bits/pixel (`igpt eval`, written to
test.json) and the layer-sweep linear probe with its raw-pixel and random-init baselines
(`igpt probe --max-train 15000`, probe.json). Evaluation may run anywhere (--device); the
minutes in the table and the plot are the runs' own: the optimizer steps' time as logged
in metrics.jsonl (each step's tokens over its tokens/s), validation excluded, and the step
timed alone on this CPU (step_time.json, made on the first call: run it on a quiet machine);
the plot puts each validation at its step times that quiet step time.
Prints a Markdown table and draws validation bits/pixel against those minutes.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

from igpt.model import ImageGPTConfig
from igpt.plots import curves_against_time
from igpt.runrecord import RunInfo

PROBE_TRAIN_IMAGES = 15_000  # as in the README's CIFAR-10 16x16 probe: the seeded subset of the training split


def evaluate(run: Path, data: str | None, device: str | None, baselines: bool = True) -> None:
    """test.json and probe.json in the run folder, each computed only when missing."""
    common = (["--data", data] if data else []) + (["--device", device] if device else [])
    igpt = [sys.executable, "-m", "igpt.cli"]
    if not (run / "test.json").exists():
        subprocess.run(igpt + ["eval", "--ckpt", str(run), "--split", "test", "--json", str(run / "test.json")] + common,
                       check=True)
    if not (run / "probe.json").exists():
        subprocess.run(igpt + ["probe", "--ckpt", str(run), "--max-train", str(PROBE_TRAIN_IMAGES),
                               "--out", str(run / "probe.json")] + common + ([] if baselines else ["--no-baselines"]),
                       check=True)


def quiet_step_seconds(run: Path, config: ImageGPTConfig, batch_size: int) -> float:
    """The run's optimizer step timed alone on this CPU (best of 5, after a warm-up), kept in step_time.json.

    Every step of a run does the same work on the same shapes, so steps x this is the run's cost
    on a quiet machine, whatever else shared the cores while it trained (its logged step times
    are in the table too). Time it with nothing else running.
    """
    kept = run / "step_time.json"
    if not kept.exists():
        from common import step_seconds

        seconds = min(step_seconds(config, batch_size, "cpu", "fp32", steps=1) for _ in range(5))
        kept.write_text(json.dumps({"seconds": seconds, "batch_size": batch_size}))
    return json.loads(kept.read_text())["seconds"]


def curve(run: Path, tokens_per_step: int, step_seconds: float) -> tuple[list[tuple[float, float]], list[float]]:
    """(minutes at `step_seconds` a step, validation bits/pixel) at each validation; every step's logged seconds."""
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [tokens_per_step / r["tokens_per_s"] for r in records if "tokens_per_s" in r]
    return [(r["step"] * step_seconds / 60, r["val_bits_per_pixel"]) for r in records if "val_bits_per_pixel" in r], steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", help="the folder of run folders (bench/attention_runs.sh's OUT)")
    parser.add_argument("--data", default=None, help="the data set, where it lies elsewhere than when trained")
    parser.add_argument("--device", default=None, help="where to evaluate (default: igpt's)")
    parser.add_argument("--no-evaluate", dest="evaluate", action="store_false", help="only read what is there")
    parser.add_argument("--no-baselines", dest="baselines", action="store_false",
                        help="probe without the raw-pixel and random-init baselines (the same data for every run)")
    parser.add_argument("--only-evaluate", action="store_true",
                        help="evaluate and stop (on a machine other than the one the runs trained on)")
    parser.add_argument("--plot", default="docs/attention-cifar10-32px.png")
    args = parser.parse_args()
    runs = sorted(p.parent for p in Path(args.folder).glob("*/run.json"))
    curves, rows = {}, []
    for run in runs:
        if args.evaluate or args.only_evaluate:
            evaluate(run, args.data, args.device, args.baselines)
        if args.only_evaluate:
            continue
        config = ImageGPTConfig.from_dict(json.loads((run / "config.json").read_text()))
        batch_size = RunInfo.read(run).config["batch_size"]
        quiet = quiet_step_seconds(run, config, batch_size)
        points, steps = curve(run, batch_size * config.n_ctx, quiet)
        name = f"{config.attention}-{config.positions}" + (f" R={config.window_rows}" if config.attention == "local" else "")
        curves[name] = points
        test = json.loads((run / "test.json").read_text()) if (run / "test.json").exists() else {}
        probe = json.loads((run / "probe.json").read_text()) if (run / "probe.json").exists() else {}
        rows.append((name, len(steps), sum(steps) / 60, quiet, statistics.median(steps),
                     points[-1][1] if points else None, test.get("bits_per_pixel"), probe))
    if args.only_evaluate:
        return
    print("| pattern | steps | s/step alone | minutes alone | s/step logged (median) | minutes logged | "
          "validation bits/pixel (last) | test bits/pixel | best probe layer | its test accuracy % | raw pixels % | "
          "best random-init % |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, n, minutes, quiet, median, val, test, probe in rows:
        b = probe.get("baselines", {})
        cells = [name, str(n), f"{quiet:.2f}", f"{n * quiet / 60:.1f}", f"{median:.2f}", f"{minutes:.1f}",
                 fmt(val, ".3f"), fmt(test, ".3f"),
                 str(probe.get("best_layer", "-")), fmt(100 * probe["best_test_acc"] if probe else None, ".1f"),
                 fmt(100 * b["raw_pixels"] if "raw_pixels" in b else None, ".1f"),
                 fmt(100 * b["random_init"] if "random_init" in b else None, ".1f")]
        print("| " + " | ".join(cells) + " |")
    print(f"plot: {curves_against_time(curves, args.plot)}")


def fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


if __name__ == "__main__":
    main()
