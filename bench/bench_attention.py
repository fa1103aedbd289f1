"""Attention patterns side by side: training and sampling speed, memory and scaling of dense, local and strided.

    python bench/bench_attention.py [--model tiny] [--layers L] [--width D] [--heads H] [--vocab V]
                                    [--window-rows 1 2] [--train SIDE:BATCH ...] [--sample SIDE:BATCH ...]
                                    [--full] [--repeat 3] [--sample-repeat 3] [--quick] [--device cpu|cuda]
                                    [--json PATH]

Every pattern has the same width, depth and block weights (the `tiny` preset unless told):
dense-1d (the paper, the reference row), then with 2-D positions dense, local with each
--window-rows R, and strided. Ratios are to dense with 2-D positions, so that only the
attention differs; all of them come from one run.

Training (--train, default 16:16 32:4 48:2 64:1, side:batch, about 4,096 tokens a step): tokens/s
of igpt.train.train_step (fp32, forward + backward + clipping + fused AdamW from
igpt.train.make_optimizer) on random tokens. Each configuration runs in a process of its own
(an internal --_one flag), all of a resolution's processes alive together, and one step of each
is timed in turns, inside its process and after a short pause (`settle`), so the patterns share
the VM's drift and the best of --repeat counts. Peak memory is that process's peak resident set (VmHWM, reset through
/proc/self/clear_refs after the imports and one 4x4 step that pages in the code every step
runs), less what it held then: weights, gradients, AdamW's state, activations and the
allocator's slack, everything the step needs, as the operating system counts it. Why this
way: on a CPU torch keeps no allocator statistics; tracemalloc does not see torch's
allocations; torch.profiler's memory view adds up allocations per operator, not the
simultaneous peak; and ru_maxrss carries the parent's peak over fork and exec, so a fresh
process's own high-water mark is the honest figure. (CUDA: torch.cuda.max_memory_allocated.)
Model FLOPs per token are 6 N + 12 L d x (keys a query attends, averaged over positions and
layers) for each pattern (bench/common.py pattern_train_flops_per_token), against the fp32
matmul peak measured in the same run.

Sampling (--sample, default 16:8 32:8 32:64 64:8; --full adds 64:64, for the 64x64 goal: dense then reads
about 1 GB of keys and values a step, minutes a run, so count on half an hour more, or less with --sample-repeat 1):
images/s of igpt.sample.sample (its default step: igpt's decode kernel on CPUs) on random weights, all patterns in
turns, best of --sample-repeat. Its floor is the bytes every pixel step must read, the decode
weights plus the keys and values the pattern reads at that position in every layer, at the
read bandwidth this run measures for a working set of that size (torch.sum over a tensor of it:
the caches where it fits, memory beyond), summed over the image's steps. "of floor" is the
floor's time over the measured time; "above" is what is left per step above it (the per-step
cost of the many small operations that the floor does not count).

Scaling: time per image against n = side^2 for each pattern, and the exponent of a least-squares
line through log time against log n, for training and for each sampling batch measured at two
sides or more. The summary checks the issue's goals (64x64: local R=2 trains >= 3x faster than
dense and samples >= 5x faster at batch 64; 32x32: local samples >= 1.5x faster at batch 64)
and says "not measured" for a setting the run left out.

--quick: 8x8 and 12x12, batch 2, one repeat: to check the script. The defaults take minutes,
most of them dense's steps at 64x64. Run it when nothing else does: with other processes busy,
torch's threads wait on each other and steps run several times slower, and noisier.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import numpy as np
import torch

from common import (add_device_options, band_kernel_state, best_of, machine, matmul_peak,
                    pattern_train_flops_per_token, peak_memory, read_bandwidth, reset_peak_memory, result_row, step_bytes,
                    synchronize, write_json)
from igpt.batches import Batch
from igpt.decoding import Decoder
from igpt.distributed import World
from igpt.model import PRESETS, ImageGPT, ImageGPTConfig, num_params
from igpt.sample import sample
from igpt.train import make_optimizer, train_step

TRAIN = ("16:16", "32:4", "48:2", "64:1")
SAMPLE = ("16:8", "32:8", "32:64", "64:8")
FULL = ("64:64",)
QUICK = ("8:2", "12:2")
REFERENCE = "dense"  # ratios are to dense attention with 2-D positions: only the attention differs
GOAL_LOCAL = "local R=2"
GOALS = (  # (what, side, batch or None for training, at least, the issue's words)
    ("train", 64, None, 3.0, "at 64x64, local (R=2) trains >= 3x faster than dense"),
    ("sample", 64, 64, 5.0, "at 64x64, local (R=2) samples >= 5x faster than dense at batch 64"),
    ("sample", 32, 64, 1.5, "at 32x32, local (R=2) samples >= 1.5x faster than dense at batch 64"),
)
MiB = 2**20


@dataclass(frozen=True)
class Variant:
    name: str
    positions: str
    attention: str
    window_rows: int = 2

    def config(self, dims: dict, side: int) -> ImageGPTConfig:
        return ImageGPTConfig(vocab_size=dims["vocab"], n_ctx=side * side, n_layer=dims["n_layer"],
                              n_embd=dims["n_embd"], n_head=dims["n_head"], positions=self.positions,
                              attention=self.attention, window_rows=self.window_rows)


def patterns(window_rows: list[int]) -> list[Variant]:
    return [Variant("dense-1d", "1d", "dense"), Variant("dense", "2d", "dense"),
            *(Variant(f"local R={r}", "2d", "local", r) for r in window_rows), Variant("strided", "2d", "strided")]


def setting(text: str) -> tuple[int, int]:
    try:
        side, batch = (int(part) for part in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected SIDE:BATCH such as 32:8, got {text!r}") from None
    if side < 2 or batch < 1:
        raise argparse.ArgumentTypeError(f"side must be >= 2 and batch >= 1, got {text!r}")
    return side, batch


# ---- training: one process per configuration ---------------------------------------------------------
def reply(message: dict) -> None:
    print("@@" + json.dumps(message), flush=True)


def serve_training(spec: dict) -> None:
    """The --_one process: one configuration's training step, run on each command read from stdin.

    Its own process, so its peak memory is its own. It is counted from after one step of the same
    pattern at 4x4, batch 1, which pages in the code and libraries any step touches (resident set
    that is the same for every configuration), so the peak is the configuration's."""
    device = spec["device"]
    pattern, world = Variant(**spec["pattern"]), World(device=torch.device(device))

    def stepper(side: int, rows: int):
        torch.manual_seed(0)
        config = pattern.config(spec["dims"], side)
        model = ImageGPT(config).to(device)
        optimizer = make_optimizer(model.parameters(), lr=1e-3)
        if spec["compile"]:  # as `igpt train --compile`: the optimizer holds the same parameters
            model = torch.compile(model)
        batch = Batch(torch.randint(0, config.vocab_size, (rows, config.n_ctx), device=device))

        def step() -> None:
            train_step(model, optimizer, batch, world=world)
            synchronize(device)

        return step

    stepper(4, 1)()
    held = reset_peak_memory(device)
    step = stepper(spec["side"], spec["batch"])

    reply({"ready": True})
    for line in sys.stdin:
        command = line.strip()
        if command == "warm":  # the first step allocates AdamW's state; the second runs as all later ones
            step()
            step()
            reply({})
        elif command == "step":
            start = time.perf_counter()
            step()
            reply({"seconds": time.perf_counter() - start})
        elif command == "done":
            reply({"peak_bytes": peak_memory(device) - held})
            return


