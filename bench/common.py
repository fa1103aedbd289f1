"""Shared helpers for the benchmarks: data paths, timing, the machine's matmul peak, model FLOPs, the
Hugging Face counterpart of an igpt model, and the JSON results bench/gpu_check.py tabulates."""

from __future__ import annotations

import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from igpt.runtime import reuse_freed_memory
from igpt.distributed import synchronize  # noqa: F401  (re-exported for the benchmarks)

reuse_freed_memory()  # every benchmark process runs with the allocator settings of the igpt command it measures

SHARED_DATASETS = Path(__file__).resolve().parents[1].parent / "shared" / "datasets"
CIFAR10 = SHARED_DATASETS / "cifar10" / "cifar10-jpeg.tar.gz"


# ---- data ------------------------------------------------------------------------------------
def cifar10_or_digits() -> str:
    """CIFAR-10 from ../shared where it is; else the built-in digits, saying so, so every benchmark runs anywhere."""
    if CIFAR10.is_file():
        return str(CIFAR10)
    print(f"  (CIFAR-10 is not at {CIFAR10}: ../shared is absent, so the built-in digits stand in)")
    return "digits"


# ---- the machine -----------------------------------------------------------------------------
def machine(device: str = "cpu") -> str:
    if torch.device(device).type == "cuda":
        return f"{torch.cuda.get_device_name()}, torch {torch.__version__}"
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {torch.get_num_threads()} torch threads, torch {torch.__version__}"


def band_kernel_state() -> str:
    """Which kernel runs float32 band attention on a CPU in this process (igpt.attention.band_kernel)."""
    from igpt.attention import band_kernel

    return ("igpt's band kernel (built for this CPU)" if band_kernel.available()
            else "PyTorch's flash kernel (igpt's band kernel is off or could not be built)")


# ---- timing ----------------------------------------------------------------------------------
def seconds_per_call(fn, warmup: int = 2, min_time: float = 3.0, min_calls: int = 3) -> float:
    """Median-free simple timing: warm up, then run until `min_time` seconds and `min_calls` calls."""
    for _ in range(warmup):
        fn()
    calls, start = 0, time.perf_counter()
    while calls < min_calls or time.perf_counter() - start < min_time:
        fn()
        calls += 1
    return (time.perf_counter() - start) / calls


def times_in_turns(contenders: dict, repeat: int = 3, pause=None, own_time: bool = False,
                   alternate: bool = False) -> dict[str, list[float]]:
    """Seconds of each of `repeat` calls of every contender, taken in turns.

    Shared VMs drift by tens of percent over a minute; taking turns exposes every contender
    to the same drift. `pause`, when given, runs before each call, outside the timing (a reset,
    a synchronisation, a rest for the machine). With `own_time`, each call returns its own
    seconds (a step timed in another process), which count instead of the wall time around it.
    With `alternate`, every other round runs the contenders in reverse order, so that none
    always follows the same one (its cache state, its spinning threads).
    """
    times = {name: [] for name in contenders}
    for round_ in range(repeat):
        names = list(contenders)
        for name in (names[::-1] if alternate and round_ % 2 else names):
            if pause is not None:
                pause()
            start = time.perf_counter()
            seconds = contenders[name]()
            times[name].append(seconds if own_time else time.perf_counter() - start)
    return times


def best_of(contenders: dict, repeat: int = 3, pause=None, own_time: bool = False,
            alternate: bool = False) -> dict[str, float]:
    """Seconds per call of each contender: the fastest of `repeat` runs in turns (the minimum discards the slow
    spells); `alternate` as in times_in_turns."""
    times = times_in_turns(contenders, repeat, pause, own_time, alternate)
    return {name: min(seconds) for name, seconds in times.items()}


def random_batch(config, batch_size: int, device="cpu") -> tuple[torch.Tensor, torch.Tensor | None]:
    """Seeded random tokens (batch_size, n_ctx) and, for the bert objective, the mask a training step needs."""
    from igpt.model import bert_mask

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        tokens = torch.randint(0, config.vocab_size, (batch_size, config.n_ctx))
    mask = bert_mask(tuple(tokens.shape), 0) if config.objective == "bert" else None
    return tokens.to(device), mask


def optimizer_step(model, tokens: torch.Tensor, precision: str, mask: torch.Tensor | None = None):
    """A call that runs one igpt.train.train_step (forward, backward, clipping, AdamW) of `model` on `tokens` and
    waits for the device: the step `igpt train` takes, for any model with igpt's forward (HuggingFaceAsIgpt too)."""
    from igpt.batches import Batch
    from igpt.distributed import World
    from igpt.train import make_optimizer, train_step

    optimizer = make_optimizer(model.parameters(), lr=1e-4)
    world, batch = World(device=tokens.device), Batch(tokens)

    def step():
        train_step(model, optimizer, batch, world=world, precision=precision, mask=mask)
        synchronize(world.device)

    return step


