"""GPU readiness in one run: the CUDA tests, the GPU benchmarks, a 2-minute CIFAR-10 training and sampling, one table.

    bench/gpu_check.sh CIFAR10_TARBALL [--out DIR]     # a CUDA machine with torch installed: under 8 minutes
    bench/gpu_check.sh --dry-run [DATA] [--out DIR]    # the same steps on the CPU at toy sizes: about 2 minutes

CIFAR10_TARBALL is an image-folder archive (train/<class>/*.jpg, test/<class>/*.jpg), as in
../shared/datasets/cifar10/cifar10-jpeg.tar.gz. The steps, each under its own time cap:

  install       pip install --no-deps -e . (and pytest, hypothesis, transformers where missing), torch untouched
  pytest        pytest -m cuda: CUDA against CPU (tests/test_cuda.py)
  bench_model   forward + backward against Hugging Face, --device cuda
  bench_train   igpt's training step against Hugging Face, --device cuda --compile, bf16
  bench_sample  KV-cached sampling against Hugging Face generate(), --device cuda
  igpt train    bf16 + --compile on the tarball at 32x32, stopped with SIGINT (igpt saves a checkpoint) after 2 minutes
  igpt sample   --compile, from that checkpoint

The caps sum to more than the budget on purpose: a step may take what the earlier ones left,
but the time for training and sampling is set aside from the start, so a slow benchmark
shortens or skips the benchmarks after it, never the run. The table at the end gives, per
step, igpt's tokens/s and images/s, the model FLOPs utilisation against the bf16 matmul peak
bench_model measured (fp32 where bf16 is emulated), and the speed-up over Hugging Face.

Everything the run writes for people goes to --out (default: $OUT when set, else runs/gpu-check):
gpu_check.log (every step's output), bench_*.json, results.json (the table as data),
summary.txt and samples.png: seven files, few enough for tools that return a handful of files
from a remote machine. Checkpoints and caches go to --work (default: a temporary folder).

--dry-run runs the same steps on the CPU at toy sizes, in fp32 and without torch.compile (one
compilation takes longer on a small CPU than all the rest), on DATA (default: the built-in
digits): tests/test_gpu_check.py runs it so the script cannot rot between GPU runs.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
SAVE_SECONDS = 15  # what igpt train gets after its SIGINT to save the checkpoint and exit, at the least
TEST_DEPENDENCIES = {"pytest": "pytest>=7", "hypothesis": "hypothesis>=6", "transformers": "transformers>=4.40"}


@dataclass(frozen=True)
class Sizes:
    """Everything that differs between the GPU run and the dry run."""

    device: str
    precision: str
    compile: bool
    budget: float  # seconds for the whole run
    train_seconds: float  # igpt train gets SIGINT after this long (once it has logged a step)
    bench_model: tuple[str, ...]
    bench_train: tuple[str, ...]
    bench_sample: tuple[str, ...]
    train: tuple[str, ...]
    sample_images: int
    caps: dict[str, float] = field(default_factory=dict)  # seconds at most, per step
    reserved: dict[str, float] = field(default_factory=dict)  # seconds set aside for these steps from the start


GPU = Sizes(
    device="cuda", precision="bf16", compile=True, budget=460, train_seconds=120,
    # mini at 32x32, batch 64, 512 colours throughout: bench_train and igpt train then find the graphs
    # bench_model compiled in torch.compile's cache instead of compiling them again.
    bench_model=("--layers", "8", "--width", "256", "--heads", "8", "--side", "32", "--batch", "64", "--rounds", "4"),
    bench_train=("--resolution", "32", "--model", "mini", "--batch", "64", "--steps", "20", "--precisions", "bf16",
                 "--compile"),
    bench_sample=("--model", "tiny", "--side", "32", "--batches", "64", "--repeat", "2"),
    train=("--resolution", "32", "--model", "mini", "--batch-size", "64"),
    sample_images=64,
    caps={"install": 90, "pytest": 90, "bench_model": 100, "bench_train": 90, "bench_sample": 90,
          "igpt train": 170, "igpt sample": 60},
    reserved={"igpt train": 135, "igpt sample": 50},
)

DRY_RUN = Sizes(
    device="cpu", precision="fp32", compile=False, budget=600, train_seconds=3,
    bench_model=("--layers", "1", "--width", "32", "--heads", "2", "--side", "4", "--batch", "2", "--rounds", "1",
                 "--no-compile"),
    bench_train=("--resolution", "8", "--model", "tiny", "--batch", "8", "--steps", "4", "--precisions", "fp32"),
    bench_sample=("--model", "tiny", "--side", "4", "--batches", "2", "--repeat", "1", "--uncached-pixels", "4",
                  "--no-compile"),
    train=("--resolution", "8", "--n-layer", "1", "--n-embd", "16", "--n-head", "2", "--batch-size", "8"),
    sample_images=4,
    caps={"install": 60, "pytest": 120, "bench_model": 120, "bench_train": 150, "bench_sample": 120,
          "igpt train": 90, "igpt sample": 60},
    reserved={"igpt train": 60, "igpt sample": 40},
)


@dataclass
class Step:
    name: str
    argv: list[str]
    cap: float  # seconds at most
    reserved: float = 0.0  # seconds set aside for this step while the earlier ones run
    json: Path | None = None  # the benchmark's results
    interrupt_after: float | None = None  # send SIGINT after this many seconds, once `ready()` holds
    ready: Callable[[], bool] = lambda: True
    status: str = "not run"
    seconds: float = 0.0
    output: list[str] = field(default_factory=list)


# ---- running the steps -----------------------------------------------------------------------
class Log:
    """Each line both on the console and in gpu_check.log."""

    def __init__(self, path: Path):
        self.file = path.open("w")
        self.lock = threading.Lock()

    def __call__(self, line: str) -> None:
        with self.lock:
            print(line, flush=True)
            self.file.write(line + "\n")
            self.file.flush()


def run_step(step: Step, cap: float, env: dict, log: Log) -> None:
    log(f"\n=== {step.name} (at most {cap:.0f} s): {shlex.join(step.argv)}")
    start = time.monotonic()
    proc = subprocess.Popen(step.argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, errors="replace", start_new_session=True)

    def copy_output():
        for line in proc.stdout:
            step.output.append(line.rstrip("\n"))
            log(line.rstrip("\n"))

    copier = threading.Thread(target=copy_output, daemon=True)
    copier.start()
    interrupt_at = None if step.interrupt_after is None else min(step.interrupt_after, cap - SAVE_SECONDS)
    interrupted = timed_out = False
    while proc.poll() is None:
        elapsed = time.monotonic() - start
        if interrupt_at is not None and not interrupted and elapsed >= interrupt_at and step.ready():
            log(f"--- {step.name}: SIGINT after {elapsed:.0f} s")
            proc.send_signal(signal.SIGINT)
            interrupted = True
        if elapsed >= cap:
            timed_out = True
            stop_group(proc)
            break
        time.sleep(0.2)
    proc.wait()
    copier.join(timeout=10)
    step.seconds = time.monotonic() - start
    if timed_out:
        step.status = f"timed out ({cap:.0f} s)"
    else:
        step.status = "ok" if proc.returncode == 0 else f"failed (exit {proc.returncode})"
    log(f"--- {step.name}: {step.status} in {step.seconds:.0f} s")


def stop_group(proc: subprocess.Popen) -> None:
    """End the step's process and the workers it started (its own process group), politely first."""
    for sig, grace in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
            proc.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue
        except ProcessLookupError:
            return


