"""Numeric precision: bf16 autocast, chosen where the hardware runs bf16 natively.

`auto`, every command's default, is bf16 autocast (weights and optimizer state stay float32)
where bf16 matrix products run in hardware, and fp32 elsewhere: on those machines a bf16 step
is the faster one, and elsewhere PyTorch emulates bf16, far slower than fp32.
"""

from __future__ import annotations

import torch

from igpt.config import option

PRECISIONS = ("auto", "bf16", "fp32")


def precision_option():
    """The --precision flag of every command that runs the model (a dataclass field)."""
    return option("auto", "numeric precision: bf16 runs the model under autocast with float32 weights; "
                          "auto is bf16 where this hardware runs it natively, else fp32", choices=PRECISIONS)


def resolve_precision(precision: str, device: torch.device) -> str:
    """`bf16` or `fp32`: auto decided for this device, the others as they are."""
    if precision == "auto":
        return "bf16" if bf16_native(device) else "fp32"
    return precision


def autocast(device: torch.device, precision: str):
    on = resolve_precision(precision, device) == "bf16"
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=on)


def bf16_native(device: torch.device) -> bool:
    """Whether bf16 matrix products run in hardware here; elsewhere PyTorch emulates them, far slower than fp32.

    CPUs need AVX-512 BF16 or AMX; CUDA devices need compute capability 8.0 or later.
    """
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return False


def precision_choice(precision: str, device: torch.device) -> str:
    """One line saying which precision a command runs in and why, with a warning where bf16 is emulated."""
    chosen = resolve_precision(precision, device)
    where = "this CPU" if device.type == "cpu" else f"this {device.type.upper()} device"
    if precision == "auto":
        why = f"auto: {where} {'runs bf16 natively' if chosen == 'bf16' else 'has no native bf16'}"
        return f"precision: {chosen} ({why})"
    line = f"precision: {chosen} (--precision {precision})"
    if chosen == "bf16" and not bf16_native(device):
        missing = "AVX-512 BF16 or AMX" if device.type == "cpu" else "compute capability 8.0"
        line += (f"; warning: {where} has no native bf16 (no {missing}), so bf16 runs emulated and far slower "
                 "than fp32: use --precision fp32")
    return line