def step_seconds(config, batch_size: int, device="cpu", precision: str = "fp32", steps: int = 5,
                 compile: bool = False) -> float:
    """Seconds per optimizer step of a fresh model of `config` on random tokens, with the loop's own step and timer
    (igpt.train.train_step, igpt.train.median_seconds): the model alone, without the data thread, validations or
    checkpoints that `igpt train --minutes` also counts. compile: the model as `--compile` runs it (its
    compilation is left out)."""
    from igpt.train import median_seconds

    model = seeded_model(config, device)
    tokens, mask = random_batch(config, batch_size, device)
    step = optimizer_step(torch.compile(model) if compile else model, tokens, precision, mask)
    return median_seconds(lambda _: step(), torch.device(device), warm=3 if compile else 1, timed=steps)


# ---- precision and the matmul peak -----------------------------------------------------------
def autocast(device: str, precision: str):
    from igpt.precision import autocast as igpt_autocast

    return igpt_autocast(torch.device(device), precision)


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def peak_dtype(device: str = "cpu") -> torch.dtype:
    """bf16 where the hardware has it, else fp32: the fastest precision, the one `igpt --precision auto` picks."""
    from igpt.precision import bf16_native

    return torch.bfloat16 if bf16_native(torch.device(device)) else torch.float32


def peak_name(device: str = "cpu") -> str:
    return "bf16" if peak_dtype(device) == torch.bfloat16 else "fp32"


def precisions(device: str = "cpu") -> tuple[str, ...]:
    """The precisions worth timing here: bf16 only where the hardware has it (emulated bf16 is ~400x slower)."""
    if peak_name(device) == "bf16":
        return ("fp32", "bf16")
    print(f"  (bf16 skipped: this {torch.device(device).type.upper()} has no native bf16, so only fp32 is timed)")
    return ("fp32",)


def add_precisions_option(parser) -> None:
    parser.add_argument("--precisions", nargs="+", choices=tuple(DTYPES), default=None,
                        help="default: fp32, and bf16 where the hardware runs it natively")


def timed_precisions(args) -> tuple[str, ...]:
    """--precisions as given, else `precisions` of --device."""
    return tuple(args.precisions or precisions(args.device))


def mode_precision(mode: str) -> str:
    """The precision a mode runs in: "bf16 + compile" -> "bf16"."""
    return mode.split()[0]


def matmul_call(dtype=None, n: int | None = None, device: str = "cpu"):
    """A call that runs one large square matrix product (in `peak_dtype` unless told), and the FLOPs it does: time
    it in turns with what its peak bounds.

    2048^2 saturates a CPU; a GPU needs 8192^2.
    """
    if dtype is None:
        dtype = peak_dtype(device)
    n = n or (8192 if torch.device(device).type == "cuda" else 2048)
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)

    def run():
        torch.mm(a, b)
        synchronize(device)

    return run, 2 * n**3


def matmul_peak(dtype=None, n: int | None = None, device: str = "cpu") -> float:
    """FLOP/s of a large square matrix product (`matmul_call`): the practical peak a step can approach."""
    run, flops = matmul_call(dtype, n, device)
    return flops / seconds_per_call(run, min_time=2.0)


def matmul_peaks(names, device: str = "cpu", repeat: int = 3) -> dict[str, float]:
    """The matmul peak (FLOP/s) of each precision named, measured in turns, the best of `repeat`: a rate in a
    precision is a fraction of that precision's peak, never of another's."""
    runs = [{name: matmul_peak(DTYPES[name], device=device) for name in names} for _ in range(repeat)]
    return {name: max(run[name] for run in runs) for name in names}


def peaks_line(peaks: dict[str, float]) -> str:
    return "matmul peak " + ", ".join(f"{name} {flops / 1e12:.2f} TFLOP/s" for name, flops in peaks.items())


def of_peak(tokens_per_s: float, flops_per_token: float, peaks: dict[str, float], precision: str) -> float:
    """The fraction of `precision`'s matmul peak that `tokens_per_s` at `flops_per_token` reaches."""
    return tokens_per_s * flops_per_token / peaks[precision]


def train_flops_per_token(n_layer: int, d: int, n_ctx: int, non_embedding_params: int) -> float:
    """6 N for the weights (forward + backward) plus 12 L T d for attention scores and values."""
    return 6 * non_embedding_params + 12 * n_layer * n_ctx * d


def model_train_flops_per_token(config) -> float:
    """`train_flops_per_token` of an ImageGPTConfig: N = 12 L d^2 (attention and MLP weights)."""
    return train_flops_per_token(config.n_layer, config.n_embd, config.n_ctx, 12 * config.n_layer * config.n_embd**2)