def run_all(steps: list[Step], deadline: float, env: dict, log: Log) -> None:
    """Each step gets its cap or what is left before the deadline after the time set aside for the later steps."""
    for i, step in enumerate(steps):
        set_aside = sum(later.reserved for later in steps[i + 1:])
        cap = min(step.cap, deadline - time.monotonic() - set_aside)
        if cap < 5:
            step.status = "skipped: out of time"
            log(f"\n=== {step.name}: skipped, {deadline - time.monotonic():.0f} s left of the budget")
            continue
        run_step(step, cap, env, log)


# ---- the plan --------------------------------------------------------------------------------
def install_commands(python: str, work: Path) -> list[list[str]]:
    """pip commands that make igpt (this checkout) and the test dependencies importable, or none.

    --no-build-isolation: GPU machines often have no network, and setuptools is there already.
    A constraint pins torch, so pip never replaces the machine's CUDA build.
    """
    found = subprocess.run([python, "-c", "import igpt, sys; print(igpt.__file__)"], capture_output=True, text=True)
    here = found.returncode == 0 and Path(found.stdout.strip()).resolve().is_relative_to(REPO / "src")
    missing = [requirement for module, requirement in TEST_DEPENDENCIES.items()
               if subprocess.run([python, "-c", f"import {module}"], capture_output=True).returncode != 0]
    torch_version = subprocess.run([python, "-c", "import torch; print(torch.__version__)"], capture_output=True,
                                   text=True).stdout.strip()
    constraints = work / "constraints.txt"
    constraints.write_text(f"torch=={torch_version}\n" if torch_version else "")
    pip = [python, "-m", "pip", "install", "--quiet", "--constraint", str(constraints)]
    commands = [] if here else [pip + ["--no-deps", "--no-build-isolation", "--editable", str(REPO)]]
    return commands + ([pip + missing] if missing else [])


