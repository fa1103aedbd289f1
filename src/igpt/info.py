"""`igpt info`: what a bug report needs to know about this machine and this installation.

Package versions come from their installed metadata, so nothing optional is imported (an extra that
fails to import is still reported). The CPU's flags are those igpt's speed depends on: AVX2 and
AVX-512 for the kernels, AVX-512 BF16 and AMX for native bf16.
"""

from __future__ import annotations

import os
import platform
import re
import shutil
import sys
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import torch

from igpt.config import option

CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16", "bf16", "sve")  # x86, then Arm
RELATED = ("torchvision",)  # not an extra of igpt's, but torch-fidelity's, and it must match torch
ENVIRONMENT = ("IGPT_CACHE", "IGPT_BAND_KERNEL", "IGPT_DECODE_KERNEL", "CXX", "OMP_NUM_THREADS", "CUDA_VISIBLE_DEVICES")
NOT_INSTALLED = "not installed"


@dataclass(kw_only=True)
class InfoConfig:
    """`igpt info`'s settings."""

    json: bool = option(False, "print the report as JSON")


def environment() -> dict[str, dict]:
    """Every fact `igpt info` reports, by section: plain values, ready for JSON."""
    return {"igpt": _installation(), "packages": packages(), "cpu": cpu(), "gpu": gpu(),
            "kernels": kernels(), "caches": caches(),
            "environment variables": {name: os.environ[name] for name in ENVIRONMENT if name in os.environ}}


def format_environment(facts: dict, indent: str = "") -> str:
    """The report as text: `name: value` lines, a section's facts indented under its name."""
    lines = []
    for name, value in facts.items():
        if isinstance(value, dict):
            lines.append(f"{indent}{name}:" + ("" if value else " (none)"))
            lines.extend(filter(None, [format_environment(value, indent + "  ")]))
            continue
        if isinstance(value, bool):
            value = "yes" if value else "no"
        elif isinstance(value, list):
            value = ", ".join(map(str, value)) or "(none)"
        lines.append(f"{indent}{name}: {value}")
    return "\n".join(lines)


def version_of(distribution: str) -> str:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return NOT_INSTALLED


def _installation() -> dict:
    from igpt import __version__

    return {"igpt": __version__, "python": f"{platform.python_version()} ({sys.executable})",
            "os": platform.platform(), "torch": torch.__version__, "torch build": torch_build()}


def torch_build() -> str:
    """CPU, CUDA or ROCm, with the versions torch was built against."""
    if torch.version.cuda:
        cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
        return f"CUDA {torch.version.cuda}" + (f", cuDNN {cudnn}" if cudnn else "")
    if getattr(torch.version, "hip", None):
        return f"ROCm {torch.version.hip}"
    return "CPU"


def _requirements() -> list[tuple[str, str | None]]:
    """(distribution, extra or None) for each requirement igpt's metadata declares, in its order."""
    try:
        declared = metadata.requires("igpt") or []
    except metadata.PackageNotFoundError:  # run from a source tree that was never installed
        declared = []
    out = []
    for requirement in declared:
        name = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement).group(1)
        extra = re.search(r"extra\s*==\s*['\"]([^'\"]+)['\"]", requirement)
        out.append((name, extra.group(1) if extra else None))
    return out


def packages() -> dict:
    """The installed version (or NOT_INSTALLED) of each dependency, each extra's packages by extra, and RELATED."""
    out: dict = {}
    for name, extra in _requirements():
        group = "required" if extra is None else f"extra {extra}"
        out.setdefault(group, {})[name] = version_of(name)
    out["related"] = {name: version_of(name) for name in RELATED}
    return out


def cpuinfo(text: str | None = None) -> dict[str, str]:
    """The first processor's entries in /proc/cpuinfo (`text`, when given); {} where there is none."""
    if text is None:
        try:
            text = Path("/proc/cpuinfo").read_text()
        except OSError:
            return {}
    entries: dict[str, str] = {}
    for line in text.split("\n\n")[0].splitlines():
        key, colon, value = line.partition(":")
        if colon:
            entries.setdefault(key.strip(), value.strip())
    return entries


def cpu(entries: dict[str, str] | None = None) -> dict:
    """The CPU's model, cores and the flags that matter, with torch's own view (every OS) and bf16 nativeness."""
    from igpt.data.cache import cores
    from igpt.precision import bf16_native

    entries = cpuinfo() if entries is None else entries
    model = entries.get("model name") or entries.get("Model") or entries.get("Hardware") or platform.processor()
    listed = set((entries.get("flags") or entries.get("Features") or "").split())
    return {"model": model or platform.machine(), "machine": platform.machine(), "cores": os.cpu_count(),
            "cores usable": cores(), "torch threads": torch.get_num_threads(),
            "flags": [flag for flag in CPU_FLAGS if flag in listed] if listed else "not listed on this OS",
            "torch cpu capability": torch.backends.cpu.get_cpu_capability(),
            "bf16 native": bf16_native(torch.device("cpu"))}


def gpu() -> dict:
    """Each CUDA device's name, compute capability, memory and bf16 nativeness; {"cuda": "none"} without one."""
    from igpt.precision import bf16_native

    if not torch.cuda.is_available():
        mps = getattr(torch.backends, "mps", None)
        return {"cuda": "none", **({"mps": "available"} if mps is not None and mps.is_available() else {})}
    out = {}
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        out[f"cuda:{index}"] = (f"{props.name}, compute capability {props.major}.{props.minor}, "
                                f"{props.total_memory / 2**30:.1f} GiB")
    out["bf16 native"] = bf16_native(torch.device("cuda"))
    return out


def kernels() -> dict:
    """The C++ compiler, and whether each of igpt's C++ kernels is turned on and built (its files in the cache),
    without building any."""
    import igpt.decoding  # noqa: F401  (defines the decode kernel, and imports the band kernel)
    from igpt.kernels import KERNELS, compiler_command, folder

    compiler = compiler_command()[0]
    facts = {"c++ compiler": shutil.which(compiler) or f"{compiler} not found"}
    for kernel in KERNELS:
        facts[kernel.name] = {"enabled": kernel.enabled(), "built": [str(path) for path in kernel.built()]
                              or f"not yet (compiled on first use into {folder()})"}
    return facts


def folder_size(folder: Path) -> int:
    """Bytes of the files under `folder`, links not followed."""
    return sum(file_size(os.path.join(root, name)) for root, _dirs, files in os.walk(folder) for name in files)


def file_size(path) -> int:
    """Bytes of one file, its link not followed; 0 if it was removed while we looked."""
    try:
        return os.lstat(path).st_size
    except OSError:
        return 0


def caches() -> dict:
    """igpt's cache folder (data, decoded pixels and tokens, kernels) and the size of each part."""
    from igpt.data.sources import cache_root

    root = cache_root()
    if not root.is_dir():
        return {"folder": f"{root} (empty: not created yet)"}
    entries = sorted(root.iterdir())  # listed once
    sizes = {part.name: folder_size(part) for part in entries if part.is_dir()}
    loose = sum(file_size(entry) for entry in entries if not entry.is_dir())  # files beside the parts
    return {"folder": str(root), **{name: human_size(size) for name, size in sizes.items()},
            "total": human_size(sum(sizes.values()) + loose)}


def human_size(n: float) -> str:
    for unit in ("B", "KiB", "MiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"