def attended_keys(config) -> np.ndarray:
    """Keys each query reads, per layer and position, (n_layer, n_ctx), as the model's attention patterns define them
    (`Pattern.sees`). A decoding step at position i reads the same keys, so this sizes both training FLOPs and
    sampling reads."""
    from igpt.attention import layer_pattern

    return np.stack([layer_pattern(config, layer).mask(config.n_ctx).sum(1).numpy() for layer in range(config.n_layer)])


def decode_weight_count(config) -> int:
    """Elements of the decode weights a sampling step reads once: 12 L d^2 in the blocks, d x vocab in the head."""
    return 12 * config.n_layer * config.n_embd**2 + config.n_embd * config.vocab_size


def step_bytes(config, batch: int, element: int, keys: np.ndarray | None = None) -> np.ndarray:
    """Bytes each pixel step reads, per position: the decode weights once, and the keys and values the pattern
    reads at that position in every layer, for every row of the batch (`keys`: attended_keys summed over the
    layers, where the caller has it)."""
    keys = attended_keys(config).sum(0) if keys is None else keys
    return (decode_weight_count(config) + batch * 2 * config.n_embd * keys) * element


def seeded_model(config, device: str):
    """The same initial weights for every precision and contender of a case, in training mode."""
    from igpt.model import ImageGPT

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return ImageGPT(config).to(device).train()


def pattern_train_flops_per_token(config) -> float:
    """Model FLOPs per token of a training step for the config's attention pattern: 6 N (N = 12 L d^2) plus
    12 d per key each query attends, summed over layers (12 L d x the keys attended, averaged).

    Counts the keys the pattern needs, not the padding or masked keys a kernel may also compute, and the
    causal half only for dense: unlike `model_train_flops_per_token` (12 L T d, every key), so
    dense-1d reads somewhat lower here than in bench_model.
    """
    d = config.n_embd
    return 6 * 12 * config.n_layer * d**2 + 12 * d * float(attended_keys(config).mean(1).sum())