class Worker:
    """A --_one process seen from the benchmark: ask it to warm up, to step, and for its peak memory."""

    def __init__(self, name: str, spec: dict):
        self.name = name
        self.errors = tempfile.TemporaryFile(mode="w+")
        self.process = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--_one", json.dumps(spec)],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.errors, text=True)

    def answer(self) -> dict:
        for line in self.process.stdout:
            if line.startswith("@@"):
                return json.loads(line[2:])
        self.process.wait()
        self.errors.seek(0)
        tail = "".join(self.errors.readlines()[-15:])
        raise RuntimeError(f"the training process for {self.name} stopped (exit {self.process.returncode}):\n{tail}")

    def ask(self, command: str) -> dict:
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()
        return self.answer()

    def step(self) -> float:
        """Seconds of one training step, timed inside the worker."""
        return self.ask("step")["seconds"]

    def finish(self) -> int:
        peak = self.ask("done")["peak_bytes"]
        self.process.wait()
        return peak

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def settle() -> None:
    """Let the last worker's OpenMP threads stop spinning before the next one steps.

    After a parallel region PyTorch's OpenMP threads busy-wait for a while, and on two cores the
    next process's step starts beside them; a short step loses the most. A pause outside the
    timing gives each configuration the machine to itself, as in a training run."""
    time.sleep(0.2)