def has_logged_a_step(run: Path) -> Callable[[], bool]:
    return lambda: any("loss" in record for record in read_metrics(run))


def plan(data: str, sizes: Sizes, python: str, out: Path, work: Path, install: bool) -> list[Step]:
    run, caps = work / "run", sizes.caps
    device = ("--device", sizes.device)
    igpt = [python, "-m", "igpt.cli"]
    steps = []
    commands = install_commands(python, work) if install else []
    if commands:
        script = " && ".join(shlex.join(command) for command in commands)
        steps.append(Step("install", ["sh", "-c", script], caps["install"]))
    steps.append(Step("pytest -m cuda", [python, "-m", "pytest", "-m", "cuda", "-p", "no:cacheprovider", "-rs",
                                         str(REPO / "tests")], caps["pytest"]))
    for name in ("bench_model", "bench_train", "bench_sample"):
        extra = ("--data", data) if name == "bench_train" else ()
        argv = [python, str(BENCH / f"{name}.py"), *getattr(sizes, name), *extra, *device,
                "--json", str(out / f"{name}.json")]
        steps.append(Step(name, argv, caps[name], json=out / f"{name}.json"))
    compiled = ("--compile",) if sizes.compile else ()
    never = "1000000"  # steps between evaluations, checkpoints and sample grids: none before the SIGINT
    train = [*igpt, "train", "--data", data, *sizes.train, "--steps", never, "--precision", sizes.precision,
             *compiled, *device, "--eval-every", never, "--save-every", never, "--sample-every", never,
             "--out", str(run)]
    steps.append(Step("igpt train", train, caps["igpt train"], reserved=sizes.reserved["igpt train"],
                      interrupt_after=sizes.train_seconds, ready=has_logged_a_step(run)))
    sample = [*igpt, "sample", "--ckpt", str(run), "--n", str(sizes.sample_images), "--precision", sizes.precision,
              *compiled, *device, "--out", str(work / "samples.png")]
    steps.append(Step("igpt sample", sample, caps["igpt sample"], reserved=sizes.reserved["igpt sample"]))
    return steps


# ---- the table -------------------------------------------------------------------------------
def read_metrics(run: Path) -> list[dict]:
    """The run's learning curve so far; none where igpt itself does not import."""
    try:
        from igpt.checkpoint import RunFolder
    except ImportError:
        return []
    return RunFolder(run).metrics()


def read_json(path: Path | None) -> dict | None:
    try:
        return json.loads(path.read_text()) if path is not None else None
    except (OSError, ValueError):
        return None


def measured_peak(steps: list[Step]) -> tuple[float | None, str]:
    """The matmul peak a benchmark measured (bench_model's best of three first)."""
    for step in steps:
        record = read_json(step.json)
        if record and record.get("peak_flops"):
            return record["peak_flops"], f"{record['peak_dtype']} matmul peak measured by {step.name}"
    return None, "no matmul peak measured"


def train_row(run: Path, peak: float | None) -> dict:
    """igpt train's rate from its metrics (the first steps, which compile, left out) and what it reached."""
    from common import model_train_flops_per_token, result_row

    records = [r for r in read_metrics(run) if "tokens_per_s" in r]
    if not records:
        return result_row("igpt train", notes="no step logged")
    rates = sorted(r["tokens_per_s"] for r in records[2:] or records)
    tokens_per_s = rates[len(rates) // 2]
    saved = read_json(run / "config.json") or {}
    config = SimpleNamespace(**saved) if {"n_layer", "n_embd", "n_ctx"} <= saved.keys() else None
    flops = model_train_flops_per_token(config) if config else None
    return result_row(
        "igpt train", tokens_per_s=tokens_per_s,
        images_per_s=tokens_per_s / config.n_ctx if config else None,
        mfu=tokens_per_s * flops / peak if flops and peak else None,
        notes=f"to step {records[-1]['step']}, loss {records[-1]['loss']:.3f}; median rate",
    )


def pytest_summary(step: Step) -> str:
    """pytest's last line, e.g. '6 passed in 41.2s'."""
    lines = [line.strip("= ") for line in step.output if " in " in line and any(
        word in line for word in ("passed", "failed", "skipped", "error", "deselected", "no tests ran"))]
    return lines[-1] if lines else ""


def table_rows(steps: list[Step], run: Path, sample_images: int, peak: float | None) -> list[dict]:
    rows = []
    for step in steps:
        base = {"step": step.name, "status": step.status, "seconds": step.seconds}
        record = read_json(step.json)
        if record:
            rows += [{**base, **row, "step": f"{step.name}: {row['label']}"} for row in record["rows"]]
        elif step.name == "igpt train" and step.seconds > 0:
            rows.append({**base, **train_row(run, peak)})
        elif step.name == "igpt sample" and step.status == "ok":
            rows.append({**base, "images_per_s": sample_images / step.seconds,
                         "notes": f"{sample_images} images, end to end: loading and any compiling included"})
        elif step.name.startswith("pytest"):
            rows.append({**base, "notes": pytest_summary(step)})
        else:
            rows.append(base)
    return rows


def format_table(rows: list[dict]) -> str:
    def number(value, form):
        return "-" if value is None else format(value, form)

    header = ("step", "status", "time", "tokens/s", "images/s", "MFU", "vs HF", "notes")
    cells = [(row["step"], row["status"], f"{row['seconds']:.0f} s", number(row.get("tokens_per_s"), ",.0f"),
              number(row.get("images_per_s"), ",.1f"), number(row.get("mfu"), ".1%"),
              "-" if row.get("vs_hugging_face") is None else f"{row['vs_hugging_face']:.2f}x", row.get("notes", ""))
             for row in rows]
    widths = [max(len(line[i]) for line in [header, *cells]) for i in range(len(header))]
    right = {2, 3, 4, 5, 6}

    def line(values):
        padded = (v.rjust(w) if i in right else v.ljust(w) for i, (v, w) in enumerate(zip(values, widths)))
        return "  ".join(padded).rstrip()

    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, cells)])


