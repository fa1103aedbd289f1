"""Data larger than memory: a synthetic downsampled ImageNet at full size, its token cache, training from it.

    python bench/bench_data_scale.py [--images 1281167] [--jpegs 50000] [--steps 200] [--torchrun] [--json FILE]

Writes, into a scratch folder it makes under --workdir and deletes at the end (unless --keep):
- a synthetic imagenet32 in the canonical layout: train_data_batch_1..10.npz and val_data.npz, each `data`
  (N, 3072) uint8 channel planes and `labels` 1..1000, written by np.savez (uncompressed) a block at a time;
  the images are smooth fields of colour with a little noise, so that they hold about as many distinct colours
  as photographs (what encoding costs);
- a folder of --jpegs JPEGs (class folders, --jpeg-size pixels, the size of an ILSVRC photograph).

Then measures, each in a process of its own:
- build: the token cache of train and val (`--palette openai` at 32x32, as `igpt train --data imagenet32` builds
  it): seconds, and the peak resident memory of the building processes (the main one and its workers, summed);
- train: `igpt train --model tiny` for --steps steps at batch 64 from that cache (--grad-accum micro-batches):
  the process's peak resident memory (goal: under 2 GB beside a 2.6 GB token set at full size), and before its
  first step (the data, the model and the optimizer, without activations), and the data loader's share of a step:
  the seconds the prefetch thread spends making a batch against the step's seconds (goal: under 5%), and the
  seconds the loop waited for a batch;
- jpeg: igpt decoding the folder into its cache at 32x32 on every core, in images per second per core, against
  PIL's own decode rate (Image.open, load, RGB) of the same files on one core;
- with --torchrun: `igpt train --steps 3` on a .npz and on a JPEG folder, one process and then torchrun with two
  gloo processes: the rows each rank read (disjoint, together the single process's) and the losses (equal).

Prints a table and, with --json, writes the figures there.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from pathlib import Path

import numpy as np

from common import machine
from igpt.data.cache import cores

FULL_TRAIN = 1_281_167
FULL_VAL = 50_000
SIDE = 32
BLOCK = 8192  # images generated and written at a time
TINY_RUN = ["--model", "tiny", "--palette", "openai", "--batch-size", "64", "--eval-batches", "2", "--device", "cpu"]


# ---- synthetic data ----------------------------------------------------------------------------------
def smooth_images(n: int, height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """(n, height, width, 3) uint8: a 4x4 grid of colours (a random brightness, tinted a little, as most colours of
    photographs are) bilinearly stretched, plus noise of 2 levels. 45,000 of them at 32x32 hold 2.5 million
    distinct colours; CIFAR-10's 45,000 training JPEGs decoded hold 1.6 million."""
    brightness = rng.uniform(0, 255, (n, 4, 4, 1))
    grid = (brightness + rng.normal(0, 20, (n, 4, 4, 3))).astype(np.float32)

    def stretch(axis_size: int) -> tuple[np.ndarray, np.ndarray]:
        x = np.linspace(0, 3, axis_size)
        low = np.minimum(np.floor(x).astype(int), 2)
        return low, (x - low).astype(np.float32)

    (r0, fr), (c0, fc) = stretch(height), stretch(width)
    rows = grid[:, r0] * (1 - fr)[None, :, None, None] + grid[:, r0 + 1] * fr[None, :, None, None]
    image = rows[:, :, c0] * (1 - fc)[None, None, :, None] + rows[:, :, c0 + 1] * fc[None, None, :, None]
    return np.clip(np.rint(image + rng.normal(0, 2, image.shape)), 0, 255).astype(np.uint8)


def write_batch(path: Path, count: int, rng: np.random.Generator) -> None:
    """One batch file as np.savez writes it (a stored zip of data.npy and labels.npy), a block of rows at a time."""
    header = {"descr": "|u1", "fortran_order": False, "shape": (count, 3 * SIDE * SIDE)}
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
        with archive.open("data.npy", "w", force_zip64=True) as member:
            np.lib.format.write_array_header_2_0(member, header)
            for start in range(0, count, BLOCK):
                images = smooth_images(min(BLOCK, count - start), SIDE, SIDE, rng)
                member.write(images.transpose(0, 3, 1, 2).reshape(len(images), -1).tobytes())
        with archive.open("labels.npy", "w") as member:
            np.lib.format.write_array(member, rng.integers(1, 1001, count).astype(np.int64))