def train_side(side: int, batch: int, pats: list[Variant], dims: dict, device: str, repeat: int,
               peak: float, compile: bool = False) -> list[dict]:
    """Every pattern at one resolution: tokens/s (best of `repeat` steps, taken in turns) and peak memory."""
    workers = {}
    try:
        for p in pats:  # imports run side by side; the warm-ups one at a time
            workers[p.name] = Worker(p.name, {"pattern": vars(p), "dims": dims, "side": side, "batch": batch,
                                              "device": device, "compile": compile})
        for worker in workers.values():
            worker.answer()  # ready
        for worker in workers.values():
            worker.ask("warm")
        best = best_of({name: worker.step for name, worker in workers.items()}, repeat, pause=settle, own_time=True)
        peaks = {name: worker.finish() for name, worker in workers.items()}
    finally:
        for worker in workers.values():
            worker.kill()
    rows = []
    for p in pats:
        config = p.config(dims, side)
        tokens_per_s = batch * config.n_ctx / best[p.name]
        flops = pattern_train_flops_per_token(config)
        rows.append({"side": side, "n": config.n_ctx, "batch": batch, "pattern": p.name, "seconds": best[p.name],
                     "seconds_per_image": best[p.name] / batch, "tokens_per_s": tokens_per_s,
                     "peak_bytes": peaks[p.name], "flops_per_token": flops, "mfu": tokens_per_s * flops / peak})
    dense = next(r for r in rows if r["pattern"] == REFERENCE)
    for r in rows:
        r["speed_vs_dense"] = r["tokens_per_s"] / dense["tokens_per_s"]
        r["memory_vs_dense"] = r["peak_bytes"] / dense["peak_bytes"] if dense["peak_bytes"] > 0 else None
    return rows


# ---- sampling -------------------------------------------------------------------------------------------
def random_model(p: Variant, dims: dict, side: int, device: str) -> ImageGPT:
    torch.manual_seed(0)
    model = ImageGPT(p.config(dims, side)).to(device).eval()
    with torch.no_grad():
        model.head.weight.normal_(0, 0.02)  # a zero head would make every pixel uniform noise
    return model


def warm(model: ImageGPT, batch: int) -> None:
    """The decoding path once (the empty prefix and three steps), outside the timings."""
    decoder = Decoder(model, batch)
    logits = decoder.feed(None)
    for _ in range(3):
        logits = decoder.feed(logits.argmax(-1)[:, None])


class Bandwidth:
    """Read bandwidth against working-set size, measured once on a grid of powers of two and interpolated."""

    def __init__(self, largest: float, device: str, repeat: int):
        top = int(np.clip(np.ceil(np.log2(max(largest, 2**20))), 20, 29))  # beyond 512 MiB, memory's rate holds
        self.sizes = np.array([2**k for k in range(20, top + 1)], dtype=float)
        self.rates = np.array([read_bandwidth(int(size), device, repeat) for size in self.sizes])

    def __call__(self, nbytes: np.ndarray) -> np.ndarray:
        return np.interp(np.log2(nbytes), np.log2(self.sizes), self.rates)

    @property
    def memory(self) -> float:
        return float(self.rates[-1])