# ---- main ------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", nargs="?", default=None,
                        help="the CIFAR-10 image-folder tarball (with --dry-run: any --data igpt reads, "
                        "default digits)")
    parser.add_argument("--dry-run", action="store_true", help="the same steps on the CPU at toy sizes")
    parser.add_argument("--out", default=os.environ.get("OUT") or str(REPO / "runs" / "gpu-check"),
                        help="logs, JSON and the table (default: $OUT when set, else runs/gpu-check)")
    parser.add_argument("--work", default=None, help="run folder and caches (default: a temporary folder)")
    parser.add_argument("--budget", type=float, default=None, help=f"seconds for the whole run (default: "
                        f"{GPU.budget:.0f} on a GPU, {DRY_RUN.budget:.0f} for --dry-run)")
    parser.add_argument("--no-install", dest="install", action="store_false",
                        help="use the igpt and test dependencies already importable")
    parser.add_argument("--python", default=sys.executable, help="the interpreter that has torch (default: this one)")
    args = parser.parse_args(argv)
    started = time.monotonic()
    sizes = DRY_RUN if args.dry_run else GPU
    data = args.data or ("digits" if args.dry_run else None)
    if data is None:
        parser.error("give the CIFAR-10 tarball (e.g. cifar10-jpeg.tar.gz), or --dry-run")
    if not args.dry_run and not Path(data).exists():
        parser.error(f"{data} does not exist")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work or tempfile.mkdtemp(prefix="igpt-gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    # This checkout's igpt comes first, in this process and every step, even where pip could not install it.
    sys.path.insert(0, str(REPO / "src"))
    python_path = os.pathsep.join(filter(None, [str(REPO / "src"), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": python_path, "PYTHONUNBUFFERED": "1", "TQDM_DISABLE": "1",
           "IGPT_CACHE": os.environ.get("IGPT_CACHE") or str(work / "cache")}
    for stale in ("results.json", "summary.txt", "samples.png", "bench_model.json", "bench_train.json",
                  "bench_sample.json"):
        (out / stale).unlink(missing_ok=True)
    log = Log(out / "gpu_check.log")
    log(f"gpu_check{' --dry-run' if args.dry_run else ''}: data {data}, out {out}, work {work}")
    spec = str(Path(data).resolve()) if Path(data).exists() else data  # a path, or a named data set
    steps = plan(spec, sizes, args.python, out, work, args.install)
    run_all(steps, started + (args.budget or sizes.budget), env, log)
    if (work / "samples.png").is_file():
        shutil.copy(work / "samples.png", out / "samples.png")
    peak, peak_source = measured_peak(steps)
    rows = table_rows(steps, work / "run", sizes.sample_images, peak)
    table = format_table(rows)
    heading = f"GPU check summary ({sizes.device}; MFU against the {peak_source})"
    log(f"\n{heading}\n{table}")
    (out / "summary.txt").write_text(f"{heading}\n{table}\n")
    (out / "results.json").write_text(json.dumps({"device": sizes.device, "peak_flops": peak, "rows": rows},
                                                 indent=2) + "\n")
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if all(step.status == "ok" for step in steps) else 1


if __name__ == "__main__":
    sys.exit(main())