# ---- memory ----------------------------------------------------------------------------------
def bandwidth_reader(nbytes: int, device: str = "cpu", bytes_per_call: int = 2**25):
    """A call that reads a float32 tensor of `nbytes` (torch.sum over it) about `bytes_per_call` in all (once at
    least), and the bytes one call reads: time it in turns with what its bandwidth bounds.

    A small tensor is read from the caches it fits in and a large one from memory: size it as a working set.
    """
    x = torch.ones(max(1, nbytes // 4), dtype=torch.float32, device=device)
    x.sum()  # pages touched, caches filled
    synchronize(device)
    calls = max(1, bytes_per_call // x.nbytes)

    def read() -> None:
        for _ in range(calls):
            x.sum()
        synchronize(device)

    return read, calls * x.nbytes


def read_bandwidth(nbytes: int, device: str = "cpu", repeat: int = 10, bytes_per_timing: int = 2**25) -> float:
    """Bytes/s of reading a float32 tensor of `nbytes` (`bandwidth_reader`), the best of `repeat` timings. Many
    short timings, not a few long ones: the best of them is the one no other process disturbed."""
    read, nbytes_read = bandwidth_reader(nbytes, device, bytes_per_timing)
    return nbytes_read / best_of({"read": read}, repeat)["read"]


def _proc_status_bytes(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise OSError(f"/proc/self/status has no {field}")


def reset_peak_memory(device: str = "cpu") -> int:
    """Start counting this process's peak memory from now; returns the memory in use now (bytes).

    CPU: resident set size. /proc/self/status's VmHWM is this process image's own high-water mark
    (ru_maxrss is not: it carries the parent's peak across fork and exec), and writing 5 to
    /proc/self/clear_refs resets it (Linux 4.0+). CUDA: torch's allocator statistics.
    """
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass  # an older kernel: the mark then also holds the imports' transient peak
    return _proc_status_bytes("VmRSS")


def peak_memory(device: str = "cpu") -> int:
    """This process's peak memory (bytes) since `reset_peak_memory`: peak RSS, or CUDA's peak allocated."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    return _proc_status_bytes("VmHWM")


# ---- the Hugging Face counterpart ------------------------------------------------------------
def hf_config(config):
    """transformers.ImageGPTConfig of the same network as an igpt ImageGPTConfig (dropout off), via igpt.hf's export."""
    import transformers

    from igpt.hf import hf_config as exported_config

    return transformers.ImageGPTConfig.from_dict(exported_config(config))


def hf_model(config, device: str = "cpu"):
    """A randomly initialised Hugging Face ImageGPTForCausalImageModeling shaped like `config`, in training mode."""
    import transformers

    return transformers.ImageGPTForCausalImageModeling(hf_config(config)).to(device).train()


def hf_input_ids(tokens: torch.Tensor, sos: int) -> torch.Tensor:
    """Hugging Face's input for igpt's `tokens`: [sos] + pixels[:-1], sos being the id after the palette.

    igpt adds its start vector inside the model; Hugging Face needs the shift done outside.
    A one-pixel row gives [sos] alone, the start of generation.
    """
    start = torch.full((len(tokens), 1), sos, dtype=tokens.dtype, device=tokens.device)
    return torch.cat([start, tokens[:, :-1]], 1)


class HuggingFaceAsIgpt(torch.nn.Module):
    """Hugging Face's model behind igpt's forward signature (tokens -> logits), so both run igpt's own step."""

    def __init__(self, hf, vocab_size: int):
        super().__init__()
        self.hf, self.vocab_size = hf, vocab_size

    def forward(self, tokens: torch.Tensor, mask=None) -> torch.Tensor:
        return self.hf(input_ids=hf_input_ids(tokens, self.vocab_size)).logits


def exported_to_hf(model, hf_class: str = "ImageGPTForCausalImageModeling"):
    """igpt weights -> a Hugging Face folder (igpt.hf.to_hf) -> transformers' `hf_class`, in eval mode.

    Both sides then run the very same weights, so their outputs can be checked against each
    other. to_hf needs a palette of the model's size; a random one serves, as only the weights matter here.
    """
    import transformers

    from igpt.hf import to_hf
    from igpt.palette import Palette

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()  # ImageGPTModel would report the exported lm_head as unused
    colours = np.random.default_rng(0).uniform(-1, 1, (model.config.vocab_size, 3)).astype(np.float32)
    with tempfile.TemporaryDirectory() as folder:
        to_hf(model, Palette(colours), folder)
        return getattr(transformers, hf_class).from_pretrained(folder).eval()


# ---- options and machine-readable results ----------------------------------------------------
def add_device_options(parser, no_compile_help: str | None = None) -> None:
    """--device and --json; and --no-compile, with its help, for a benchmark that compiles unless told not to."""
    parser.add_argument("--device", default="cpu", help="cpu | cuda")
    if no_compile_help:
        parser.add_argument("--no-compile", dest="compile", action="store_false", help=no_compile_help)
    parser.add_argument("--json", metavar="PATH", default=None,
                        help="also write the results as JSON (bench/gpu_check.py builds its table from them)")


def result_row(label: str, *, tokens_per_s: float | None = None, images_per_s: float | None = None,
               mfu: float | None = None, vs_hugging_face: float | None = None, notes: str = "") -> dict:
    """One line of gpu_check's table: igpt's best rate in a setting, its share of the matmul peak, its ratio to HF."""
    return {"label": label, "tokens_per_s": tokens_per_s, "images_per_s": images_per_s, "mfu": mfu,
            "vs_hugging_face": vs_hugging_face, "notes": notes}


def write_json(path: str | None, benchmark: str, device: str, rows: list[dict], **details) -> None:
    """The benchmark's table rows and its details as JSON at `path` (nothing when None)."""
    if path is None:
        return
    record = {"benchmark": benchmark, "device": device, "machine": machine(device), "rows": rows, **details}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(record, indent=2) + "\n")


def write_training_json(path: str | None, benchmark: str, device: str, label: str, config, best: tuple[str, str],
                        vs_hugging_face: float, notes: str, rates: dict[tuple[str, str], float],
                        peaks: dict[str, float]) -> None:
    """A training benchmark's row (the `best` (who, mode)'s rate, its model FLOPs over its own precision's peak, its
    ratio to Hugging Face), with every rate measured, keyed "who, mode", and its fraction of its precision's peak.

    peak_flops and peak_dtype are the peak of the precision `--precision auto` picks here (bf16 where native),
    which bench/gpu_check.py measures `igpt train` against; `peaks` holds every precision's."""
    flops = model_train_flops_per_token(config)
    row = result_row(label, tokens_per_s=rates[best], images_per_s=rates[best] / config.n_ctx,
                     mfu=of_peak(rates[best], flops, peaks, mode_precision(best[1])), vs_hugging_face=vs_hugging_face,
                     notes=notes)
    auto = peak_name(device)
    write_json(path, benchmark, device, [row], peak_flops=peaks[auto], peak_dtype=auto, peaks=peaks,
               flops_per_token=flops, tokens_per_s={", ".join(key): rate for key, rate in rates.items()},
               of_peak={", ".join(key): of_peak(rate, flops, peaks, mode_precision(key[1]))
                        for key, rate in rates.items()})