def write_release(folder: Path, images: int, val: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    counts = np.diff(np.linspace(0, images, 11).round().astype(int))
    for k, count in enumerate(counts, 1):
        write_batch(folder / f"train_data_batch_{k}.npz", int(count), rng)
    write_batch(folder / "val_data.npz", val, rng)


def write_jpegs(folder: Path, count: int, size: tuple[int, int], classes: int = 10) -> None:
    from PIL import Image

    rng = np.random.default_rng(1)
    for start in range(0, count, 256):
        for i, image in enumerate(smooth_images(min(256, count - start), size[1], size[0], rng), start):
            target = folder / f"c{i % classes}" / f"{i:07d}.JPEG"
            target.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(target, quality=90)


def write_npz(path: Path, count: int, side: int) -> None:
    rng = np.random.default_rng(2)
    np.savez(path, x_train=smooth_images(count, side, side, rng), y_train=rng.integers(0, 10, count))


# ---- resident memory of a process tree ----------------------------------------------------------------
def _kilobytes(path: str) -> dict[str, int]:
    """The `Name: N kB` lines of a /proc file, in bytes."""
    try:
        with open(path) as f:
            fields = (line.split(":", 1) for line in f if line.rstrip().endswith("kB"))
            return {name: int(value.split()[0]) * 1024 for name, value in fields}
    except OSError:
        return {}


def _status(pid: int) -> dict[str, int]:
    return _kilobytes(f"/proc/{pid}/status")


def _tree(pid: int) -> list[int]:
    pids, todo = [], [pid]
    while todo:
        p = todo.pop()
        pids.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo += [int(c) for c in f.read().split()]
        except OSError:
            pass
    return pids


class PeakMemory:
    """Samples the resident memory of `pid` and its descendants every `every` seconds: the sum of their proportional
    set sizes (a page shared by k processes counts 1/k in each, so forked workers' shared pages count once), in all
    and of anonymous pages (not the page cache of files they map)."""

    def __init__(self, pid: int, every: float = 0.1):
        self.pid, self.every, self.total, self.anonymous = pid, every, 0, 0
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while not self.done.wait(self.every):
            sizes = [_kilobytes(f"/proc/{p}/smaps_rollup") for p in _tree(self.pid)]
            self.total = max(self.total, sum(s.get("Pss", 0) for s in sizes))
            self.anonymous = max(self.anonymous, sum(s.get("Pss_Anon", 0) for s in sizes))

    def stop(self) -> dict:
        self.done.set()
        self.thread.join()
        return {"peak_pss_bytes": self.total, "peak_anonymous_pss_bytes": self.anonymous}


def run_phase(args, phase: str, *extra: str, env: dict | None = None) -> dict:
    """Run this script's `phase` in a fresh process; its last stdout line is its JSON result."""
    command = [sys.executable, __file__, "--phase", phase, "--workdir", str(args.workdir), *extra]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=env or phase_env(args))
    memory = PeakMemory(process.pid)
    out, _ = process.communicate()
    peaks = memory.stop()
    if process.returncode != 0:
        sys.exit(f"the {phase} phase failed (exit {process.returncode})")
    return {**json.loads(out.strip().splitlines()[-1]), **peaks}


def phase_env(args) -> dict:
    return {**os.environ, "IGPT_CACHE": str(args.workdir / "cache")}


# ---- phases (each in its own process) --------------------------------------------------------------
def phase_build(workdir: Path) -> dict:
    from igpt import Palette, data

    palette, start = Palette.openai(), time.perf_counter()
    rows = {split: len(data.load_tokens("imagenet32", split, SIDE, palette, data_dir=workdir / "imagenet32"))
            for split in ("train", "val")}
    seconds = time.perf_counter() - start
    status = _status(os.getpid())
    return {"seconds": seconds, "rows": rows, "token_bytes": sum(rows.values()) * SIDE * SIDE * 2,
            "cores": cores(), "main_process_peak_rss_bytes": status.get("VmHWM", 0)}


