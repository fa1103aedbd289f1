"""A/B of two igpt versions: this working tree against a git revision, each case in fresh processes, in turns.

    python bench/ab_versions.py REV [--cases train-default sample-default] [--rounds 3]

`git archive REV src` is unpacked into a temporary folder. Each round runs every case once
per version, alternating which version goes first, with PYTHONPATH naming that version's
src/, so the machine's drift falls on both alike and neither inherits the other's caches or
allocator state. A case builds its model from the same seed, warms up, and reports the median
of its timed steps; the script prints each version's best median over the rounds and the
ratio REV / this (above 1: this tree is faster). The cases are the ones a refactor must not
slow down: a training step of the default model (strided, 2-D positions, `tiny`, 16x16, batch
16), dense `mini` at 32x32 (batch 8), and sampling `tiny` at 32x32 (batch 8). Only the public
names that both versions share are used (ImageGPT, ImageGPTConfig, train_step, sample).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CASES = {  # name: (preset, side, batch, attention, what is timed)
    "train-default": ("tiny", 16, 16, "strided", "train"),
    "train-mini-dense-32": ("mini", 32, 8, "dense", "train"),
    "sample-default-32": ("tiny", 32, 8, "strided", "sample"),
}


def run_case(name: str) -> dict:
    """In the worker process: time one case with whichever igpt PYTHONPATH names, under the allocator settings of
    the igpt command (in igpt.runtime, or igpt.cli before it moved)."""
    import torch

    try:
        from igpt.runtime import reuse_freed_memory
    except ImportError:
        from igpt.cli import reuse_freed_memory
    reuse_freed_memory()

    from igpt.batches import Batch
    from igpt.distributed import World
    from igpt.model import ImageGPT, ImageGPTConfig
    from igpt.sample import sample
    from igpt.train import make_optimizer, train_step

    preset, side, batch, attention, kind = CASES[name]
    torch.manual_seed(0)
    config = ImageGPTConfig.from_preset(preset, vocab_size=512, n_ctx=side * side, positions="2d", attention=attention)
    model = ImageGPT(config)
    if kind == "train":
        optimizer = make_optimizer(model.parameters(), lr=1e-4)
        tokens = Batch(torch.randint(0, 512, (batch, side * side)))
        world = World(device=torch.device("cpu"))
        step, warm, timed = (lambda: train_step(model, optimizer, tokens, world=world)), 3, 10
    else:
        model.eval()
        generator = torch.Generator().manual_seed(0)
        step, warm, timed = (lambda: sample(model, batch, generator=generator)), 1, 3
    for _ in range(warm):
        step()
    seconds = []
    for _ in range(timed):
        start = time.perf_counter()
        step()
        seconds.append(time.perf_counter() - start)
    import igpt

    return {"case": name, "median_s": statistics.median(seconds), "version": igpt.__version__}


def export(rev: str, folder: Path) -> Path:
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "src"], capture_output=True, check=True).stdout
    with tempfile.TemporaryFile() as f:
        f.write(archive)
        f.seek(0)
        with tarfile.open(fileobj=f) as tar:
            tar.extractall(folder, filter="data")
    return folder / "src"


def time_in(src: Path, case: str) -> float:
    env = {**os.environ, "PYTHONPATH": str(src)}
    out = subprocess.run([sys.executable, __file__, "--worker", case], env=env, capture_output=True, text=True,
                         check=True).stdout
    return json.loads(out.splitlines()[-1])["median_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("rev", nargs="?", help="the git revision to compare this working tree with")
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(run_case(args.worker)))
        return
    if args.rev is None:
        parser.error("name the git revision to compare with")
    from common import machine

    print(machine())
    with tempfile.TemporaryDirectory() as scratch:
        versions = {args.rev: export(args.rev, Path(scratch)), "this": ROOT / "src"}
        medians = {case: {name: [] for name in versions} for case in args.cases}
        for round_ in range(args.rounds):
            order = list(versions) if round_ % 2 == 0 else list(reversed(versions))
            for case in args.cases:
                for name in order:
                    medians[case][name].append(time_in(versions[name], case))
    rows = []
    for case, by_version in medians.items():
        best = {name: min(values) for name, values in by_version.items()}
        ratio = best[args.rev] / best["this"]
        rows.append({"case": case, "rev": args.rev, "medians_s": by_version, "best_s": best, "rev_over_this": ratio})
        print(f"{case:22s} {args.rev}: {best[args.rev]:.4f} s  this: {best['this']:.4f} s  ratio {ratio:.3f} "
              f"(medians per round: {', '.join(f'{a:.4f}/{b:.4f}' for a, b in zip(*by_version.values()))})")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine(), "rounds": args.rounds, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
