"""igpt's C++ kernels: compiled for this machine on first use, kept whole in the igpt cache, called through ctypes.

Two sources use this: attention/band_kernel.cpp (band, causal dense and column attention) and
decode_kernel.cpp (a sampling step through every block). Each is built with the machine's C++
compiler ($CXX, else c++) for the machine's own CPU (-march=native) into the igpt cache
($IGPT_CACHE, else ~/.cache/igpt), one file per source, compiler and CPU, so a later process loads
it at once. Where no compiler works, or with IGPT_<NAME>=0 (IGPT_BAND_KERNEL=0,
IGPT_DECODE_KERNEL=0), `Kernel.available()` is False and PyTorch's own operators serve.

Built with -fopenmp, a library binds to the libgomp that torch loaded, so its threads are torch's
threads and no second pool competes for the cores.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import logging
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
from pathlib import Path

from igpt.data.sources import cache_root

HERE = Path(__file__).parent
HEADERS = (HERE / "simd.h",)
# -ffast-math for the compile only (glibc's vector expf): on the link line GCC before 13 adds
# crtfastmath.o, which sets flush-to-zero for the whole process once the library loads.
COMPILE = ("-std=c++17", "-O3", "-march=native", "-ffast-math", "-fopenmp", "-fPIC", "-Wno-psabi", f"-I{HERE}")
LINK = ("-shared", "-fopenmp")
log = logging.getLogger(__name__)
KERNELS: list["Kernel"] = []  # every Kernel defined, in the order their modules were imported


class Kernel:
    """One C++ source built into a shared library, with the argument types of the functions it exports (and the
    result types of those that return other than an int)."""

    def __init__(self, source: Path, signatures: dict[str, list], results: dict[str, type] | None = None):
        self.source, self.signatures, self.results = source, signatures, results or {}
        self.name = source.stem.replace("_", " ")  # "band kernel": for messages
        self.switch = "IGPT_" + source.stem.upper()  # IGPT_BAND_KERNEL=0 turns it off
        self._library: ctypes.CDLL | None = None
        self._tried = False
        KERNELS.append(self)

    def available(self) -> bool:
        return self.library() is not None

    def enabled(self) -> bool:
        """False where IGPT_<NAME>=0 turns it off."""
        return os.environ.get(self.switch, "1") != "0"

    def built(self) -> list[Path]:
        """Its libraries in the cache, oldest first, without building any."""
        here = folder()
        return sorted(here.glob(f"{self.source.stem}-*.so"), key=lambda p: p.stat().st_mtime) if here.is_dir() else []

    def library(self) -> ctypes.CDLL | None:
        """The compiled library, built or loaded once per process, or None (turned off, or no working compiler:
        the reason goes to the log)."""
        if not self._tried:
            self._tried = True
            self._library = self._load()
        return self._library

    def forget(self) -> None:
        """Forget the library this process loaded, so the next `library()` finds it again (tests)."""
        self._library, self._tried = None, False

    def _load(self) -> ctypes.CDLL | None:
        if not self.enabled():
            return None
        try:
            path = self.build()
            try:
                lib = ctypes.CDLL(str(path))
            except OSError:
                path.unlink(missing_ok=True)  # not a library: the next process builds it again
                raise
        except (OSError, subprocess.SubprocessError, ValueError, RuntimeError) as error:
            detail = getattr(error, "stderr", None) or error
            log.info("igpt's %s is not built, so PyTorch's operators serve: %s", self.name, detail)
            return None
        for function, argtypes in self.signatures.items():
            getattr(lib, function).argtypes = argtypes
        for function, restype in self.results.items():
            getattr(lib, function).restype = restype
        return lib

    def build(self) -> Path:
        """The source compiled for this machine, from the cache when it was built before and is intact.

        The cache key names the compiler by its file (path, size, time), not by running it: a
        process that finds the kernel built starts no subprocess. Beside each library lies its
        build record (size and SHA-256): a library that does not match it (truncated by a full disk
        or an interrupted copy, overwritten) is built again before anything maps it, since loading a
        damaged one kills the process with a bus error rather than raise.
        """
        name, *options = compiler_command()
        compiler = shutil.which(name)
        if compiler is None:
            raise OSError(f"no C++ compiler ({name}) on the PATH")
        binary = os.stat(compiler)
        texts = [path.read_text() for path in (self.source, *HEADERS)]
        key = hashlib.sha256("\0".join([*texts, compiler, *options, str(binary.st_size), str(binary.st_mtime_ns),
                                         *COMPILE, *LINK, cpu_identity()]).encode())
        path = folder() / f"{self.source.stem}-{key.hexdigest()[:16]}.so"
        if intact(path):
            return path
        if path.exists():
            log.warning("igpt's %s %s does not match its build record (a damaged file?); building it again",
                        self.name, path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=path.parent) as scratch:  # the cache only ever holds whole files
            built, objects = Path(scratch) / path.name, Path(scratch) / f"{self.source.stem}.o"
            for command in ([*COMPILE, "-c", str(self.source), "-o", str(objects)],
                            [*LINK, str(objects), "-o", str(built)]):
                subprocess.run([compiler, *options, *command], capture_output=True, text=True, check=True,
                               timeout=600)
            record = Path(scratch) / build_record(path).name
            record.write_text(json.dumps(fingerprint(built)))
            os.replace(built, path)
            os.replace(record, build_record(path))
        if not intact(path):
            raise OSError(f"the {self.name} built at {path} does not match its build record")
        return path


def build_record(library_path: Path) -> Path:
    return library_path.with_suffix(".json")


def fingerprint(library_path: Path) -> dict:
    data = library_path.read_bytes()
    return {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def intact(library_path: Path) -> bool:
    """Whether the library exists and is byte for byte what its build record says was built."""
    try:
        return json.loads(build_record(library_path).read_text()) == fingerprint(library_path)
    except (OSError, ValueError):
        return False


def folder() -> Path:
    """Where the libraries are built: the igpt cache's `kernels` folder."""
    return cache_root() / "kernels"


def compiler_command() -> list[str]:
    """The C++ compiler as a command: $CXX (which may carry words of its own: "ccache g++"), else c++."""
    return shlex.split(os.environ.get("CXX") or "c++")


def cpu_identity() -> str:
    """What -march=native builds for: the CPU's feature flags where Linux lists them."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith(("flags", "Features"))), platform.processor())
    except OSError:
        return platform.machine() + platform.processor()