def phase_train(workdir: Path, steps: int, grad_accum: int) -> dict:
    """`igpt train` in this process, with the loop's pieces timed: the batch maker, the wait for it, the step."""
    from igpt import batches, cli, train

    timed = {"batch": [], "wait": [], "step": []}

    def timing(name, fn):
        def timed_call(*a, **k):
            start = time.perf_counter()
            result = fn(*a, **k)
            timed[name].append(time.perf_counter() - start)
            return result
        return timed_call

    batches.Batches.__call__ = timing("batch", batches.Batches.__call__)
    batches.Prefetcher.get = timing("wait", batches.Prefetcher.get)
    step = timing("step", train.Trainer._optimizer_step)
    before = {}

    def first_step_seen(*a, **k):  # the memory of the data, the model and the optimizer, before any activation
        before.setdefault("status", _status(os.getpid()))
        return step(*a, **k)

    train.Trainer._optimizer_step = first_step_seen
    flags = ["train", "--data", "imagenet32", "--data-dir", str(workdir / "imagenet32"), "--resolution", str(SIDE),
             *TINY_RUN, "--steps", str(steps), "--grad-accum", str(grad_accum), "--eval-every", str(steps),
             "--sample-every", str(10**9),
             "--out", str(workdir / "run")]
    if cli.main(flags) != 0:
        sys.exit("igpt train failed")
    seconds = sum(timed["step"]) + sum(timed["wait"])
    status, first = _status(os.getpid()), before["status"]
    return {"steps": len(timed["step"]), "step_seconds": seconds / len(timed["step"]),
            "batch_seconds": float(np.mean(timed["batch"])), "loader_share": sum(timed["batch"]) / seconds,
            "wait_share": sum(timed["wait"]) / seconds, "main_process_peak_rss_bytes": status.get("VmHWM", 0),
            "rss_before_the_first_step_bytes": first.get("VmRSS", 0),
            "anonymous_before_the_first_step_bytes": first.get("RssAnon", 0),
            "resident_file_bytes_at_the_end": status.get("RssFile", 0)}


def phase_jpeg(workdir: Path, pil_files: int) -> dict:
    from PIL import Image

    from igpt import data
    from igpt.data.folders import load_folder

    folder = workdir / "jpegs"
    start = time.perf_counter()
    images = data.load(str(folder), "train", SIDE)
    igpt_seconds = time.perf_counter() - start
    files = load_folder(folder).splits["train"].names[:pil_files]
    start = time.perf_counter()
    for name in files:
        with Image.open(folder / name) as image:
            image.convert("RGB").load()
    pil_seconds = time.perf_counter() - start
    return {"images": len(images), "cores": cores(), "igpt_images_per_s": len(images) / igpt_seconds,
            "igpt_images_per_s_per_core": len(images) / igpt_seconds / cores(),
            "pil_images_per_s_per_core": len(files) / pil_seconds, "pil_files": len(files)}


def phase_rank_train(record: Path, flags: list[str]) -> dict:
    """`igpt train` (under torchrun or not), writing the dataset rows this process read at each step to `record`."""
    from igpt import batches, cli

    read = {}
    make = batches.Batches.__call__

    def recording(self, step):
        rows = self.indices(step)
        read[step] = (rows if self.held is None else rows[self.held]).tolist()
        return make(self, step)

    batches.Batches.__call__ = recording
    code = cli.main(flags)
    rank = os.environ.get("RANK", "0")
    (record / f"rows-{rank}.json").write_text(json.dumps(read))
    return {"exit": code}


