"""Shared helpers for the benchmarks: timing, the machine's matmul peak, model FLOPs."""

from __future__ import annotations

import platform
import time
from contextlib import nullcontext

import torch


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


def synchronize(device: str | torch.device) -> None:
    """Wait for queued GPU work, so a timer that stops now has seen all of it."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def seconds_per_call(fn, warmup: int = 2, min_time: float = 3.0, min_calls: int = 3) -> float:
    """Median-free simple timing: warm up, then run until `min_time` seconds and `min_calls` calls."""
    for _ in range(warmup):
        fn()
    calls, start = 0, time.perf_counter()
    while calls < min_calls or time.perf_counter() - start < min_time:
        fn()
        calls += 1
    return (time.perf_counter() - start) / calls


def best_of(contenders: dict, repeat: int = 3) -> dict[str, float]:
    """Seconds per call of each contender: the fastest of `repeat` runs, taken in turns.

    Shared VMs drift by tens of percent over a minute; taking turns exposes every contender
    to the same drift and the minimum discards the slow spells.
    """
    best = {name: float("inf") for name in contenders}
    for _ in range(repeat):
        for name, fn in contenders.items():
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def autocast(device: str, precision: str):
    return torch.autocast(device, dtype=torch.bfloat16) if precision == "bf16" else nullcontext()


def peak_dtype(device: str = "cpu") -> torch.dtype:
    """bf16 where the hardware has it, else fp32: the fastest precision, whose matmul peak steps are measured against."""
    from igpt.train import bf16_native

    return torch.bfloat16 if bf16_native(torch.device(device)) else torch.float32


def peak_name(device: str = "cpu") -> str:
    return "bf16" if peak_dtype(device) == torch.bfloat16 else "fp32"


def precisions(device: str = "cpu") -> tuple[str, ...]:
    """The precisions worth timing here: bf16 only where the hardware has it (emulated bf16 is ~400x slower)."""
    if peak_name(device) == "bf16":
        return ("fp32", "bf16")
    print(f"  (bf16 skipped: this {torch.device(device).type.upper()} has no native bf16, so only fp32 is timed)")
    return ("fp32",)


def matmul_peak(dtype=None, n: int | None = None, device: str = "cpu") -> float:
    """FLOP/s of a large square matrix product (in `peak_dtype` unless told): the practical peak a step can approach.

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

    return 2 * n**3 / seconds_per_call(run, min_time=2.0)


def train_flops_per_token(n_layer: int, d: int, n_ctx: int, non_embedding_params: int) -> float:
    """6 N for the weights (forward + backward) plus 12 L T d for attention scores and values."""
    return 6 * non_embedding_params + 12 * n_layer * n_ctx * d