def sample_setting(side: int, batch: int, pats: list[Variant], dims: dict, device: str, repeat: int,
                   bandwidth: Bandwidth) -> list[dict]:
    models = {p.name: random_model(p, dims, side, device) for p in pats}
    for model in models.values():
        warm(model, batch)

    def run(model: ImageGPT):
        return lambda: (sample(model, batch, generator=torch.Generator(device).manual_seed(0)), synchronize(device))

    best = best_of({name: run(model) for name, model in models.items()}, repeat)
    rows = []
    for name, model in models.items():
        n = model.config.n_ctx
        reads = step_bytes(model.config, batch, model.wte.weight.element_size())
        floor = float((reads / bandwidth(reads)).sum())
        rows.append({"side": side, "n": n, "batch": batch, "pattern": name, "seconds": best[name],
                     "seconds_per_image": best[name] / batch, "images_per_s": batch / best[name],
                     "ms_per_step": 1e3 * best[name] / n, "floor_seconds": floor, "floor_ms_per_step": 1e3 * floor / n,
                     "of_floor": floor / best[name], "above_floor_ms_per_step": 1e3 * (best[name] - floor) / n,
                     "bytes_per_step": float(reads.mean())})
    dense = next(r for r in rows if r["pattern"] == REFERENCE)
    for r in rows:
        r["speed_vs_dense"] = r["images_per_s"] / dense["images_per_s"]
    return rows


# ---- scaling and the goals ------------------------------------------------------------------------------
def exponent(rows: list[dict]) -> float | None:
    """Slope of the least-squares line through log(seconds per image) against log(n); None with fewer than two n."""
    if len({r["n"] for r in rows}) < 2:
        return None
    return float(np.polyfit(np.log([r["n"] for r in rows]), np.log([r["seconds_per_image"] for r in rows]), 1)[0])


def goal_value(what: str, side: int, batch: int | None, training: list[dict], sampling: list[dict]) -> float | None:
    rows = training if what == "train" else sampling
    for r in rows:
        if r["side"] == side and r["pattern"] == GOAL_LOCAL and (batch is None or r["batch"] == batch):
            return r["speed_vs_dense"]
    return None


