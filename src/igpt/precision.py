"""Numeric precision: bf16 autocast, and whether this hardware runs bf16 natively."""

from __future__ import annotations

import torch

from igpt.config import option

PRECISIONS = ("fp32", "bf16")


def precision_option():
    """The --precision flag of every command that runs the model (a dataclass field)."""
    return option("fp32", "numeric precision: bf16 runs the model under autocast", choices=PRECISIONS)


def autocast(device: torch.device, precision: str):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def bf16_native(device: torch.device) -> bool:
    """Whether bf16 matrix products run in hardware here; elsewhere PyTorch emulates them, far slower than fp32.

    CPUs need AVX-512 BF16 or AMX; CUDA devices need compute capability 8.0 or later.
    """
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return True


def precision_warning(device: torch.device, precision: str) -> str | None:
    """One line for users who ask for bf16 where it is emulated, or None."""
    if precision != "bf16" or bf16_native(device):
        return None
    missing = "AVX-512 BF16 or AMX" if device.type == "cpu" else "compute capability 8.0"
    return (f"warning: this {device.type.upper()} has no native bf16 (no {missing}), so bf16 runs emulated "
            "and far slower than fp32; use --precision fp32")