def torchrun_check(args, name: str, data_flags: list[str]) -> dict:
    """One process against two gloo processes on the same data: rows read per rank, and losses."""
    from igpt.checkpoint import RunFolder

    results = {}
    for world in (1, 2):
        run, record = args.workdir / f"{name}-{world}", args.workdir / f"{name}-{world}-rows"
        record.mkdir(parents=True, exist_ok=True)
        flags = ["train", *data_flags, *TINY_RUN, "--n-layer", "2", "--n-embd", "32", "--n-head", "2",
                 "--batch-size", "16", "--steps", "3", "--eval-every", "3", "--sample-every", "3", "--out", str(run)]
        launcher = [sys.executable] if world == 1 else [
            sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29617"]
        done = subprocess.run([*launcher, __file__, "--phase", "rank-train", "--workdir", str(args.workdir),
                               "--record", str(record), "--", *flags], env={**phase_env(args), "OMP_NUM_THREADS": "1"},
                              capture_output=True, text=True)
        if done.returncode != 0:
            sys.exit(f"the torchrun check on {name} failed:\n{done.stderr[-3000:]}")
        rows = [json.loads(p.read_text()) for p in sorted(record.glob("rows-*.json"))]
        losses = [r["loss"] for r in RunFolder(run).metrics() if "loss" in r]
        results[world] = rows, losses
    (single,), single_losses = results[1]
    (rank0, rank1), dual_losses = results[2]
    disjoint = all(not set(rank0[s]) & set(rank1[s]) and sorted(rank0[s] + rank1[s]) == sorted(single[s])
                   for s in single)
    difference = max(abs(a - b) / abs(a) for a, b in zip(single_losses, dual_losses))
    return {"steps": len(single), "disjoint_rows_union_is_the_batch": disjoint, "rows_per_rank": len(rank0["0"]),
            "max_relative_loss_difference": difference,
            "losses_match": difference < 1e-5 and len(dual_losses) == len(single_losses) == 3}


# ---- the driver -------------------------------------------------------------------------------------------
def needed_bytes(args) -> int:
    images = args.images + args.val
    release, tokens = images * 3 * SIDE * SIDE, images * SIDE * SIDE * 2
    return int(1.1 * (release + tokens + args.jpegs * 40_000 + args.jpegs * 3 * SIDE * SIDE))


def table(summary: dict) -> str:
    gb = 1e9  # the goals are in GB
    b, t, j = summary["build"], summary["train"], summary["jpeg"]
    lines = [
        ("synthetic imagenet32", f"{summary['images']:,} train + {summary['val']:,} val images, {SIDE}x{SIDE}"),
        ("token cache build", f"{b['seconds']:.1f} s for {sum(b['rows'].values()):,} images "
                              f"({b['token_bytes'] / gb:.2f} GB of tokens) on {b['cores']} cores"),
        ("  peak memory, building", f"{b['peak_pss_bytes'] / gb:.2f} GB, all processes (anonymous "
                                    f"{b['peak_anonymous_pss_bytes'] / gb:.2f} GB); main process peak RSS "
                                    f"{b['main_process_peak_rss_bytes'] / gb:.2f} GB"),
        (f"train tiny, {t['steps']} steps", f"{t['step_seconds']:.3f} s a step (batch 64, --grad-accum "
                                            f"{summary['grad_accum']})"),
        ("  peak RSS, training", f"{t['main_process_peak_rss_bytes'] / gb:.2f} GB (goal < 2 GB); before the first "
                                 f"step {t['rss_before_the_first_step_bytes'] / gb:.2f} GB; file pages at the end "
                                 f"{t['resident_file_bytes_at_the_end'] / gb:.2f} GB"),
        ("  loader share of a step", f"{100 * t['loader_share']:.2f}% making batches "
                                     f"({t['batch_seconds'] * 1e3:.2f} ms each; goal < 5%), "
                                     f"{100 * t['wait_share']:.2f}% waiting for them"),
        (f"JPEG folder ({j['images']:,} images)", f"igpt {j['igpt_images_per_s_per_core']:.0f} images/s per core "
                                                   f"({j['igpt_images_per_s']:.0f}/s on {j['cores']} cores) against "
                                                   f"PIL's decode {j['pil_images_per_s_per_core']:.0f}/s on one core"),
    ]
    for name, check in summary.get("torchrun", {}).items():
        lines.append((f"torchrun 2 gloo, {name}", f"disjoint rows {check['disjoint_rows_union_is_the_batch']}, "
                                                  f"losses match {check['losses_match']} "
                                                  f"(max relative difference "
                                                  f"{check['max_relative_loss_difference']:.1e})"))
    width = max(len(name) for name, _ in lines)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=FULL_TRAIN, help="training images (full: 1,281,167)")
    parser.add_argument("--val", type=int, default=None, help="val_data images (default: 50,000 scaled with --images)")
    parser.add_argument("--jpegs", type=int, default=50_000)
    parser.add_argument("--jpeg-size", default="500x375", help="WIDTHxHEIGHT of each JPEG")
    parser.add_argument("--pil-files", type=int, default=5000, help="files PIL decodes for its rate")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--grad-accum", type=int, default=4, help="micro-batches per step of the training phase "
                        "(batch 64 in quarters: the activations of 64 images of 1,024 pixels at once, not the data, "
                        "take about the goal's 2 GB)")
    parser.add_argument("--torchrun", action="store_true", help="also the two-process gloo checks")
    parser.add_argument("--workdir", type=Path, default=None, help="where to make the scratch folder (default: the "
                        "system's temporary folder)")
    parser.add_argument("--keep", action="store_true", help="keep the synthetic data and caches")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--phase", help=argparse.SUPPRESS)
    parser.add_argument("--record", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("rest", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase:
        phases = {"build": lambda: phase_build(args.workdir),
                  "train": lambda: phase_train(args.workdir, args.steps, args.grad_accum),
                  "jpeg": lambda: phase_jpeg(args.workdir, args.pil_files),
                  "rank-train": lambda: phase_rank_train(args.record, args.rest)}
        print(json.dumps(phases[args.phase]()))
        return
    args.val = args.val or max(100, round(FULL_VAL * args.images / FULL_TRAIN))
    place = args.workdir or Path(tempfile.gettempdir())
    free = shutil.disk_usage(place).free
    if free < needed_bytes(args):
        sys.exit(f"{place} has {free / 1e9:.1f} GB free; this run writes about {needed_bytes(args) / 1e9:.1f} "
                 "GB: free space, or pass --workdir elsewhere or fewer --images and --jpegs")
    args.workdir = Path(tempfile.mkdtemp(prefix="igpt-data-scale-", dir=place))
    try:
        summary = measure(args)
    finally:
        if args.keep:
            print(f"kept {args.workdir}")
        else:
            shutil.rmtree(args.workdir, ignore_errors=True)
    print(table(summary))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")


def measure(args) -> dict:
    summary = {"machine": machine(), "cores": cores(), "images": args.images, "val": args.val,
               "grad_accum": args.grad_accum}
    start = time.perf_counter()
    write_release(args.workdir / "imagenet32", args.images, args.val)
    print(f"wrote the synthetic imagenet32 in {time.perf_counter() - start:.0f} s", flush=True)
    summary["build"] = run_phase(args, "build")
    print(f"built the token cache in {summary['build']['seconds']:.0f} s", flush=True)
    summary["train"] = run_phase(args, "train", "--steps", str(args.steps), "--grad-accum", str(args.grad_accum))
    width, height = map(int, args.jpeg_size.split("x"))
    write_jpegs(args.workdir / "jpegs", args.jpegs, (width, height))
    summary["jpeg"] = run_phase(args, "jpeg", "--pil-files", str(args.pil_files))
    if args.torchrun:
        write_npz(args.workdir / "small.npz", 600, 8)
        write_jpegs(args.workdir / "small-jpegs", 400, (24, 24))
        summary["torchrun"] = {
            name: torchrun_check(args, name, flags) for name, flags in (
                ("npz", ["--data", str(args.workdir / "small.npz"), "--resolution", "8"]),
                ("folder", ["--data", str(args.workdir / "small-jpegs"), "--resolution", "8"]))}
    return summary


if __name__ == "__main__":
    main()