# ---- printing ---------------------------------------------------------------------------------------
def fmt(value, spec: str, missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


def print_training(rows: list[dict]) -> None:
    for r in rows:
        memory = r["peak_bytes"] / MiB
        print(f"  {r['side']:3d}x{r['side']:<3d} {r['batch']:5d}  {r['pattern']:10s} {r['tokens_per_s']:10,.0f} "
              f"{r['speed_vs_dense']:7.2f}x {1e3 * r['seconds']:9.1f} {memory:9.1f} "
              f"{fmt(r['memory_vs_dense'], '7.2f')}x {r['flops_per_token'] / 1e6:10.2f} {r['mfu']:8.0%}", flush=True)


def print_sampling(rows: list[dict]) -> None:
    for r in rows:
        print(f"  {r['side']:3d}x{r['side']:<3d} {r['batch']:5d}  {r['pattern']:10s} {r['images_per_s']:9.2f} "
              f"{r['speed_vs_dense']:7.2f}x {r['ms_per_step']:8.2f} {r['floor_ms_per_step']:9.2f} "
              f"{r['of_floor']:8.0%} {r['above_floor_ms_per_step']:8.2f} {r['bytes_per_step'] / MiB:9.1f}", flush=True)


def print_scaling(title: str, rows: list[dict], pats: list[Variant]) -> dict[str, float | None]:
    ns = sorted({r["n"] for r in rows})
    print(f"  {title:24s}" + "".join(f"{f'n={n}':>10s}" for n in ns) + "   exponent")
    fitted = {}
    for p in pats:
        mine = [r for r in rows if r["pattern"] == p.name]
        by_n = {r["n"]: r["seconds_per_image"] for r in mine}
        fitted[p.name] = exponent(mine)
        print(f"    {p.name:22s}" + "".join(f"{fmt(by_n.get(n), '10.4f'):>10s}" for n in ns)
              + f"   {fmt(fitted[p.name], '8.2f')}")
    return fitted


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny", choices=list(PRESETS), help="width, depth and heads (default: tiny)")
    parser.add_argument("--layers", type=int, default=None, help="depth (default: the preset's)")
    parser.add_argument("--width", type=int, default=None, help="width (default: the preset's)")
    parser.add_argument("--heads", type=int, default=None, help="heads (default: the preset's)")
    parser.add_argument("--vocab", type=int, default=512)
    parser.add_argument("--window-rows", type=int, nargs="+", default=[1, 2], help="local attention's R values")
    parser.add_argument("--train", type=setting, nargs="*", default=None, metavar="SIDE:BATCH",
                        help=f"training resolutions and batches (default: {' '.join(TRAIN)}; none: no training)")
    parser.add_argument("--sample", type=setting, nargs="*", default=None, metavar="SIDE:BATCH",
                        help=f"sampling resolutions and batches (default: {' '.join(SAMPLE)}; none: no sampling)")
    parser.add_argument("--full", action="store_true",
                        help=f"also sample {' '.join(FULL)} (the 64x64 batch-64 goal; dense takes minutes a run: "
                        "about half an hour more)")
    parser.add_argument("--repeat", type=int, default=3, help="timed training steps per configuration, in turns")
    parser.add_argument("--sample-repeat", type=int, default=3, help="timed sampling runs per configuration, in turns")
    parser.add_argument("--quick", action="store_true", help=f"{' and '.join(QUICK)} (side:batch), one repeat: "
                        "checks the script in under a minute")
    parser.add_argument("--compile", action="store_true", help="training: torch.compile each model first, as "
                        "`igpt train --compile` (fuses the element-wise operations that a local step is left with)")
    parser.add_argument("--_one", default=None, help=argparse.SUPPRESS)  # internal: one training configuration
    add_device_options(parser)
    return parser.parse_args()


def settings(args: argparse.Namespace) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """The (side, batch) settings to train and to sample; --quick also cuts the repeats to one."""
    if args.quick:
        args.repeat = args.sample_repeat = 1
    train = args.train if args.train is not None else [setting(s) for s in (QUICK if args.quick else TRAIN)]
    samples = args.sample if args.sample is not None else [setting(s) for s in (QUICK if args.quick else SAMPLE)]
    if args.full:
        samples += [setting(s) for s in FULL if setting(s) not in samples]
    return train, samples


def print_setup(args: argparse.Namespace, dims: dict, pats: list[Variant], sides: set[int]) -> float:
    """The machine, its load and the model at every side; returns the fp32 matmul peak that MFU is against."""
    print(f"machine: {machine(args.device)}; load average {os.getloadavg()[0]:.2f} at the start")
    if args.device == "cpu":
        print(f"band attention: {band_kernel_state()}")
    if args.device == "cpu" and os.getloadavg()[0] > 0.5 * (os.cpu_count() or 1):
        print("  (other processes are busy here: torch's threads then wait on each other, so every figure "
              "comes out slower and noisier; run it when the machine is quiet)")
    L, d = dims["n_layer"], dims["n_embd"]
    print(f"model: {L} layers x {d}, {dims['n_head']} heads, {args.vocab} colours; block weights 12 L d^2 = "
          f"{12 * L * d * d:,} in every pattern, positions n x d (1d) or 2 x side x d (2d)")
    for side in sorted(sides):
        counts = {p.name: num_params(p.config(dims, side)) for p in pats[:2]}
        print(f"  {side}x{side}: parameters " + ", ".join(f"{name} {count:,}" for name, count in counts.items())
              + " (every 2-D pattern the same)")
    peak = max(matmul_peak(torch.float32, device=args.device) for _ in range(1 if args.quick else 3))
    print(f"fp32 matmul peak: {peak / 1e9:.1f} GFLOP/s (best of {1 if args.quick else 3})")
    return peak


def run_training(args: argparse.Namespace, train: list[tuple[int, int]], pats: list[Variant], dims: dict,
                 peak: float) -> list[dict]:
    print(f"\ntraining: igpt.train.train_step, fp32{', torch.compile' if args.compile else ''}, forward + backward "
          "+ AdamW, random tokens; one process per "
          f"configuration, best of {args.repeat} steps taken in turns")
    print("  side    batch  pattern      tokens/s  x dense   ms/step  peak MiB  x dense  MFLOP/token  of peak")
    training = []
    for side, batch in train:
        rows = train_side(side, batch, pats, dims, args.device, args.repeat, peak, args.compile)
        print_training(rows)
        training += rows
    return training


def run_sampling(args: argparse.Namespace, samples: list[tuple[int, int]], pats: list[Variant],
                 dims: dict) -> tuple[list[dict], Bandwidth]:
    """Every sampling setting, after the read bandwidth its floors are measured against."""
    largest = max(step_bytes(p.config(dims, side), batch, 4).max() for side, batch in samples for p in pats)
    bandwidth = Bandwidth(largest, args.device, repeat=3 if args.quick else 10)
    print(f"\nread bandwidth (torch.sum, best of {3 if args.quick else 10}): "
          + ", ".join(f"{int(s) // MiB} MiB {r / 1e9:.1f}" for s, r in zip(bandwidth.sizes, bandwidth.rates))
          + " GB/s")
    print(f"sampling: igpt.sample.sample, eager, random weights; best of {args.sample_repeat} runs taken in turns; "
          "floor: the bytes each step reads at the bandwidth of that working set")
    print("  side    batch  pattern     images/s  x dense  ms/step  floor ms  of floor  above ms  MiB/step")
    sampling = []
    for side, batch in samples:
        rows = sample_setting(side, batch, pats, dims, args.device, args.sample_repeat, bandwidth)
        print_sampling(rows)
        sampling += rows
    return sampling, bandwidth


def print_exponents(training: list[dict], sampling: list[dict], pats: list[Variant]) -> dict[str, dict]:
    """The scaling table of training and of each sampling batch measured at two sides or more; their exponents."""
    print("\ntime per image (s) against n = side^2; exponent: least squares on log time against log n")
    exponents: dict[str, dict] = {}
    if training:
        exponents["train"] = print_scaling("training", training, pats)
    for batch in sorted({r["batch"] for r in sampling}):
        rows = [r for r in sampling if r["batch"] == batch]
        if len({r["n"] for r in rows}) > 1:
            exponents[f"sample b{batch}"] = print_scaling(f"sampling, batch {batch}", rows, pats)
    return exponents


def print_summary(training: list[dict], sampling: list[dict], exponents: dict[str, dict],
                  pats: list[Variant]) -> None:
    print("\nsummary: speed against dense with 2-D positions (same run; peak memory ratio in brackets)")
    columns = [(f"train {r['side']}^2", "train", r["side"], r["batch"]) for r in training if r["pattern"] == REFERENCE]
    columns += [(f"sample {r['side']}^2/{r['batch']}", "sample", r["side"], r["batch"])
                for r in sampling if r["pattern"] == REFERENCE]
    width = max([16] + [len(c[0]) + 2 for c in columns])
    print(f"  {'pattern':10s}" + "".join(f"{c[0]:>{width}s}" for c in columns)
          + "".join(f"{'exp ' + key:>16s}" for key in exponents))
    for p in pats:
        cells = []
        for _, what, side, batch in columns:
            rows = training if what == "train" else sampling
            r = next(r for r in rows if r["pattern"] == p.name and r["side"] == side and r["batch"] == batch)
            memory = f" ({r['memory_vs_dense']:.2f})" if what == "train" and r["memory_vs_dense"] else ""
            cells.append(f"{r['speed_vs_dense']:.2f}x{memory}")
        print(f"  {p.name:10s}" + "".join(f"{c:>{width}s}" for c in cells)
              + "".join(f"{fmt(fitted[p.name], '.2f'):>16s}" for fitted in exponents.values()))


def check_goals(training: list[dict], sampling: list[dict], pats: list[Variant]) -> list[dict]:
    """Each of the issue's goals met, not met, or not measured (with the flag that measures it)."""
    goals = []
    print("goals (the issue's, on this machine):")
    for what, side, batch, target, words in GOALS:
        value = goal_value(what, side, batch, training, sampling)
        if value is None:
            how = f"--train {side}:1" if what == "train" else f"--sample {side}:{batch}"
            if what == "sample" and f"{side}:{batch}" in FULL:
                how += " or --full"
            if GOAL_LOCAL not in {p.name for p in pats}:
                how = "--window-rows with 2"
            verdict = f"not measured ({how})"
        else:
            verdict = f"{value:.2f}x  {'met' if value >= target else 'NOT met'}"
        print(f"  {words + ':':72s} {verdict}")
        goals.append({"goal": words, "target": target, "measured": value,
                      "met": None if value is None else value >= target})
    return goals


def result_rows(training: list[dict], sampling: list[dict]) -> list[dict]:
    """The rows of the shared results table (bench/gpu_check.py): one per pattern and setting."""
    rows = [result_row(f"train {r['side']}x{r['side']}, {r['pattern']}", tokens_per_s=r["tokens_per_s"],
                       images_per_s=r["tokens_per_s"] / r["n"], mfu=r["mfu"],
                       notes=f"batch {r['batch']}; {r['speed_vs_dense']:.2f}x dense; "
                             f"peak {r['peak_bytes'] / MiB:.0f} MiB")
            for r in training]
    rows += [result_row(f"sample {r['side']}x{r['side']} batch {r['batch']}, {r['pattern']}",
                        tokens_per_s=r["images_per_s"] * r["n"], images_per_s=r["images_per_s"],
                        notes=f"{r['speed_vs_dense']:.2f}x dense; {r['of_floor']:.0%} of the read floor")
             for r in sampling]
    return rows


def main() -> None:
    args = parse_args()
    if args._one is not None:
        serve_training(json.loads(args._one))
        return
    train, samples = settings(args)
    preset = PRESETS[args.model]
    dims = {"vocab": args.vocab, "n_layer": args.layers or preset["n_layer"], "n_embd": args.width or preset["n_embd"],
            "n_head": args.heads or preset["n_head"]}
    pats = patterns(args.window_rows)
    began = time.perf_counter()
    peak = print_setup(args, dims, pats, {s for s, _ in train + samples})

    training: list[dict] = []
    if train:
        training = run_training(args, train, pats, dims, peak)
        print(f"  ({time.perf_counter() - began:.0f} s so far)")
    sampling: list[dict] = []
    bandwidth = None
    if samples:
        sampling, bandwidth = run_sampling(args, samples, pats, dims)
        print(f"  ({time.perf_counter() - began:.0f} s so far)")

    exponents = print_exponents(training, sampling, pats)
    print_summary(training, sampling, exponents, pats)
    goals = check_goals(training, sampling, pats)
    print(f"took {time.perf_counter() - began:.0f} s; load average {os.getloadavg()[0]:.2f} at the end")
    write_json(args.json, "bench_attention", args.device, result_rows(training, sampling), model=dims,
               peak_flops=peak, peak_dtype="fp32",
               bandwidth=None if bandwidth is None else dict(zip(map(int, bandwidth.sizes), bandwidth.rates.tolist())),
               training=training, sampling=sampling, exponents=exponents, goals=goals)


if __name__ == "__main__":
    main()
